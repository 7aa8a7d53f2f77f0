"""The reference backend: plain PyTorch kernels that define fastlora's semantics.

Every backend computes, for ``x: (M, in)``, ``W: (out, in)``, ``A: (R, in)``, ``B: (out, R)``::

    y = x @ W.T + b + scale * (dropout(x) @ A.T) @ B.T

with W and b frozen. The dropout keep-mask is a pure function of (seed, row, col), given by
:func:`dropout_keep_mask`; the other backends implement the same hash bit for bit, so a
seed gives the same mask on every backend and backward regenerates it instead of storing it.

The hash (uint32 arithmetic, wrapping; ``int32(u)`` reinterprets the bits as signed)::

    mix(h):   h ^= h >> 16; h *= 0x21F0AAAD; h ^= h >> 15; h *= 0x735A2D97; h ^= h >> 15
    row_key[r] = mix(mix(r ^ seed_lo) ^ seed_hi)        seed_lo/hi: low/high 32 bits of the seed
    col_key[c] = mix(c * 0x9E3779B9)
    keep[r, c] = int32((row_key[r] ^ col_key[c]) * 0x9E3779B1) >= floor(p * 2**32) - 2**31

Row and column keys are fully mixed once each; an element costs one xor, one multiply and one
compare (the top bits of a multiplicative hash), which keeps this pure-PyTorch mask cheap.
Kept elements are scaled by ``1 / (1 - p)`` (inverted dropout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.ops.args import FLOAT_DTYPES
from fastlora.ops.routing import Rows

NAME = "reference"
DEVICES = None  # any device torch runs on
DTYPES = frozenset(FLOAT_DTYPES)
CHECKS_ARGUMENTS = False

_U32 = 0xFFFFFFFF
MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97
COL_MUL = 0x9E3779B9
ELEMENT_MUL = 0x9E3779B1


def dropout_threshold(p: float) -> int:
    """The signed int32 threshold: an element is kept when its hash is at least this."""
    return int(p * 4294967296.0) - 2**31


def _mix(h: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding uint32 values (in place)."""
    h ^= h >> 16
    h.mul_(MIX_MUL_1).bitwise_and_(_U32)
    h ^= h >> 15
    h.mul_(MIX_MUL_2).bitwise_and_(_U32)
    h ^= h >> 15
    return h


def _as_int32(u: Tensor) -> Tensor:
    """uint32 values held in int64 reinterpreted as int32 bits."""
    return (u - ((u >> 31) << 32)).to(torch.int32)


def _hashed(seed: Tensor, rows: int | Tensor, cols: int, device: torch.device) -> Tensor:
    """The int32 element hashes that the keep decision thresholds: ``(rows, cols)`` for a row count, or
    ``(len(rows), cols)`` for a tensor of row indices."""
    seed = seed.to(device=device, dtype=torch.int64)
    if isinstance(rows, int):
        rows = torch.arange(rows, device=device, dtype=torch.int64)
    row_key = rows.to(device=device, dtype=torch.int64) ^ (seed & _U32)
    row_key = _mix(_mix(row_key) ^ ((seed >> 32) & _U32))
    col_key = _mix((torch.arange(cols, device=device, dtype=torch.int64) * COL_MUL) & _U32)
    hashed = _as_int32(row_key)[:, None] ^ _as_int32(col_key)[None, :]
    return hashed.mul_(ELEMENT_MUL - 2**32)  # int32 multiplication wraps like uint32


def dropout_keep_mask(seed: Tensor, rows: int, cols: int, p: float, device: torch.device) -> Tensor:
    """Boolean ``(rows, cols)`` keep-mask of the shared counter-based dropout hash."""
    return _hashed(seed, rows, cols, device) >= dropout_threshold(p)


def _drop_mask(seed: Tensor, x: Tensor, p: float, rows: Tensor | None = None) -> Tensor:
    """Boolean mask of the elements of 2-D ``x`` (or of its rows ``rows``) that dropout zeroes."""
    return _hashed(seed, x.shape[0] if rows is None else rows, x.shape[1], x.device) < dropout_threshold(p)


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


def stack_slices(full: Tensor, slices: Sequence[bool]) -> Tensor:
    """The inverse of :func:`expand_slices`: the enabled groups' diagonal blocks of a ``(out, r * enabled)`` matrix,
    stacked as ``(out/G * enabled, r)``."""
    enabled = [g for g, on in enumerate(slices) if on]
    rank = full.shape[1] // len(enabled)
    blocks = full.view(len(slices), full.shape[0] // len(slices), len(enabled), rank)
    return blocks[enabled, :, range(len(enabled)), :].reshape(-1, rank)


def _dense_B(lora_B: Tensor, slices: Sequence[bool] | None) -> Tensor:
    """The ``(out, R)`` B: block-structured for slices."""
    if slices is None:
        return lora_B
    return expand_slices(lora_B, slices, lora_B.shape[0] // sum(slices) * len(slices))


def _base(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
            dropout_p: float, seed: Tensor, slices: Sequence[bool] | None = None,
            needs: tuple[bool, bool, bool] | None = None) -> tuple[Tensor, tuple]:
    """``((M, out) output, ())``. The LoRA branch computes in the LoRA parameters' dtype (fp32 ones over a 16-bit x:
    in fp32, added to the base output in fp32 and rounded once, as peft does); with x's dtype throughout, base,
    bias and update accumulate in one buffer."""
    lora_B = _dense_B(lora_B, slices)
    out = _base(x, weight, bias)
    x_lora = x.to(lora_A.dtype)
    if dropout_p > 0:  # the 1 / (1 - p) of inverted dropout is folded into the scale
        x_lora = x_lora.masked_fill(_drop_mask(seed, x, dropout_p), 0)
        scale = scale / (1.0 - dropout_p)
    if lora_A.dtype == x.dtype:
        return out.addmm_(x_lora @ lora_A.t(), lora_B.t(), alpha=scale), ()
    return torch.addmm(out.to(lora_A.dtype), x_lora @ lora_A.t(), lora_B.t(), alpha=scale).to(x.dtype), ()


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scale: float, dropout_p: float, seed: Tensor, needs: tuple[bool, bool, bool],
             slices: Sequence[bool] | None = None, saved: tuple = ()
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each computed only when ``needs`` asks for it, dA and dB in the LoRA parameters' own dtype
    and layout (stacked per slice); W and b are frozen. Never in place on its inputs, so that with grad mode on it is
    itself differentiable (second-order gradients)."""
    need_dx, need_dA, need_dB = needs
    dense_B = _dense_B(lora_B, slices)
    dy = grad_out.to(lora_A.dtype)
    grad_h = dy @ dense_B  # (M, R): the gradient reaching x @ A.T, before the scale
    drop = _drop_mask(seed, x, dropout_p) if dropout_p > 0 else None
    if drop is not None:
        scale = scale / (1.0 - dropout_p)
    dx = dA = dB = None
    if need_dx:  # in-place only on results made here (which autograd saves for nothing)
        dx = grad_out @ weight
        if drop is None and dx.dtype == grad_h.dtype:
            dx.addmm_(grad_h, lora_A, alpha=scale)
        else:
            dx_lora = grad_h @ lora_A
            if drop is not None:
                dx_lora.masked_fill_(drop, 0)
            dx = torch.add(dx.to(dx_lora.dtype), dx_lora, alpha=scale).to(x.dtype)
    if need_dA or need_dB:
        x_lora = x.to(lora_A.dtype)
        if drop is not None:
            x_lora = x_lora.masked_fill(drop, 0)
        if need_dA:
            dA = (grad_h.t() @ x_lora) * scale
        if need_dB:
            dB = (dy.t() @ (x_lora @ lora_A.t())) * scale
            dB = stack_slices(dB, slices) if slices is not None else dB
    return dx, dA, dB


def _lora_input(x: Tensor, rows: Tensor, seed: Tensor, p: float, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The adapter's rows of x in ``dtype`` with dropout applied (not yet scaled by 1/(1-p)), and the drop mask."""
    x_rows = x.index_select(0, rows).to(dtype)
    if p == 0:
        return x_rows, None
    drop = _drop_mask(seed, x, p, rows)
    return x_rows.masked_fill(drop, 0), drop


def _accumulator(t: Tensor, lora: list[Tensor]) -> Tensor:
    """``t`` in the widest of its and the LoRA parameters' dtypes (fp32 LoRA over a 16-bit x: updates add in fp32)."""
    wide = t.dtype
    for p in lora:
        wide = torch.promote_types(wide, p.dtype)
    return t if wide == t.dtype else t.to(wide)


def forward_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: list[Tensor], lora_Bs: list[Tensor],
                  scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor,
                  factors: Sequence[Tensor | None] | None = None) -> Tensor:
    """``(M, out)``: row i gets ``x_i W^T + b`` plus the update of its adapter (none for -1); with ``factors[a]``
    (DoRA's ``c = m / n``, ``(out,)`` fp32) adapter a's rows get DoRA's output instead.

    A row's dropout mask is the single-adapter op's for the same row, so every row equals the
    single-adapter result of its adapter.
    """
    dora = bool(factors) and any(f is not None for f in factors)
    base = _base(x, weight, bias)
    out = base.float() if dora else _accumulator(base, lora_As)
    for a, (A, B) in enumerate(zip(lora_As, lora_Bs, strict=True)):
        picked = rows.rows_of(a)
        if picked is None:
            continue
        x_rows, _ = _lora_input(x, picked, seed, dropout_ps[a], A.dtype)
        keep = 1.0 / (1.0 - dropout_ps[a])
        update = (x_rows @ A.t()) @ B.t()
        factor = factors[a] if factors else None
        if factor is None:
            out.index_add_(0, picked, update.to(out.dtype), alpha=scales[a] * keep)
            continue
        dropped = _dropped_base(x, weight, picked, x_rows, keep, dropout_ps[a])
        out.index_add_(0, picked, (factor - 1.0) * dropped + factor * (update.float() * (scales[a] * keep)))
    return out.to(x.dtype)


def _dropped_base(x: Tensor, weight: Tensor, picked: Tensor, x_rows: Tensor, keep: float, p: float) -> Tensor:
    """``x_d W^T`` of the picked rows in fp32 (DoRA's base product of the dropped-out input; ``x_rows``: those rows
    with dropout applied, not yet scaled by ``keep``)."""
    dropped = x_rows.to(x.dtype) * keep if p > 0 else x.index_select(0, picked)
    return (dropped @ weight.t()).float()


def backward_mixed(grad_out: Tensor, x: Tensor, weight: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor],
                   scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor, need_dx: bool,
                   need_lora: list[bool], factors: Sequence[Tensor | None] | None = None
                   ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
    """``(dx, dAs, dBs)``, and with ``factors`` ``(dx, dAs, dBs, dcs)`` (DoRA adapters' ``d factor``): each
    adapter's gradients come from its own rows only; an adapter no row names (or whose ``need_lora`` is False)
    gets None. Differentiable with grad mode on (second-order gradients)."""
    dora = bool(factors) and any(f is not None for f in factors)
    dx = _accumulator(grad_out @ weight, lora_As if not dora else [grad_out.float()]) if need_dx else None
    n = len(lora_As)
    dAs: list[Tensor | None] = [None] * n
    dBs: list[Tensor | None] = [None] * n
    dcs: list[Tensor | None] = [None] * n
    for a, (A, B) in enumerate(zip(lora_As, lora_Bs, strict=True)):
        picked = rows.rows_of(a)
        if picked is None or not (need_dx or need_lora[a]):
            continue
        keep = 1.0 / (1.0 - dropout_ps[a])
        scale = scales[a] * keep
        x_rows, drop = _lora_input(x, picked, seed, dropout_ps[a], A.dtype)
        dy_rows = grad_out.index_select(0, picked)
        factor = factors[a] if factors else None
        dy_lora = (dy_rows.float() * factor if factor is not None else dy_rows).to(A.dtype)  # reaching the update
        grad_h = dy_lora @ B
        if need_dx:
            dx_rows = (grad_h @ A).float() * scale
            if factor is not None:  # the dropped-out base product, scaled by c - 1
                dx_rows = dx_rows + ((dy_rows.float() * (factor - 1.0)).to(x.dtype) @ weight).float() * keep
            if drop is not None:
                dx_rows = dx_rows.masked_fill(drop, 0)
            dx.index_add_(0, picked, dx_rows.to(dx.dtype))
        if need_lora[a]:
            dAs[a] = (grad_h.t() @ x_rows) * scale
            dBs[a] = (dy_lora.t() @ (x_rows @ A.t())) * scale
            if factor is not None:
                u = _dropped_base(x, weight, picked, x_rows, keep, dropout_ps[a]) \
                    + ((x_rows @ A.t()) @ B.t()).float() * scale
                dcs[a] = (dy_rows.float() * u).sum(0)
    dx = dx.to(x.dtype) if dx is not None else None
    return (dx, dAs, dBs, dcs) if dora else (dx, dAs, dBs)


# DoRA (weight-decomposed LoRA, as peft computes it): per output feature i, ``n_i = |W_i + scale B_i A|`` (detached),
# ``c_i = m_i / n_i``; ``y = x W^T + b + (c - 1) (x_d W^T) + c (scale x_d A^T B^T)`` with ``x_d`` the dropped-out
# input, which without dropout is ``y = c (x W^T + scale x A^T B^T) + b``. With slices, m covers the enabled groups'
# features (stacked as B's rows) and a disabled group's c is 1: its output stays the base's.

def dora_norm(weight: Tensor, lora_A: Tensor, dense_B: Tensor, scale: float) -> Tensor:
    """``|W_i + scale B_i A|`` for every output feature, in fp32, without the (out, in) matrix:
    ``|W_i|^2 + 2 scale B_i (W A^T)_i + scale^2 B_i (A A^T) B_i^T`` (clamped at 0 against rounding)."""
    A, B = lora_A.float(), dense_B.float()
    WA = (weight @ lora_A.t().to(weight.dtype)).float()  # (out, R), accumulated in fp32
    squared = (torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
               + (2.0 * scale) * (B * WA).sum(1) + scale * scale * ((B @ (A @ A.t())) * B).sum(1))
    return squared.clamp_min(0.0).sqrt()


def enabled_rows(full: Tensor, slices: Sequence[bool] | None) -> Tensor:
    """The entries of an ``(out,)`` vector that belong to enabled slices, stacked (as B's rows and m are)."""
    if slices is None:
        return full
    rows = full.shape[0] // len(slices)
    return full.view(len(slices), rows)[[g for g, on in enumerate(slices) if on]].reshape(-1)


def dora_factor(norm: Tensor, magnitude: Tensor, slices: Sequence[bool] | None) -> Tensor:
    """``c = m / n`` per output feature (fp32, ``(out,)``); 1 for the features of disabled slices."""
    if slices is None:
        return magnitude.float() / norm
    rows = norm.shape[0] // len(slices)
    enabled = torch.tensor(slices, device=norm.device).repeat_interleave(rows)
    full = norm.new_ones(norm.shape).masked_scatter(enabled, magnitude.float())
    return torch.where(enabled, full / norm, 1.0)


def dora_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 magnitude: Tensor, scale: float, dropout_p: float, seed: Tensor, slices: Sequence[bool] | None,
                 needs: tuple[bool, bool, bool, bool] | None) -> tuple[Tensor, tuple]:
    """``(out, saved)``: DoRA's output, and (``needs`` given) the norms n and the pre-scale output
    ``u = x_d W^T + scale x_d A^T B^T`` of the dropped-out path (fp32, ``(M, out)``), which dm reduces against."""
    dense_B = _dense_B(lora_B, slices)
    norm = dora_norm(weight, lora_A, dense_B, scale).detach()  # a constant for the gradients (DoRA section 4.3)
    c = dora_factor(norm, magnitude, slices)
    x_lora = x.to(lora_A.dtype)
    if dropout_p > 0:
        x_lora = x_lora.masked_fill(_drop_mask(seed, x, dropout_p), 0) / (1.0 - dropout_p)
    lora = ((x_lora @ lora_A.t()) @ dense_B.t() * scale).float()
    base = _base(x, weight, bias)  # the base layer's output: a disabled slice's c = 1 leaves it as it is
    if dropout_p > 0:
        dropped = (x_lora.to(x.dtype) @ weight.t()).float()
    else:
        dropped = base.float() - bias.float() if bias is not None else base.float()
    out = base.float() + (c - 1.0) * dropped + c * lora
    return out.to(x.dtype), (() if needs is None else (norm, dropped + lora))


def dora_backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                  scale: float, dropout_p: float, seed: Tensor, needs: tuple[bool, bool, bool, bool],
                  slices: Sequence[bool] | None, saved: tuple = ()
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB, dm)`` of :func:`dora_forward`, each only when ``needs`` asks for it; ``saved``: the forward's
    ``(n, u)`` (recomputed when empty). Never in place on its inputs: differentiable with grad mode on."""
    need_dx, need_dA, need_dB, need_dm = needs
    norm, u = saved if saved else dora_forward(x, weight, None, lora_A, lora_B, magnitude, scale, dropout_p, seed,
                                               slices, needs)[1]
    c = dora_factor(norm, magnitude, slices)
    dense_B = _dense_B(lora_B, slices)
    dy = grad_out.float()
    scaled = dy * c  # the gradient reaching u
    drop = _drop_mask(seed, x, dropout_p) if dropout_p > 0 else None
    keep = 1.0 / (1.0 - dropout_p)
    grad_h = scaled.to(lora_A.dtype) @ dense_B  # reaching x_d A^T, before the scale
    dx = dA = dB = dm = None
    if need_dx:
        if drop is None:
            dx = scaled.to(x.dtype) @ weight
            dx = torch.add(dx.float(), (grad_h @ lora_A).float(), alpha=scale)
        else:
            through_base = grad_out @ weight
            through_drop = ((dy * (c - 1.0)).to(x.dtype) @ weight).float() \
                + scale * (grad_h @ lora_A).float()
            dx = through_base.float() + through_drop.masked_fill(drop, 0) * keep
        dx = dx.to(x.dtype)
    if need_dA or need_dB:
        x_lora = x.to(lora_A.dtype)
        if drop is not None:
            x_lora = x_lora.masked_fill(drop, 0) * keep
        if need_dA:
            dA = (grad_h.t() @ x_lora) * scale
        if need_dB:
            dB = (scaled.to(lora_A.dtype).t() @ (x_lora @ lora_A.t())) * scale
            dB = stack_slices(dB, slices) if slices is not None else dB
    if need_dm:
        dm = enabled_rows((dy * u).sum(0) / norm, slices).to(magnitude.dtype)
    return dx, dA, dB, dm
