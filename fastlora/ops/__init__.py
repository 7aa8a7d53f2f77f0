"""The one fastlora op: ``lora_linear``, with autograd over every backend, eager and compiled.

In eager mode the op runs as a plain ``autograd.Function`` (the lowest per-call overhead).
Under ``torch.compile`` it runs as the torch custom ops ``fastlora::lora_linear`` and
``fastlora::lora_linear_backward`` (registered with ``torch.library`` with shape-only fake
implementations), so ``fullgraph=True`` traces models that use it. Both paths share the same
forward, context and gradient code. :func:`lora_linear` applies autocast, validates arguments,
draws the dropout seed, flattens leading dims and expands ``slices`` into a block-structured B.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.ops.dispatch import select

_SEED_LIMIT = 2**62
_NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument when dropout is off (never read)


def _run_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    return select(x).forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


def _run_backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                  dropout_p: float, seed: Tensor, need_dx: bool, need_dA: bool, need_dB: bool):
    return select(x).backward(grad_out.contiguous(), x, weight, lora_A, lora_B, scale, dropout_p, seed,
                              (need_dx, need_dA, need_dB))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.save_for_backward(x, weight, lora_A, lora_B, seed)


def _gradients(ctx, grad_out: Tensor, run_backward) -> tuple:
    """The op's input gradients (dx, dA, dB; None for the rest) through ``run_backward``."""
    x, weight, lora_A, lora_B, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    if need_dW or need_db:
        raise RuntimeError("fastlora keeps weight and bias frozen: set requires_grad=False on them")
    dx, dA, dB = run_backward(grad_out, x, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p, seed,
                              need_dx, need_dA, need_dB)
    return (dx if need_dx else None), None, None, (dA if need_dA else None), (dB if need_dB else None), \
        None, None, None


class _LoraLinearFunction(torch.autograd.Function):
    """The eager path: forward and backward straight to the selected backend."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        out = _run_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, scale, dropout_p, seed), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _gradients(ctx, grad_out, _run_backward)


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    return _run_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             scale: float, dropout_p: float, seed: Tensor,
                             need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _run_backward(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, seed, need_dx, need_dA, need_dB)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_lora_linear_backward_op.register_fake
def _(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, seed, need_dx, need_dA, need_dB):
    def maybe(needed, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if needed else x.new_empty(0)
    return maybe(need_dx, x), maybe(need_dA, lora_A), maybe(need_dB, lora_B)


_lora_linear_op.register_autograd(lambda ctx, grad_out: _gradients(ctx, grad_out, _lora_linear_backward_op),
                                  setup_context=_setup_context)


def _apply(*args) -> Tensor:
    """The custom op while torch.compile traces; else the autograd.Function, or the bare forward
    when no gradient is wanted (inference skips autograd's per-call bookkeeping)."""
    if torch.compiler.is_compiling():
        return _lora_linear_op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        return _LoraLinearFunction.apply(*args)
    return _run_forward(*args)


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _validate(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices) -> None:
    """Raise a ValueError naming the argument and shapes for any inconsistent input.

    Messages are formatted only on failure: this runs on every call.
    """
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
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device} (all must match)")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(scale, (int, float)) or not abs(float(scale)) < float("inf"):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _cast_fp32(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t.to(dtype) if t is not None and t.dtype == torch.float32 else t


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None) -> tuple:
    """Every floating operand in the autocast dtype when autocast is on for x's device (as ``F.linear``
    is cast). Under autocast a layer's input often arrives already in the autocast dtype while its
    frozen weight and LoRA parameters are fp32. Without autocast, fp32 LoRA parameters of a 16-bit
    layer (as peft keeps them) compute in the layer's dtype. The casts are differentiable, so fp32
    LoRA parameters get fp32 gradients."""
    if not (torch.is_autocast_enabled(x.device.type) and x.dtype in _AUTOCAST_DTYPES):
        if x.dtype in _HALF_DTYPES and weight.dtype == x.dtype:  # fp32 LoRA parameters over a 16-bit base layer
            return x, weight, bias, _cast_fp32(lora_A, x.dtype), _cast_fp32(lora_B, x.dtype)
        return x, weight, bias, lora_A, lora_B
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t: Tensor | None) -> Tensor | None:
        return t.to(dtype) if t is not None and t.dtype in _AUTOCAST_DTYPES else t
    return cast(x), cast(weight), cast(bias), cast(lora_A), cast(lora_B)


def _seed_tensor(seed: int | Tensor | None) -> Tensor:
    """The dropout seed as a 0-d int64 CPU tensor: drawn from torch's default generator when None."""
    if seed is None:
        return torch.randint(_SEED_LIMIT, (), dtype=torch.int64)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"seed must be an integer or a one-element integer tensor, got {seed.dtype} "
                             f"tensor of shape {_shape(seed)}")
        return seed.reshape(()).to(device="cpu", dtype=torch.int64)
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None or not -2**63 <= value < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63) (int64), got {seed!r}")
    return torch.tensor(value, dtype=torch.int64)


def expand_slices(lora_B: Tensor, slices: Sequence[bool], out_features: int) -> Tensor:
    """Block-structured ``(out, r * enabled)`` B from the stacked per-slice ``(out/G * enabled, r)`` B.

    Group g's rows take its own B_g in its own rank columns; a disabled group's rows are zero.
    """
    groups, rank = len(slices), lora_B.shape[1]
    enabled = [g for g, on in enumerate(slices) if on]
    rows = out_features // groups
    full = lora_B.new_zeros(groups, rows, len(enabled), rank)
    full[enabled, :, range(len(enabled)), :] = lora_B.view(len(enabled), rows, rank)
    return full.view(out_features, len(enabled) * rank)


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
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    _validate(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices)
    p = float(dropout_p) if training else 0.0
    seed_tensor = _seed_tensor(seed) if p > 0.0 or seed is not None else _NO_SEED
    out_features = weight.shape[0]
    if slices is not None:
        lora_B = expand_slices(lora_B, slices, out_features)
    flat = _apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, float(scale), p, seed_tensor)
    return flat.view(*x.shape[:-1], out_features)
