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
from fastlora.ops.reference import expand_slices
from fastlora.ops.routing import AdapterRouting, Rows


class _Settings:
    """The per-adapter floats and the routing an autograd context keeps (tensors go through save_for_backward)."""

    __slots__ = ("dropout_ps", "rows", "scales")

    def __init__(self, scales: list[float], dropout_ps: list[float], rows: Rows) -> None:
        self.scales, self.dropout_ps, self.rows = scales, dropout_ps, rows


class _LoraLinearMixedFunction(torch.autograd.Function):
    """Autograd over a backend's ``forward_mixed`` / ``backward_mixed``; W and b stay frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, seed, settings, *lora):
        n = len(settings.scales)
        out = select(x).forward_mixed(x, weight, bias, list(lora[:n]), list(lora[n:]), settings.scales,
                                      settings.dropout_ps, settings.rows, seed)
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
        need_lora = [(needs[5 + a] or needs[5 + n + a]) and named[a] for a in range(n)]
        backend = reference if torch.is_grad_enabled() else select(x)  # grad mode on: differentiable
        dx, dAs, dBs = backend.backward_mixed(grad_out.contiguous(), x, weight, lora[:n], lora[n:], settings.scales,
                                              settings.dropout_ps, settings.rows, seed, needs[0], need_lora)
        return (dx if needs[0] else None), None, None, None, None, *dAs, *dBs


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: Sequence[Tensor],
                      lora_Bs: Sequence[Tensor], scales: Sequence[float], adapter_ids: Tensor | AdapterRouting,
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
            ``(batch,)`` for ``x: (batch, seq, in)``: one adapter per sequence); -1 means no adapter. Or an
            :class:`~fastlora.ops.routing.AdapterRouting` of them, built once for a batch that many layers share
            (ids given as a GPU tensor are read back to the host once per call; a routing reads them once).
        dropout_ps: each adapter's dropout probability (or one for all); applied only when ``training``.
        seed: dropout seed, as in ``lora_linear`` (None draws one from torch's default generator).
        slices: each adapter's output groups, or None.
    Returns:
        ``(..., out)`` in x's dtype (under autocast, the autocast dtype).
    """
    n = len(lora_As)
    if isinstance(dropout_ps, (int, float)):
        dropout_ps = [dropout_ps] * n
    slices = list(slices) if slices is not None else [None] * n
    if not (len(lora_Bs) == len(scales) == len(dropout_ps) == len(slices) == n):
        raise ValueError(f"lora_As, lora_Bs, scales, dropout_ps and slices need one entry per adapter, got "
                         f"{n}, {len(lora_Bs)}, {len(scales)}, {len(dropout_ps)} and {len(slices)}")
    x, weight, bias = args.autocast(x, weight, bias)
    for a in range(n):
        args.check(x, weight, bias, lora_As[a], lora_Bs[a], scales[a], dropout_ps[a], slices[a], f"adapter {a}: ")
    routing = adapter_ids if isinstance(adapter_ids, AdapterRouting) else AdapterRouting(adapter_ids, n)
    if routing.adapters != n:
        raise ValueError(f"adapter_ids route rows among {routing.adapters} adapters but {n} are given")
    rows = routing.rows(x.shape[:-1], x.device)
    ps = [float(p) if training else 0.0 for p in dropout_ps]
    seed_tensor = args.seed_tensor(seed, x.device) if any(ps) or seed is not None else args.NO_SEED
    out_features = weight.shape[0]
    Bs = [B if s is None else expand_slices(B, s, out_features) for B, s in zip(lora_Bs, slices, strict=True)]
    flat_x = x.reshape(-1, x.shape[-1])
    settings = _Settings([float(s) if isinstance(s, int) else s for s in scales], ps, rows)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, *lora_As, *Bs)):
        flat = _LoraLinearMixedFunction.apply(flat_x, weight, bias, seed_tensor, settings, *lora_As, *Bs)
    else:
        flat = select(flat_x).forward_mixed(flat_x, weight, bias, list(lora_As), Bs, settings.scales, ps, rows,
                                            seed_tensor)
    return flat.view(*x.shape[:-1], out_features)
