"""``lora_linear_mixed``: one base layer, several adapters, each row of the batch with its own adapter (or none).

Row i gets ``x_i W^T + b + s_a * dropout(x_i) A_a^T B_a^T`` with ``a = adapter_ids[i]`` (-1: the base
alone); each adapter's gradients come from its own rows only, so several adapters can train in one batch.
With every row naming the same adapter it computes what :func:`fastlora.lora_linear` computes, to rounding, with
the same dropout mask: a row's mask depends on (seed, row, col), not on which adapters share the batch.
The adapters' tensors are read where they live on every call: nothing derived from them is kept between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.ops import args, reference
from fastlora.ops.dispatch import select
from fastlora.ops.reference import dora_factor, dora_norm, expand_slices
from fastlora.ops.routing import AdapterRouting, Rows


class _Settings:
    """The per-adapter floats and the routing an autograd context keeps (tensors go through save_for_backward);
    ``dora``: some adapter is DoRA, whose mixed batches run on the reference's torch ops."""

    __slots__ = ("dora", "dropout_ps", "rows", "scales")

    def __init__(self, scales: list[float], dropout_ps: list[float], rows: Rows, dora: bool) -> None:
        self.scales, self.dropout_ps, self.rows, self.dora = scales, dropout_ps, rows, dora

    def backend(self, x: Tensor):
        return reference if self.dora else select(x)


class _LoraLinearMixedFunction(torch.autograd.Function):
    """Autograd over a backend's ``forward_mixed`` / ``backward_mixed``; W and b stay frozen. ``lora``: the
    adapters' A's, then B's, then (DoRA) their factors m / n or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, seed, settings, *lora):
        n = len(settings.scales)
        As, Bs, factors = list(lora[:n]), list(lora[n:2 * n]), list(lora[2 * n:])
        backend = settings.backend(x)
        if settings.dora:
            out = backend.forward_mixed(x, weight, bias, As, Bs, settings.scales, settings.dropout_ps, settings.rows,
                                        seed, factors)
        else:
            out = backend.forward_mixed(x, weight, bias, As, Bs, settings.scales, settings.dropout_ps, settings.rows,
                                        seed)
        ctx.settings = settings
        ctx.save_for_backward(x, weight, seed, *lora)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, seed, *lora = ctx.saved_tensors
        settings, needs = ctx.settings, ctx.needs_input_grad
        n = len(settings.scales)
        if needs[1] or needs[2]:
            raise RuntimeError("fastlora keeps weight and bias frozen: set requires_grad=False on them")
        named = settings.rows.named
        wants = [needs[5 + a] or needs[5 + n + a] or (settings.dora and needs[5 + 2 * n + a]) for a in range(n)]
        need_lora = [want and named[a] for a, want in enumerate(wants)]
        backend = reference if torch.is_grad_enabled() else settings.backend(x)  # grad mode on: differentiable
        As, Bs, rest = lora[:n], lora[n:2 * n], lora[2 * n:]
        common = (grad_out.contiguous(), x, weight, As, Bs, settings.scales, settings.dropout_ps, settings.rows, seed,
                  needs[0], need_lora)
        if settings.dora:
            dx, dAs, dBs, dcs = backend.backward_mixed(*common, rest)
            return (dx if needs[0] else None), None, None, None, None, *dAs, *dBs, *dcs
        dx, dAs, dBs = backend.backward_mixed(*common)
        return (dx if needs[0] else None), None, None, None, None, *dAs, *dBs


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: Sequence[Tensor],
                      lora_Bs: Sequence[Tensor], scales: Sequence[float], adapter_ids: Tensor | AdapterRouting,
                      dropout_ps: Sequence[float] | float = 0.0, training: bool = True,
                      seed: int | Tensor | None = None,
                      slices: Sequence[Sequence[bool] | None] | None = None,
                      magnitudes: Sequence[Tensor | None] | None = None) -> Tensor:
    """The LoRA linear with a different adapter per row: ``y_i = x_i W^T + b + s_a dropout(x_i) A_a^T B_a^T``.

    Args:
        x: ``(..., in)`` input.
        weight, bias: the frozen base layer, as in :func:`fastlora.lora_linear`.
        lora_As, lora_Bs, scales: adapter a's ``A_a (R_a, in)``, ``B_a (out, R_a)`` and scale; ranks may
            differ. With ``slices[a]``, A_a and B_a are stacked per enabled slice as in ``lora_linear``.
        adapter_ids: integer ids with the shape of x's leading dims, or of a prefix of them (e.g.
            ``(batch,)`` for ``x: (batch, seq, in)``: one adapter per sequence); -1 means no adapter. Or an
            :class:`~fastlora.ops.routing.AdapterRouting` of them, built once for a batch that many layers share
            (ids given as a GPU tensor are read back to the host once per call; a routing reads them once).
        dropout_ps: each adapter's dropout probability (or one for all); applied only when ``training``.
        seed: dropout seed, as in ``lora_linear`` (None draws one from torch's default generator).
        slices: each adapter's output groups, or None.
        magnitudes: DoRA adapters' magnitudes (None for a LoRA adapter), as ``magnitude`` of ``lora_linear``. A batch
            with a DoRA adapter runs on the reference's torch ops (peft refuses such batches).
    Returns:
        ``(..., out)`` in x's dtype (under autocast, the autocast dtype).
    """
    n = len(lora_As)
    if isinstance(dropout_ps, (int, float)):
        dropout_ps = [dropout_ps] * n
    slices = list(slices) if slices is not None else [None] * n
    magnitudes = list(magnitudes) if magnitudes is not None else [None] * n
    if not (len(lora_Bs) == len(scales) == len(dropout_ps) == len(slices) == len(magnitudes) == n):
        raise ValueError(f"lora_As, lora_Bs, scales, dropout_ps, slices and magnitudes need one entry per adapter, "
                         f"got {n}, {len(lora_Bs)}, {len(scales)}, {len(dropout_ps)}, {len(slices)} and "
                         f"{len(magnitudes)}")
    x, weight, bias = args.autocast(x, weight, bias)
    for a in range(n):
        args.check(x, weight, bias, lora_As[a], lora_Bs[a], scales[a], dropout_ps[a], slices[a], f"adapter {a}: ",
                   magnitudes[a])
    routing = adapter_ids if isinstance(adapter_ids, AdapterRouting) else AdapterRouting(adapter_ids, n)
    if routing.adapters != n:
        raise ValueError(f"adapter_ids route rows among {routing.adapters} adapters but {n} are given")
    rows = routing.rows(x.shape[:-1], x.device)
    ps = [float(p) if training else 0.0 for p in dropout_ps]
    seed_tensor = args.seed_tensor(seed, x.device) if any(ps) or seed is not None else args.NO_SEED
    out_features = weight.shape[0]
    Bs = [B if s is None else expand_slices(B, s, out_features) for B, s in zip(lora_Bs, slices, strict=True)]
    factors = [None if m is None else dora_factor(dora_norm(weight, A, B, scale).detach(), m, s)
               for A, B, m, scale, s in zip(lora_As, Bs, magnitudes, scales, slices, strict=True)]
    dora = any(f is not None for f in factors)
    flat_x = x.reshape(-1, x.shape[-1])
    settings = _Settings([float(s) if isinstance(s, int) else s for s in scales], ps, rows, dora)
    tensors = (*lora_As, *Bs, *(factors if dora else ()))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, *tensors)):
        flat = _LoraLinearMixedFunction.apply(flat_x, weight, bias, seed_tensor, settings, *tensors)
    elif dora:
        flat = reference.forward_mixed(flat_x, weight, bias, list(lora_As), Bs, settings.scales, ps, rows,
                                       seed_tensor, factors)
    else:
        flat = select(flat_x).forward_mixed(flat_x, weight, bias, list(lora_As), Bs, settings.scales, ps, rows,
                                            seed_tensor)
    return flat.view(*x.shape[:-1], out_features)
