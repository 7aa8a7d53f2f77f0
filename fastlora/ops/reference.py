"""The reference backend: plain PyTorch kernels that define fastlora's semantics.

Every backend computes, for ``x: (M, in)``, ``W: (out, in)``, ``A: (R, in)``, ``B: (out, R)``::

    y = x @ W.T + b + scale * (dropout(x) @ A.T) @ B.T

with W and b frozen. The dropout keep-mask is a pure function of (seed, row, col), given by
:func:`dropout_keep_mask`; the other backends implement the same hash bit for bit, so a
seed gives the same mask on every backend and backward regenerates it instead of storing it.

The hash (all arithmetic on unsigned 32-bit integers, wrapping)::

    mix(h):   h ^= h >> 16; h *= 0x21F0AAAD; h ^= h >> 15; h *= 0x735A2D97; h ^= h >> 15
    row_key[r] = mix(mix(r ^ seed_lo) ^ seed_hi)        seed_lo/hi: low/high 32 bits of the seed
    col_key[c] = c * 0x9E3779B9
    keep[r, c] = mix(row_key[r] ^ col_key[c]) >= floor(p * 2**32)

Kept elements are scaled by ``1 / (1 - p)`` (inverted dropout).
"""

from __future__ import annotations

import torch
from torch import Tensor

_U32 = 0xFFFFFFFF
MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97
COL_MUL = 0x9E3779B9


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a hashed element is dropped."""
    return int(p * 4294967296.0)


def _mix(h: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding uint32 values (in place)."""
    h ^= h >> 16
    h.mul_(MIX_MUL_1).bitwise_and_(_U32)
    h ^= h >> 15
    h.mul_(MIX_MUL_2).bitwise_and_(_U32)
    h ^= h >> 15
    return h


def dropout_keep_mask(seed: Tensor, rows: int, cols: int, p: float, device: torch.device) -> Tensor:
    """Boolean ``(rows, cols)`` keep-mask of the shared counter-based dropout hash."""
    seed = seed.to(device=device, dtype=torch.int64)
    row_key = torch.arange(rows, device=device, dtype=torch.int64) ^ (seed & _U32)
    row_key = _mix(_mix(row_key) ^ ((seed >> 32) & _U32))
    col_key = (torch.arange(cols, device=device, dtype=torch.int64) * COL_MUL) & _U32
    return _mix(row_key[:, None] ^ col_key[None, :]) >= dropout_threshold(p)


def _dropped(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """``dropout(x)`` with the shared mask, as a new tensor."""
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
    return x * keep * (1.0 / (1.0 - p))


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    """``(M, out)`` output: base product, bias and rank-R update accumulated in one buffer."""
    out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    x_lora = _dropped(x, seed, dropout_p) if dropout_p > 0 else x
    out.addmm_(x_lora @ lora_A.t(), lora_B.t(), alpha=scale)
    return out


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scale: float, dropout_p: float, seed: Tensor,
             needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each computed only when ``needs`` asks for it; W and b are frozen."""
    need_dx, need_dA, need_dB = needs
    grad_h = grad_out @ lora_B  # (M, R): the gradient reaching x @ A.T, before the scale
    if dropout_p > 0:
        keep_scaled = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device).to(x.dtype)
        keep_scaled *= 1.0 / (1.0 - dropout_p)
    dx = dA = dB = None
    if need_dx:
        dx = grad_out @ weight
        if dropout_p > 0:
            dx.addcmul_(grad_h @ lora_A, keep_scaled, value=scale)
        else:
            dx.addmm_(grad_h, lora_A, alpha=scale)
    if need_dA or need_dB:
        x_lora = x * keep_scaled if dropout_p > 0 else x
        if need_dA:
            dA = (grad_h.t() @ x_lora).mul_(scale)
        if need_dB:
            dB = (grad_out.t() @ (x_lora @ lora_A.t())).mul_(scale)
    return dx, dA, dB
