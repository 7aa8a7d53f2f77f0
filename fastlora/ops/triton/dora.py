"""DoRA on the triton backend: LoRA's launches with each feature's factor ``c = m / n`` fused into them.

Forward, three launches: LoRA's down pass (h, and B laid out and the gradient buffers zeroed for a backward); the
norms ``n_i = |W_i + s B_i A|`` and factors c, one pass over W with ``B A`` formed tile by tile (no (out, in)
matrix); LoRA's GEMM with c in its epilogue (with dropout the dropped-out input's product accumulated beside the
base one from the same W tiles), which also writes the pre-scale output u when dm is wanted. Backward: LoRA's dx
kernel with dy scaled by c on its way in (with dropout, the dropped path's ``(dy * (c - 1)) @ W`` beside
``dy @ W``), LoRA's dB kernel with dB's rows scaled by c and dm reduced against u from the same dy tiles, and for
16-bit parameters the conversions of their fp32 accumulations.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fastlora.ops import reference
from fastlora.ops.triton import single
from fastlora.ops.triton._kernels import _dora_norm_kernel
from fastlora.ops.triton.tuning import INTERPRET

Slices = tuple[bool, ...] | None
Needs = tuple[bool, bool, bool, bool]
# The norm kernel's (features, in-features) tile side on a GPU (the interpreter's: 32) and warps: at 4 warps its
# q,v-slices variant spilled on sm_90.
NORM_BLOCK, NORM_WARPS = 64, 8


def _fused(x: Tensor, weight: Tensor, slices: Slices) -> bool:
    """Whether the kernels take this call: something to compute, and slices whose groups they take as they are
    (rows per group a multiple of 16; never otherwise in common models, whose other calls run the reference)."""
    (M, K), N = x.shape, weight.shape[0]
    return M > 0 and N > 0 and K > 0 and single.slices_fit(slices, N)


def _norms(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scale: float,
           layout: single.Layout, dm: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(n, c)``, fp32 ``(out,)`` each, in one launch, which also zeroes ``dm`` (an fp32 buffer) when given."""
    N, K = weight.shape
    norm = torch.empty(N, device=weight.device, dtype=torch.float32)
    factor = torch.empty_like(norm)
    block = 32 if INTERPRET else NORM_BLOCK
    _dora_norm_kernel[(triton.cdiv(N, block),)](
        weight, lora_A, lora_B, magnitude, norm, factor, dm, N, K, layout.rank, layout.group_rows,
        0 if dm is None else dm.numel(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), scale,
        RS_PAD=layout.rs_pad, H_PAD=layout.h_pad, GROUPS=layout.groups, SLICE_MASK=layout.mask,
        ENABLED=layout.enabled, BLOCK_N=block, BLOCK_K=block, num_warps=NORM_WARPS, num_stages=2)
    return norm, factor


def dora_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 magnitude: Tensor, scale: float, dropout_p: float, seed: Tensor, slices: Slices,
                 needs: Needs | None) -> tuple[Tensor, tuple]:
    """``(out, saved)``: DoRA's output (see :func:`fastlora.ops.reference.dora_forward`) in three launches, and
    for a backward that ``needs`` (dx, dA, dB, dm): h, B laid out, the zeroed fp32 gradient buffers (dA, dB, dm:
    each None where not needed or written directly), n, c and u (None unless dm is wanted)."""
    if not _fused(x, weight, slices):
        return reference.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices,
                                      needs)
    (M, _), N = x.shape, weight.shape[0]
    bias, magnitude = single.unit_stride(bias), single.unit_stride(magnitude)
    need_dx, need_dA, need_dB, need_dm = needs or (False,) * 4
    shape = single.layout(M, N, lora_A.shape[0], slices, x.device.index or 0)
    drop = single.dropout_args(dropout_p, seed)
    with single.on_device(x):
        h, bpad, dA, dB = single.prepare(x, lora_A, lora_B, shape, drop, N, (need_dx, need_dA, need_dB))
        dm = (torch.empty(magnitude.shape, device=x.device, dtype=torch.float32)
              if need_dm and shape.db_splits > 1 else None)
        norm, factor = _norms(weight, lora_A, lora_B, magnitude, scale, shape, dm)
        u = x.new_empty(M, N) if need_dm else None
        out = single.gemm(x, weight, bias, lora_B, h, scale, shape, single.DoraEpilogue(factor, drop, u))
    return out, (() if needs is None else (h, bpad, dA, dB, dm, norm, factor, u))


def dora_backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                  scale: float, dropout_p: float, seed: Tensor, needs: Needs, slices: Slices = None,
                  saved: tuple = ()) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB, dm)`` as asked by ``needs``, each in its parameter's dtype; ``saved``: what
    :func:`dora_forward` prepared (else its launches run again). Then one launch for dx and dA, one for dB and
    dm, and for 16-bit parameters the conversions from their fp32 buffers."""
    need_dx, need_dA, need_dB, need_dm = needs
    if not _fused(x, weight, slices):
        return reference.dora_backward(grad_out, x, weight, lora_A, lora_B, magnitude, scale, dropout_p, seed,
                                       needs, slices)
    (M, K), N = x.shape, weight.shape[0]
    if not saved:
        saved = dora_forward(x, weight, None, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices, needs)[1]
    h, bpad, dA_acc, dB_acc, dm_acc, norm, factor, u = saved
    shape = single.layout(M, N, lora_A.shape[0], slices, x.device.index or 0)
    drop = single.dropout_args(dropout_p, seed)
    dx = dB = dm = None
    with single.on_device(x):
        if need_dx or need_dA:
            dx = x.new_empty(M, K) if need_dx else None
            single.dx_gemm(grad_out, x, weight, lora_A, lora_B if bpad is None else bpad, scale, shape, drop, dx,
                           dA_acc if need_dA else None, factor)
        if need_dB or need_dm:
            if need_dB:
                dB = dB_acc if dB_acc is not None else torch.empty(lora_B.shape, device=x.device, dtype=lora_B.dtype)
            if need_dm:
                dm = dm_acc if dm_acc is not None else torch.empty_like(magnitude)
            single.db_gemm(grad_out, h, scale, shape, dB, shape.db_splits > 1, single.DoraGrads(factor, norm, u, dm))
        dA, dB = single.in_param_dtypes(dA_acc if need_dA else None, lora_A.dtype, dB, dB_acc is not None,
                                        lora_B.dtype)
    if dm is not None and dm.dtype != magnitude.dtype:
        dm = dm.to(magnitude.dtype)
    return dx, dA, dB, dm
