"""The op's arguments, for both ops (one adapter and mixed batches): the rules they must meet, autocast and the seed.

Every rule is written once, in :func:`problem`: the check on every call and the error's wording both come from it.
Its cases are ordered so that an acceptable call returns after a few cheap comparisons.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # x's dtypes the op takes
HALF_DTYPES = (torch.float16, torch.bfloat16)  # x's dtypes over which LoRA parameters may be fp32 (as peft keeps them)
AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts
SEED_LIMIT = 2**62
NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument when dropout is off (never read)
_any_autocast = torch._C._is_any_autocast_enabled  # whether autocast is on for any device
_NUMBERS = (int, float, torch.SymInt, torch.SymFloat)


def shape_of(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _where(t: Tensor) -> str:
    return f"{t.dtype} on {t.device}"


def problem(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
            dropout_p: float, slices: Sequence[bool] | None, magnitude: Tensor | None = None) -> str | None:
    """What is wrong with these arguments, naming the argument and the shapes; None when nothing is."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        return f"x must be a tensor of shape (..., in), got {x!r:.60}"
    if x.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        return f"x must be one of {names}, got {x.dtype}"
    if weight.dim() != 2:
        return f"weight must be 2-D (out, in), got shape {shape_of(weight)}"
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        return f"x's last dim must equal weight's in_features: x {shape_of(x)}, weight {shape_of(weight)}"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        return f"bias must have shape ({out_features},) to match weight {shape_of(weight)}, got {shape_of(bias)}"
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        return f"lora_A must be (R, {in_features}) to match weight {shape_of(weight)}, got {shape_of(lora_A)}"
    groups = active = 1
    if slices is not None:
        groups, active = len(slices), sum(map(bool, slices))
        if active < 1 or out_features % groups:
            return f"slices {list(slices)} must enable at least one of groups that divide out_features={out_features}"
    if lora_A.shape[0] % active:
        return f"lora_A's rows {lora_A.shape[0]} must be rank x {active} enabled slices, got {shape_of(lora_A)}"
    expected_B = (out_features // groups * active, lora_A.shape[0] // active)
    if lora_B.dim() != 2 or tuple(lora_B.shape) != expected_B:
        return (f"lora_B must have shape {expected_B} for weight {shape_of(weight)}, lora_A {shape_of(lora_A)} and "
                f"slices {None if slices is None else list(slices)}, got {shape_of(lora_B)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            return f"{name} is {_where(t)} but x is {_where(x)} (all must match)"
    if magnitude is not None and (magnitude.dim() != 1 or magnitude.shape[0] != expected_B[0]):
        return (f"magnitude must have shape ({expected_B[0]},), one per output feature of lora_B {shape_of(lora_B)}, "
                f"got {shape_of(magnitude)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        if t is None:
            continue
        if t.device != x.device or (t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in HALF_DTYPES)):
            return (f"{name} is {_where(t)} but x is {_where(x)} (LoRA parameters must be on x's device, in x's "
                    "dtype or float32 over a 16-bit x)")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        return f"dropout_p must be in [0, 1), got {dropout_p!r}"
    if not (isinstance(scale, _NUMBERS) and not isinstance(scale, bool) and _finite(scale)):
        return f"scale must be a finite number, got {scale!r}"
    return None


def _finite(scale) -> bool:
    """Whether a scale is finite. While torch.compile traces, a scale that changes between calls is symbolic and
    is taken as it is: Python math on it cannot be traced."""
    return torch.compiler.is_compiling() or math.isfinite(scale)


def check(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
          dropout_p: float, slices: Sequence[bool] | None, who: str = "", magnitude: Tensor | None = None) -> None:
    """Raise ValueError with :func:`problem`'s words (after ``who``, e.g. "adapter 2: ") when there is one."""
    found = problem(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices, magnitude)
    if found is not None:
        raise ValueError(who + found)


def autocast(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """x, weight and bias in the autocast dtype when autocast is on for x's device (as ``F.linear`` is cast): under
    autocast a layer's input often arrives already in the autocast dtype while its frozen weight is fp32. LoRA
    parameters are never cast: fp32 ones over a 16-bit x are read as they are, and their gradients stay fp32."""
    if not _any_autocast():  # one cheap check for the usual case
        return x, weight, bias
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    if not torch.is_autocast_enabled(device_type) or x.dtype not in AUTOCAST_DTYPES:
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor | None) -> Tensor | None:
        return t.to(dtype) if t is not None and t.dtype in AUTOCAST_DTYPES else t
    return cast(x), cast(weight), cast(bias)


def seed_tensor(seed: int | Tensor | None, device: torch.device) -> Tensor:
    """The dropout seed as a 0-d int64 tensor. None draws one: from torch's default CPU generator (so
    ``torch.manual_seed`` makes runs repeat), or on ``device`` while a CUDA graph is being captured or
    ``torch.compile`` traces, so that every replay draws a fresh one there."""
    if seed is None:
        if device.type == "cuda" and (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
            return torch.randint(SEED_LIMIT, (), dtype=torch.int64, device=device)
        return torch.randint(SEED_LIMIT, (), dtype=torch.int64)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"seed must be an integer or a one-element integer tensor, got {seed.dtype} "
                             f"tensor of shape {shape_of(seed)}")
        on = device.type if seed.device.type == device.type else "cpu"
        return seed.reshape(()).to(device=on, dtype=torch.int64)
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None or not -2**63 <= value < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63) (int64), got {seed!r}")
    return torch.tensor(value, dtype=torch.int64)
