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

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

_U32 = 0xFFFFFFFF
MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97
COL_MUL = 0x9E3779B9
ELEMENT_MUL = 0x9E3779B1


def version_stamp(t: Tensor) -> int | tuple | None:
    """What tells a tensor's contents apart over time, for caches keyed on its identity: its version counter
    (bumped by every in-place change); a CPU inference tensor, which has none, by its values (small id tensors);
    None (do not cache) for other inference tensors."""
    if not t.is_inference():
        return t._version
    return tuple(t.reshape(-1).tolist()) if t.device.type == "cpu" and t.numel() <= 4096 else None


class TensorCache:
    """Values computed from tensors, kept while each of those tensors is the same object at the same
    :func:`version_stamp`; at most ``size`` entries, the oldest dropped first. ``owned``: tensors the caller made
    itself and never changes in place, so an inference one (no stamp) is kept by its identity alone."""

    def __init__(self, size: int) -> None:
        self.size, self.entries = size, {}

    def get(self, tensors: Sequence[Tensor], make, extra: tuple = (), owned: bool = False):
        """``make()``'s value for ``tensors`` (and the hashable ``extra``), from the cache when it holds it."""
        stamps = [version_stamp(t) for t in tensors]
        if None in stamps and not owned:
            return make()
        key = (*((id(t), stamp) for t, stamp in zip(tensors, stamps, strict=True)), *extra)
        kept = self.entries.get(key)
        if kept is not None and all(ref() is t for ref, t in zip(kept[0], tensors, strict=True)):
            return kept[1]
        value = make()
        while len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = ([weakref.ref(t) for t in tensors], value)
        return value


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


def _compute_operands(x: Tensor, lora_A: Tensor, lora_B: Tensor, slices) -> tuple[Tensor, Tensor]:
    """A and the dense ``(out, R)`` B in x's dtype (LoRA parameters may be fp32 over a 16-bit x)."""
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if slices is not None:
        lora_B = expand_slices(lora_B, slices, lora_B.shape[0] // sum(slices) * len(slices))
    return lora_A, lora_B


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scale: float, dropout_p: float, seed: Tensor, slices: Sequence[bool] | None = None) -> Tensor:
    """``(M, out)`` output: base product, bias and rank-R update accumulated in one buffer."""
    lora_A, lora_B = _compute_operands(x, lora_A, lora_B, slices)
    out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    if dropout_p > 0:  # the 1 / (1 - p) of inverted dropout is folded into the scale
        x = x.masked_fill(_drop_mask(seed, x, dropout_p), 0)
        scale = scale / (1.0 - dropout_p)
    out.addmm_(x @ lora_A.t(), lora_B.t(), alpha=scale)
    return out


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scale: float, dropout_p: float, seed: Tensor, needs: tuple[bool, bool, bool],
             slices: Sequence[bool] | None = None, saved: tuple = ()
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each computed only when ``needs`` asks for it, dA and dB in the LoRA parameters' own
    dtype and layout (stacked per slice); W and b are frozen."""
    need_dx, need_dA, need_dB = needs
    param_A, param_B = lora_A, lora_B
    lora_A, lora_B = _compute_operands(x, lora_A, lora_B, slices)
    grad_h = grad_out @ lora_B  # (M, R): the gradient reaching x @ A.T, before the scale
    drop = _drop_mask(seed, x, dropout_p) if dropout_p > 0 else None
    if drop is not None:
        scale = scale / (1.0 - dropout_p)
    dx = dA = dB = None
    if need_dx:
        dx = grad_out @ weight
        if drop is None:
            dx.addmm_(grad_h, lora_A, alpha=scale)
        else:
            dx.add_((grad_h @ lora_A).masked_fill_(drop, 0), alpha=scale)
    if need_dA or need_dB:
        x_lora = x.masked_fill(drop, 0) if drop is not None else x
        if need_dA:
            dA = (grad_h.t() @ x_lora).mul_(scale).to(param_A.dtype)
        if need_dB:
            dB = (grad_out.t() @ (x_lora @ lora_A.t())).mul_(scale)
            dB = (stack_slices(dB, slices) if slices is not None else dB).to(param_B.dtype)
    return dx, dA, dB


def adapter_rows(adapter_ids: Tensor, adapters: int) -> list[Tensor | None]:
    """For each adapter, the (ascending) indices of the rows that name it, or None when no row does."""
    order = torch.argsort(adapter_ids, stable=True)
    counts = torch.bincount(adapter_ids + 1, minlength=adapters + 1).tolist()
    segments = order.split(counts)[1:]  # segment 0: the rows of the base model alone (-1)
    return [rows if rows.numel() else None for rows in segments]


def _lora_input(x: Tensor, rows: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor | None]:
    """The adapter's rows of x with dropout applied (not yet scaled by 1/(1-p)), and the drop mask."""
    x_rows = x.index_select(0, rows)
    if p == 0:
        return x_rows, None
    drop = _drop_mask(seed, x, p, rows)
    return x_rows.masked_fill_(drop, 0), drop


def forward_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: list[Tensor], lora_Bs: list[Tensor],
                  scales: list[float], dropout_ps: list[float], adapter_ids: Tensor, seed: Tensor) -> Tensor:
    """``(M, out)``: row i gets ``x_i W^T + b`` plus the update of adapter ``adapter_ids[i]`` (none for -1).

    A row's dropout mask is the single-adapter op's for the same row, so every row equals the
    single-adapter result of its adapter.
    """
    out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    for a, rows in enumerate(adapter_rows(adapter_ids, len(lora_As))):
        if rows is None:
            continue
        x_rows, _ = _lora_input(x, rows, seed, dropout_ps[a])
        update = (x_rows @ lora_As[a].t()) @ lora_Bs[a].t()
        out.index_add_(0, rows, update, alpha=scales[a] / (1.0 - dropout_ps[a]))
    return out


def backward_mixed(grad_out: Tensor, x: Tensor, weight: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor],
                   scales: list[float], dropout_ps: list[float], adapter_ids: Tensor, seed: Tensor,
                   need_dx: bool, need_lora: list[bool]) -> tuple[Tensor | None, list[Tensor | None],
                                                                   list[Tensor | None]]:
    """``(dx, dAs, dBs)``: each adapter's gradients come from its own rows only; an adapter no row
    names (or whose ``need_lora`` is False) gets None."""
    dx = grad_out @ weight if need_dx else None
    dAs: list[Tensor | None] = [None] * len(lora_As)
    dBs: list[Tensor | None] = [None] * len(lora_As)
    for a, rows in enumerate(adapter_rows(adapter_ids, len(lora_As))):
        if rows is None or not (need_dx or need_lora[a]):
            continue
        scale = scales[a] / (1.0 - dropout_ps[a])
        x_rows, drop = _lora_input(x, rows, seed, dropout_ps[a])
        dy_rows = grad_out.index_select(0, rows)
        grad_h = dy_rows @ lora_Bs[a]
        if need_dx:
            dx_rows = grad_h @ lora_As[a]
            dx.index_add_(0, rows, dx_rows if drop is None else dx_rows.masked_fill_(drop, 0), alpha=scale)
        if need_lora[a]:
            dAs[a] = (grad_h.t() @ x_rows).mul_(scale)
            dBs[a] = (dy_rows.t() @ (x_rows @ lora_As[a].t())).mul_(scale)
    return dx, dAs, dBs
