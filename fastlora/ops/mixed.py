"""``lora_linear_mixed``: one base layer, several adapters, each row of the batch with its own adapter (or none).

Row i gets ``x_i W^T + b + s_a * dropout(x_i) A_a^T B_a^T`` with ``a = adapter_ids[i]`` (-1: the base
alone); each adapter's gradients come from its own rows only, so several adapters can train in one batch.
With every row naming the same adapter it computes what :func:`fastlora.lora_linear` computes, to rounding, with
the same dropout mask: a row's mask depends on (seed, row, col), not on which adapters share the batch.

Backends provide ``forward_mixed`` / ``backward_mixed``; one that has none would run the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.ops import _HALF_DTYPES, _NO_SEED, _autocast, _seed_tensor, _validate, expand_slices
from fastlora.ops import reference as _reference
from fastlora.ops.dispatch import select
from fastlora.ops.reference import TensorCache


def _backend(x: Tensor):
    backend = select(x)
    return backend if hasattr(backend, "forward_mixed") else _reference


class _Settings:
    """The per-adapter floats an autograd context keeps (tensors go through save_for_backward), and which
    adapters some row names (known on the host: the backward then needs no device-to-host read)."""

    __slots__ = ("dropout_ps", "named", "scales")

    def __init__(self, scales: list[float], dropout_ps: list[float], named: list[bool]) -> None:
        self.scales, self.dropout_ps, self.named = scales, dropout_ps, named


class _LoraLinearMixedFunction(torch.autograd.Function):
    """Autograd over a backend's ``forward_mixed`` / ``backward_mixed``; W and b stay frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, adapter_ids, seed, settings, *lora):
        n = len(settings.scales)
        out = _backend(x).forward_mixed(x, weight, bias, list(lora[:n]), list(lora[n:]), settings.scales,
                                        settings.dropout_ps, adapter_ids, seed)
        ctx.settings = settings
        ctx.save_for_backward(x, weight, adapter_ids, seed, *lora)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, adapter_ids, seed, *lora = ctx.saved_tensors
        settings, needs = ctx.settings, ctx.needs_input_grad
        n = len(settings.scales)
        if needs[1] or needs[2]:
            raise RuntimeError("fastlora keeps weight and bias frozen: set requires_grad=False on them")
        need_lora = [(needs[6 + a] or needs[6 + n + a]) and settings.named[a] for a in range(n)]
        dx, dAs, dBs = _backend(x).backward_mixed(grad_out.contiguous(), x, weight, lora[:n], lora[n:],
                                                  settings.scales, settings.dropout_ps, adapter_ids, seed,
                                                  needs[0], need_lora)
        return (dx if needs[0] else None), None, None, None, None, None, *dAs, *dBs


def _row_ids(adapter_ids: Tensor, x: Tensor, adapters: int) -> Tensor:
    """``adapter_ids`` (over a prefix of x's leading dims) as one int64 id per row of the flattened x."""
    lead = x.shape[:-1]
    if (not isinstance(adapter_ids, Tensor) or adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex
            or adapter_ids.dtype == torch.bool):
        raise ValueError(f"adapter_ids must be an integer tensor, got {adapter_ids!r:.80}")
    k = adapter_ids.dim()
    if k < 1 or k > len(lead) or tuple(adapter_ids.shape) != tuple(lead[:k]):
        raise ValueError(f"adapter_ids must have the shape of x's leading dims or a prefix of them (one id per "
                         f"row or per sequence): x {tuple(x.shape)}, adapter_ids {tuple(adapter_ids.shape)}")
    if adapter_ids.numel() and not -1 <= int(adapter_ids.min()) <= int(adapter_ids.max()) < adapters:
        raise ValueError(f"adapter_ids must be in [-1, {adapters}) for {adapters} adapters (-1: no adapter), "
                         f"got values from {int(adapter_ids.min())} to {int(adapter_ids.max())}")
    ids = adapter_ids.to(device=x.device, dtype=torch.int64, non_blocking=True)
    return ids.reshape(*ids.shape, *[1] * (len(lead) - k)).expand(lead).reshape(-1)


_ROUTES = TensorCache(256)  # per batch: each ids tensor's rows on the device, and which adapters are named


def _routing(adapter_ids: Tensor, x: Tensor, adapters: int) -> tuple[Tensor, list[bool]]:
    """``(one int64 id per row of the flattened x on x's device, which adapters some row names)``, checked and
    computed once for an ids tensor (at its version) and kept for every later call with it: the layers of a model
    in :func:`fastlora.use_adapters` share one, so a batch moves its ids to the device and checks them once, and
    a captured decode step finds them there."""
    def route():
        return _row_ids(adapter_ids, x, adapters), _named(adapter_ids, adapters)
    if not isinstance(adapter_ids, Tensor):
        return route()  # which raises, naming the argument
    return _ROUTES.get([adapter_ids], route, (tuple(x.shape[:-1]), x.device, adapters))


def _named(adapter_ids: Tensor, adapters: int) -> list[bool]:
    """Which adapters some row names: from the ids where they are given (ids on the GPU are read back once;
    ids on the CPU, as :func:`fastlora.use_adapters` keeps them, cost no device-to-host read)."""
    counts = torch.bincount(adapter_ids.reshape(-1).to(torch.int64) + 1, minlength=adapters + 1)[1:]
    return [bool(c) for c in counts.tolist()]


_EXPANDED = TensorCache(4096)  # inference: block-structured B's of sliced adapters


def _dense_B(B: Tensor, slices: Sequence[bool] | None, out_features: int) -> Tensor:
    """B as the mixed backends take it: block-structured for a sliced adapter. Without autograd the expansion is
    kept while B is the same tensor at the same version (decoding expands it once, and a captured decode step
    needs none)."""
    if slices is None:
        return B
    if torch.is_grad_enabled() and B.requires_grad:
        return expand_slices(B, slices, out_features)
    return _EXPANDED.get([B], lambda: expand_slices(B, slices, out_features), (tuple(slices), out_features))


def _in_dtype_of(t: Tensor, x: Tensor) -> Tensor:
    """An fp32 LoRA parameter over a 16-bit x cast (differentiably) to x's dtype, for the mixed kernels."""
    return t.to(x.dtype) if t.dtype == torch.float32 and x.dtype in _HALF_DTYPES else t


def _like_the_first(A: Tensor, B: Tensor, first: tuple[Tensor, Tensor], scale, dropout_p, slices, first_slices) -> bool:
    """Whether an adapter passes what :func:`_validate` checks, given that the first adapter did: the same
    layout of A and B up to the rank, dtype and device, with a finite scale and a dropout in [0, 1)."""
    A0, B0 = first
    rank_ok = A.dim() == 2 and B.dim() == 2 and A.shape[0] * B0.shape[1] == B.shape[1] * A0.shape[0]
    return (rank_ok and A.shape[1] == A0.shape[1] and B.shape[0] == B0.shape[0] and A.dtype == A0.dtype
            and B.dtype == B0.dtype and A.device == A0.device and B.device == B0.device and slices == first_slices
            and isinstance(scale, (int, float)) and math.isfinite(scale) and 0.0 <= dropout_p < 1.0)


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: Sequence[Tensor],
                      lora_Bs: Sequence[Tensor], scales: Sequence[float], adapter_ids: Tensor,
                      dropout_ps: Sequence[float] | float = 0.0, training: bool = True,
                      seed: int | Tensor | None = None,
                      slices: Sequence[Sequence[bool] | None] | None = None) -> Tensor:
    """The LoRA linear with a different adapter per row: ``y_i = x_i W^T + b + s_a dropout(x_i) A_a^T B_a^T``.

    Args:
        x: ``(..., in)`` input.
        weight, bias: the frozen base layer, as in :func:`fastlora.lora_linear`.
        lora_As, lora_Bs, scales: adapter a's ``A_a (R_a, in)``, ``B_a (out, R_a)`` and scale; ranks may
            differ. With ``slices[a]``, A_a and B_a are stacked per enabled slice as in ``lora_linear``.
        adapter_ids: integer ids with the shape of x's leading dims, or of a prefix of them (e.g.
            ``(batch,)`` for ``x: (batch, seq, in)``: one adapter per sequence); -1 means no adapter.
        dropout_ps: each adapter's dropout probability (or one for all); applied only when ``training``.
        seed: dropout seed, as in ``lora_linear`` (None draws one from torch's default generator).
        slices: each adapter's output groups, or None.
    Returns:
        ``(..., out)`` in x's dtype (under autocast, the autocast dtype).
    """
    n = len(lora_As)
    if isinstance(dropout_ps, (int, float)):
        dropout_ps = [float(dropout_ps)] * n
    slices = list(slices) if slices is not None else [None] * n
    if not (len(lora_Bs) == len(scales) == len(dropout_ps) == len(slices) == n):
        raise ValueError(f"lora_As, lora_Bs, scales, dropout_ps and slices need one entry per adapter, got "
                         f"{n}, {len(lora_Bs)}, {len(scales)}, {len(dropout_ps)} and {len(slices)}")
    x, weight, bias = _autocast(x, weight, bias)
    if getattr(_backend(x), "TAKES_FP32_LORA", False):
        lora = list(zip(lora_As, lora_Bs, strict=True))
    else:
        lora = [(_in_dtype_of(A, x), _in_dtype_of(B, x)) for A, B in zip(lora_As, lora_Bs, strict=True)]
    for a, (A, B) in enumerate(lora):
        if a == 0 or not _like_the_first(A, B, lora[0], scales[a], dropout_ps[a], slices[a], slices[0]):
            try:  # the full check, with its message; adapters shaped like the first one only get the quick one
                _validate(x, weight, bias, A, B, scales[a], dropout_ps[a], slices[a])
            except ValueError as error:
                raise ValueError(f"adapter {a}: {error}") from None
    ids, named = _routing(adapter_ids, x, n)
    ps = [float(p) if training else 0.0 for p in dropout_ps]
    seed_tensor = _seed_tensor(seed, x.device) if any(ps) or seed is not None else _NO_SEED
    out_features = weight.shape[0]
    As = [A for A, _ in lora]
    Bs = [_dense_B(B, s, out_features) for (_, B), s in zip(lora, slices, strict=True)]
    flat_x = x.reshape(-1, x.shape[-1])
    settings = _Settings([float(s) for s in scales], ps, named)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, *As, *Bs)):
        flat = _LoraLinearMixedFunction.apply(flat_x, weight, bias, ids, seed_tensor, settings, *As, *Bs)
    else:
        flat = _backend(flat_x).forward_mixed(flat_x, weight, bias, As, Bs, settings.scales, ps, ids, seed_tensor)
    return flat.view(*x.shape[:-1], out_features)
