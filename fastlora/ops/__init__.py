"""The one fastlora op: ``lora_linear``, a torch custom op with autograd over every backend.

``torch.ops.fastlora.lora_linear`` (2-D, dense rank-R update) and its backward are
registered with ``torch.library`` together with shape-only fake implementations, so
``torch.compile(fullgraph=True)`` traces through models that use them. The Python function
:func:`lora_linear` validates arguments, applies autocast, draws the dropout seed, flattens
leading dims and expands ``slices`` into a block-structured B before calling the op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.ops.dispatch import select

_SEED_LIMIT = 2**62


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    return select(x).forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             scale: float, dropout_p: float, seed: Tensor,
                             need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = select(x).backward(grad_out.contiguous(), x, weight, lora_A, lora_B, scale, dropout_p, seed,
                               (need_dx, need_dA, need_dB))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_lora_linear_backward_op.register_fake
def _(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, seed, need_dx, need_dA, need_dB):
    def maybe(needed, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if needed else x.new_empty(0)
    return maybe(need_dx, x), maybe(need_dA, lora_A), maybe(need_dB, lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.save_for_backward(x, weight, lora_A, lora_B, seed)


def _backward(ctx, grad_out):
    x, weight, lora_A, lora_B, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    if need_dW or need_db:
        raise RuntimeError("fastlora keeps weight and bias frozen: set requires_grad=False on them")
    dx, dA, dB = _lora_linear_backward_op(grad_out, x, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p,
                                          seed, need_dx, need_dA, need_dB)
    return (dx if need_dx else None), None, None, (dA if need_dA else None), (dB if need_dB else None), \
        None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _validate(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices) -> None:
    """Raise a ValueError naming the argument and shapes for any inconsistent input."""
    _check(x.dim() >= 1, f"x must have at least one dim, got shape {_shape(x)}")
    _check(weight.dim() == 2, f"weight must be 2-D (out, in), got shape {_shape(weight)}")
    out_features, in_features = weight.shape
    _check(x.shape[-1] == in_features,
           f"x's last dim must equal weight's in_features: x {_shape(x)}, weight {_shape(weight)}")
    _check(bias is None or tuple(bias.shape) == (out_features,),
           f"bias must have shape ({out_features},) to match weight {_shape(weight)}, got {_shape(bias)}")
    _check(lora_A.dim() == 2 and lora_A.shape[1] == in_features,
           f"lora_A must be (R, {in_features}) to match weight {_shape(weight)}, got {_shape(lora_A)}")
    groups = len(slices) if slices is not None else 1
    active = sum(map(bool, slices)) if slices is not None else 1
    if slices is not None:
        _check(groups >= 1 and active >= 1 and out_features % groups == 0,
               f"slices {list(slices)} must enable at least one of groups that divide out_features={out_features}")
    _check(lora_A.shape[0] % active == 0,
           f"lora_A's rows {lora_A.shape[0]} must be rank x {active} enabled slices, got {_shape(lora_A)}")
    rank = lora_A.shape[0] // active
    expected_B = (out_features // groups * active, rank)
    _check(lora_B.dim() == 2 and tuple(lora_B.shape) == expected_B,
           f"lora_B must have shape {expected_B} for weight {_shape(weight)}, lora_A {_shape(lora_A)} "
           f"and slices {None if slices is None else list(slices)}, got {_shape(lora_B)}")
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, t in tensors.items():
        if t is None:
            continue
        _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
        _check(t.dtype == x.dtype, f"{name} has dtype {t.dtype} but x has {x.dtype} (all must match)")
    _check(x.dtype.is_floating_point, f"x must be floating point, got {x.dtype}")
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    _check(isinstance(scale, (int, float)) and abs(float(scale)) < float("inf"),
           f"scale must be a finite number, got {scale!r}")


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
    _validate(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices)
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point:
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(dtype) if bias is not None else None
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        seed_tensor = torch.zeros((), dtype=torch.int64)
    elif seed is None:
        seed_tensor = torch.randint(_SEED_LIMIT, (), dtype=torch.int64)
    else:
        seed_tensor = torch.as_tensor(seed, dtype=torch.int64).cpu()
    out_features = weight.shape[0]
    if slices is not None:
        lora_B = expand_slices(lora_B, slices, out_features)
    flat = _lora_linear_op(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, float(scale), p, seed_tensor)
    return flat.view(*x.shape[:-1], out_features)
