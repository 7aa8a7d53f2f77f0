"""The one fastlora op: ``lora_linear``, with autograd over every backend, eager and compiled.

In eager mode the op runs as a plain ``autograd.Function`` (the lowest per-call overhead).
Under ``torch.compile`` it runs as the torch custom ops ``fastlora::lora_linear`` and
``fastlora::lora_linear_backward`` (registered with ``torch.library`` with shape-only fake
implementations), so ``fullgraph=True`` traces models that use it. Both paths share the same
forward, context and gradient code. :func:`lora_linear` applies autocast, validates arguments,
draws the dropout seed, flattens leading dims and expands ``slices`` into a block-structured B.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.ops.dispatch import select
from fastlora.ops.reference import expand_slices, stack_slices

__all__ = ["expand_slices", "lora_linear", "stack_slices"]

_SEED_LIMIT = 2**62
_NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument when dropout is off (never read)
Slices = tuple[bool, ...] | None


class _LoraLinearFunction(torch.autograd.Function):
    """The eager path: forward and backward straight to the selected backend. A backend with
    ``forward_for_backward`` also returns tensors it prepared for its backward (the triton backend: the
    low-rank product, B laid out for the backward GEMM, zeroed gradient buffers), saved with the inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices):
        backend = select(x)
        prepare = getattr(backend, "forward_for_backward", None)
        if prepare is None:
            out, saved = backend.forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices), ()
        else:
            needs = ctx.needs_input_grad
            out, saved = prepare(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices,
                                 (needs[0], needs[3], needs[4]))
        ctx.backend, ctx.scale, ctx.dropout_p, ctx.slices, ctx.fresh = backend, scale, dropout_p, slices, True
        ctx.save_for_backward(x, weight, lora_A, lora_B, seed, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, seed, *saved = ctx.saved_tensors
        if not ctx.fresh:  # a second backward through the same graph: the prepared buffers were consumed
            saved = ()
        ctx.fresh = False
        needs = _needs(ctx)
        dx, dA, dB = ctx.backend.backward(grad_out.contiguous(), x, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p,
                                          seed, needs, ctx.slices, tuple(saved))
        return dx, None, None, dA, dB, None, None, None, None


def _needs(ctx) -> tuple[bool, bool, bool]:
    """(dx, dA, dB) asked for; W and b must be frozen."""
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    if need_dW or need_db:
        raise RuntimeError("fastlora keeps weight and bias frozen: set requires_grad=False on them")
    return need_dx, need_dA, need_dB


def _slices_arg(slices: list[bool] | None) -> Slices:
    return None if slices is None else tuple(slices)


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    scale: float, dropout_p: float, seed: Tensor, slices: list[bool] | None) -> Tensor:
    return select(x).forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, _slices_arg(slices))


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             scale: float, dropout_p: float, seed: Tensor, slices: list[bool] | None,
                             need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = select(x).backward(grad_out.contiguous(), x, weight, lora_A, lora_B, scale, dropout_p, seed,
                               (need_dx, need_dA, need_dB), _slices_arg(slices))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_lora_linear_backward_op.register_fake
def _(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, seed, slices, need_dx, need_dA, need_dB):
    def maybe(needed, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if needed else x.new_empty(0)
    return maybe(need_dx, x), maybe(need_dA, lora_A), maybe(need_dB, lora_B)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, lora_A, lora_B, scale, dropout_p, seed, slices = inputs
    ctx.scale, ctx.dropout_p, ctx.slices = scale, dropout_p, slices
    ctx.save_for_backward(x, weight, lora_A, lora_B, seed)


def _compiled_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, seed = ctx.saved_tensors
    dx, dA, dB = _lora_linear_backward_op(grad_out, x, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p, seed,
                                          ctx.slices, *_needs(ctx))
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None), None, None, (dA if needs[3] else None), (dB if needs[4] else None), \
        None, None, None, None


_lora_linear_op.register_autograd(_compiled_backward, setup_context=_setup_context)


def _apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices, backend=None) -> Tensor:
    """The custom op while torch.compile traces; else the autograd.Function, or the bare forward
    (of ``backend`` when given) when no gradient is wanted: inference skips autograd's per-call bookkeeping."""
    if torch.compiler.is_compiling():
        return _lora_linear_op(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed,
                               None if slices is None else list(slices))
    if torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                    or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices)
    return (backend or select(x)).forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices)


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _validate(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices) -> None:
    """Raise a ValueError naming the argument and shapes for any inconsistent input.

    Messages are formatted only on failure: this runs on every call, so the usual case (no slices) is
    accepted by one expression first.
    """
    w_shape, a_shape, b_shape, dtype = weight.shape, lora_A.shape, lora_B.shape, x.dtype
    device = x.get_device()  # an int (-1: CPU), cheaper to compare than torch.device objects
    if (slices is None and len(w_shape) == len(a_shape) == len(b_shape) == 2 and x.ndim >= 1
            and x.shape[-1] == w_shape[1] == a_shape[1] and b_shape[0] == w_shape[0] and b_shape[1] == a_shape[0]
            and weight.dtype is dtype and device == weight.get_device() == lora_A.get_device() == lora_B.get_device()
            and (bias is None or (bias.shape == w_shape[:1] and bias.dtype is dtype and bias.get_device() == device))
            and ((lora_A.dtype is dtype and lora_B.dtype is dtype)
                 or (dtype in _HALF_DTYPES and lora_A.dtype in (dtype, torch.float32)
                     and lora_B.dtype in (dtype, torch.float32)))
            and dtype in _FLOAT_DTYPES and 0.0 <= dropout_p < 1.0 and isinstance(scale, (int, float))
            and math.isfinite(scale)):
        return
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {_shape(weight)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dim must equal weight's in_features: x {_shape(x)}, weight {_shape(weight)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"bias must have shape ({out_features},) to match weight {_shape(weight)}, "
                         f"got {_shape(bias)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be (R, {in_features}) to match weight {_shape(weight)}, got {_shape(lora_A)}")
    groups, active = 1, 1
    if slices is not None:
        groups, active = len(slices), sum(map(bool, slices))
        if active < 1 or out_features % groups:
            raise ValueError(f"slices {list(slices)} must enable at least one of groups that divide "
                             f"out_features={out_features}")
    if lora_A.shape[0] % active:
        raise ValueError(f"lora_A's rows {lora_A.shape[0]} must be rank x {active} enabled slices, "
                         f"got {_shape(lora_A)}")
    expected_B = (out_features // groups * active, lora_A.shape[0] // active)
    if lora_B.dim() != 2 or tuple(lora_B.shape) != expected_B:
        raise ValueError(f"lora_B must have shape {expected_B} for weight {_shape(weight)}, lora_A {_shape(lora_A)} "
                         f"and slices {None if slices is None else list(slices)}, got {_shape(lora_B)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device} (all must match)")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != x.device or (t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in _HALF_DTYPES)):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device} (LoRA parameters "
                             "must be on x's device, in x's dtype or float32 over a 16-bit x)")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(scale, (int, float)) or not abs(float(scale)) < float("inf"):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_any_autocast = torch._C._is_any_autocast_enabled  # whether autocast is on for any device
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.bfloat16))


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
    """x, weight and bias in the autocast dtype when autocast is on for x's device (as ``F.linear``
    is cast): under autocast a layer's input often arrives already in the autocast dtype while its
    frozen weight is fp32. LoRA parameters are never cast: the backends read fp32 ones over a 16-bit
    x as they are, compute in x's dtype and return fp32 gradients (as peft keeps them)."""
    if not _any_autocast():  # one cheap check for the usual case
        return x, weight, bias
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    if not torch.is_autocast_enabled(device_type) or x.dtype not in _AUTOCAST_DTYPES:
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor | None) -> Tensor | None:
        return t.to(dtype) if t is not None and t.dtype in _AUTOCAST_DTYPES else t
    return cast(x), cast(weight), cast(bias)


def _seed_tensor(seed: int | Tensor | None, device: torch.device) -> Tensor:
    """The dropout seed as a 0-d int64 tensor. None draws one: from torch's default CPU generator
    (so ``torch.manual_seed`` makes runs repeat), or on ``device`` while a CUDA graph is being captured
    or ``torch.compile`` traces, so that every replay draws a fresh one there."""
    if seed is None:
        if device.type == "cuda" and (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
            return torch.randint(_SEED_LIMIT, (), dtype=torch.int64, device=device)
        return torch.randint(_SEED_LIMIT, (), dtype=torch.int64)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"seed must be an integer or a one-element integer tensor, got {seed.dtype} "
                             f"tensor of shape {_shape(seed)}")
        return seed.reshape(()).to(dtype=torch.int64) if seed.device.type == device.type else \
            seed.reshape(()).to(device="cpu", dtype=torch.int64)
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None or not -2**63 <= value < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63) (int64), got {seed!r}")
    return torch.tensor(value, dtype=torch.int64)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = True,
                seed: int | Tensor | None = None, slices: Sequence[bool] | None = None) -> Tensor:
    """``x @ weight.T + bias + scale * (dropout(x) @ lora_A.T) @ lora_B.T`` in one fused pass.

    Args:
        x: ``(..., in)`` input, any strides.
        weight: frozen ``(out, in)`` base weight (a transposed view, as of a ``Conv1D``, is fine).
        bias: frozen ``(out,)`` bias or None.
        lora_A: ``(R, in)``; with ``slices``, the enabled groups' ``A_g (r, in)`` stacked.
        lora_B: ``(out, R)``; with ``slices``, the enabled groups' ``B_g (out/G, r)`` stacked.
        scale: the LoRA scaling, ``alpha / r`` (or ``alpha / sqrt(r)``).
        dropout_p: dropout probability on the LoRA branch's input (inverted dropout).
        training: dropout applies only when True.
        seed: dropout seed; the mask is a function of (seed, row, col). None draws one
            from torch's default CPU generator, so ``torch.manual_seed`` makes runs repeat.
        slices: split the output into ``len(slices)`` equal groups; only enabled groups get
            a LoRA update (e.g. ``[True, False, True]`` for q and v of GPT-2's ``c_attn``).
    Returns:
        ``(..., out)`` tensor in x's dtype (under autocast, the autocast dtype).
    """
    x, weight, bias = _autocast(x, weight, bias)
    if (slices is None and seed is None and (not training or dropout_p == 0) and 0.0 <= dropout_p < 1.0
            and isinstance(scale, (int, float)) and not torch.compiler.is_compiling()):
        # No dropout, so no seed to draw: a backend that checks every argument itself before it computes
        # anything (the cpu backend's extension) is called straight away; the checks here only word its error.
        backend = select(x)
        if getattr(backend, "CHECKS_ARGUMENTS", False):
            try:
                return _flat_apply(x, weight, bias, lora_A, lora_B, scale, 0.0, _NO_SEED, None, backend)
            except Exception:
                _validate(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices)
                raise
    _validate(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices)
    p = float(dropout_p) if training else 0.0
    seed_tensor = _seed_tensor(seed, x.device) if p > 0.0 or seed is not None else _NO_SEED
    if slices is not None:
        slices = tuple(bool(s) for s in slices)
    return _flat_apply(x, weight, bias, lora_A, lora_B, scale, p, seed_tensor, slices)


def _flat_apply(x, weight, bias, lora_A, lora_B, scale, p, seed, slices, backend=None) -> Tensor:
    """:func:`_apply` over x's rows: leading dims flattened, and restored on the output."""
    if x.ndim == 2:
        return _apply(x, weight, bias, lora_A, lora_B, float(scale), p, seed, slices, backend)
    flat = _apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, float(scale), p, seed, slices, backend)
    return flat.view(*x.shape[:-1], weight.shape[0])
