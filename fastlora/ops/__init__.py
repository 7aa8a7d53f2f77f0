"""The one fastlora op: ``lora_linear``, with autograd over every backend, eager and compiled.

In eager mode the op runs as a plain ``autograd.Function`` (the lowest per-call overhead). Under ``torch.compile``
it runs as the torch custom ops ``fastlora::lora_linear`` and ``fastlora::lora_linear_backward`` (registered with
``torch.library`` with shape-only fake implementations), so ``fullgraph=True`` traces models that use it. Both paths
share the backends' forward and backward. A backward taken with grad mode on (``create_graph=True``: a gradient
penalty) runs the reference's, which is itself differentiable, so second-order gradients are exact.

State kept between calls, all of it (anything else is computed anew on every call, from tensors read where they
live, so a write through ``.data``, a reused ``id()`` or a merge cannot make it stale):

- ``dispatch._CHOSEN``: the backend, by (``FASTLORA_BACKEND``, ``TRITON_INTERPRET``, device type, dtype), and
  ``dispatch.load``: each backend's module or why it failed to import. Settings, not tensor values.
- ``routing.AdapterRouting``: one mixed batch's routing, built by ``use_adapters`` from adapter ids it copies and
  owns, with its ``Rows`` per input shape and device. It lives as long as the batch's ``with`` block.
- ``triton.tuning``: ``_TUNERS`` / ``_CHOSEN``, the autotuner and the config it chose, by kernel role, shapes
  (N, K, small or large M), dtypes, padded rank and flags; ``_SEED_VARIANTS``, the seed-from-memory kernels
  compiled ahead; ``smem_limit``, ``sm_count``, ``fitting_tiles`` per device or tile family. ``single.layout``:
  the rank and slice layout of a call's shapes (integers only). ``single._capable``: a device's compute capability.
- ``accelerate._fused_class``: the peft subclass that runs the op, made once peft is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.ops import args, reference
from fastlora.ops.dispatch import select
from fastlora.ops.reference import expand_slices, stack_slices

__all__ = ["expand_slices", "lora_linear", "stack_slices"]

Slices = tuple[bool, ...] | None


def frozen_needs(needs_input_grad: Sequence[bool], dx: int, lora: Sequence[int],
                 frozen: Sequence[int]) -> tuple[bool, ...]:
    """``(dx, *lora grads)`` asked for, from an autograd context's ``needs_input_grad`` at those positions; an
    error when a frozen input (W, b) asks for one."""
    if any(needs_input_grad[i] for i in frozen):
        raise RuntimeError("fastlora keeps weight and bias frozen: set requires_grad=False on them")
    return (needs_input_grad[dx], *(needs_input_grad[i] for i in lora))


class _LoraLinearFunction(torch.autograd.Function):
    """The eager path: forward and backward straight to the selected backend (DoRA's functions when a magnitude is
    given), with what its forward prepared for the backward (the triton backend: the low-rank product, B laid out,
    zeroed gradient buffers; DoRA: the norms and the pre-scale output) saved too."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices):
        backend = select(x)
        needs = ctx.needs_input_grad
        if magnitude is None:
            out, saved = backend.forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices,
                                         (needs[0], needs[3], needs[4]))
        else:
            out, saved = backend.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed,
                                              slices, (needs[0], needs[3], needs[4], needs[5]))
        ctx.backend, ctx.scale, ctx.dropout_p, ctx.slices, ctx.fresh = backend, scale, dropout_p, slices, True
        ctx.dora = magnitude is not None
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, seed, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, magnitude, seed, *saved = ctx.saved_tensors
        if not ctx.fresh:  # a second backward through the same graph: the prepared buffers were consumed
            saved = ()
        ctx.fresh = False
        backend = reference if torch.is_grad_enabled() else ctx.backend  # grad mode on: differentiable
        if not ctx.dora:
            needs = frozen_needs(ctx.needs_input_grad, 0, (3, 4), (1, 2))
            dx, dA, dB = backend.backward(grad_out.contiguous(), x, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p,
                                          seed, needs, ctx.slices, () if backend is reference else tuple(saved))
            return dx, None, None, dA, dB, None, None, None, None, None
        needs = frozen_needs(ctx.needs_input_grad, 0, (3, 4, 5), (1, 2))
        dx, dA, dB, dm = backend.dora_backward(grad_out.contiguous(), x, weight, lora_A, lora_B, magnitude,
                                               ctx.scale, ctx.dropout_p, seed, needs, ctx.slices,
                                               tuple(saved) if backend is ctx.backend and not torch.is_grad_enabled()
                                               else ())
        return dx, None, None, dA, dB, dm, None, None, None, None


def _slices_arg(slices: list[bool] | None) -> Slices:
    return None if slices is None else tuple(slices)


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor | None, scale: float, dropout_p: float, seed: Tensor,
                    slices: list[bool] | None) -> Tensor:
    backend = select(x)
    if magnitude is None:
        return backend.forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, _slices_arg(slices), None)[0]
    return backend.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed,
                                _slices_arg(slices), None)[0]


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             magnitude: Tensor | None, scale: float, dropout_p: float, seed: Tensor,
                             slices: list[bool] | None, need_dx: bool, need_dA: bool, need_dB: bool,
                             need_dm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend, grad_out = select(x), grad_out.contiguous()
    if magnitude is None:
        grads = (*backend.backward(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, seed,
                                   (need_dx, need_dA, need_dB), _slices_arg(slices), ()), None)
    else:
        grads = backend.dora_backward(grad_out, x, weight, lora_A, lora_B, magnitude, scale, dropout_p, seed,
                                      (need_dx, need_dA, need_dB, need_dm), _slices_arg(slices), ())
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_lora_linear_backward_op.register_fake
def _(grad_out, x, weight, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices, need_dx, need_dA, need_dB,
      need_dm):
    def maybe(needed, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if needed else x.new_empty(0)
    return maybe(need_dx, x), maybe(need_dA, lora_A), maybe(need_dB, lora_B), \
        maybe(need_dm and magnitude is not None, magnitude if magnitude is not None else x)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices = inputs
    ctx.scale, ctx.dropout_p, ctx.slices = scale, dropout_p, slices
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, seed)


def _compiled_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, magnitude, seed = ctx.saved_tensors
    needs = frozen_needs(ctx.needs_input_grad, 0, (3, 4, 5), (1, 2))
    if torch.is_grad_enabled():  # differentiable: the reference's torch ops
        slices = _slices_arg(ctx.slices)
        if magnitude is None:
            dx, dA, dB = reference.backward(grad_out, x, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p, seed,
                                            needs[:3], slices)
            dm = None
        else:
            dx, dA, dB, dm = reference.dora_backward(grad_out, x, weight, lora_A, lora_B, magnitude, ctx.scale,
                                                     ctx.dropout_p, seed, needs, slices)
    else:
        dx, dA, dB, dm = _lora_linear_backward_op(grad_out, x, weight, lora_A, lora_B, magnitude, ctx.scale,
                                                  ctx.dropout_p, seed, ctx.slices, *needs)
    return (dx if needs[0] else None), None, None, (dA if needs[1] else None), (dB if needs[2] else None), \
        (dm if needs[3] and magnitude is not None else None), None, None, None, None


_lora_linear_op.register_autograd(_compiled_backward, setup_context=_setup_context)


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _apply(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices, backend=None) -> Tensor:
    """The custom op while torch.compile traces; else the autograd.Function, or the bare forward (of ``backend``
    when given) when no gradient is wanted: inference skips autograd's per-call bookkeeping."""
    if torch.compiler.is_compiling():
        return _lora_linear_op(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed,
                               None if slices is None else list(slices))
    if _wants_grad(x, lora_A, lora_B, magnitude, weight, bias):
        return _LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices)
    backend = backend or select(x)
    if magnitude is None:
        return backend.forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices, None)[0]
    return backend.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices, None)[0]


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = True,
                seed: int | Tensor | None = None, slices: Sequence[bool] | None = None,
                magnitude: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias + scale * (dropout(x) @ lora_A.T) @ lora_B.T`` in one fused pass (DoRA with ``magnitude``).

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
        magnitude: DoRA's trainable magnitude m, one per output feature (with slices: per feature of the enabled
            groups, stacked as lora_B's rows). Then, as peft computes DoRA, with ``n_i = |W_i + scale B_i A|``
            (detached) and ``x_d = dropout(x)``: ``y = x W^T + b + (m/n - 1) x_d W^T + (m/n) scale x_d A^T B^T``;
            without dropout ``y = (m/n) (x W^T + scale x A^T B^T) + b``.
    Returns:
        ``(..., out)`` tensor in x's dtype (under autocast, the autocast dtype).
    """
    x, weight, bias = args.autocast(x, weight, bias)
    if (slices is None and seed is None and magnitude is None and (not training or dropout_p == 0)
            and not torch.compiler.is_compiling()
            and isinstance(scale, (int, float)) and isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        # No dropout, so no seed to draw: a backend that checks every argument itself before it computes
        # anything (the cpu backend's extension) is called straight away; the checks here only word its error.
        try:
            backend = select(x)
            if backend.CHECKS_ARGUMENTS:
                return _flat_apply(x, weight, bias, lora_A, lora_B, None, float(scale), 0.0, args.NO_SEED, None,
                                   backend)
        except Exception:
            args.check(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices)
            raise
    args.check(x, weight, bias, lora_A, lora_B, scale, dropout_p, slices, magnitude=magnitude)
    p = float(dropout_p) if training else 0.0
    seed_tensor = args.seed_tensor(seed, x.device) if p > 0.0 or seed is not None else args.NO_SEED
    if slices is not None:
        slices = tuple(bool(s) for s in slices)
    if isinstance(scale, int):
        scale = float(scale)
    return _flat_apply(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed_tensor, slices)


def _flat_apply(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, slices, backend=None) -> Tensor:
    """:func:`_apply` over x's rows: leading dims flattened, and restored on the output."""
    if x.ndim == 2:
        return _apply(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, slices, backend)
    flat = _apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, magnitude, scale, p, seed, slices,
                  backend)
    return flat.view(*x.shape[:-1], weight.shape[0])
