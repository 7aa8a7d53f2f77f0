"""Single-adapter launchers: the forward in two launches, the backward in up to three (four with 16-bit LoRA
parameters), the GEMMs tiled or, where they apply, persistent (``FASTLORA_TRITON_GEMM=hopper``).

Forward: a thin pass ``h = dropout(x) @ A.T / (1-p)`` (fp32, ``(M, H_PAD)``) and the base GEMM whose fp32 tile also
accumulates ``scale * h @ B.T`` and the bias before being written once. Backward: the dx GEMM ``dy @ W`` that reads
each dy tile once for dx and ``g = dy @ B``, fuses ``scale * keep * (g @ A) / (1-p)`` into dx and adds dA from the
masked x tile (when dx or dA is asked for); and ``scale * dy.T @ h`` for dB over splits of the rows. The dropout
mask is regenerated from the seed in every kernel that needs it, never stored.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from fastlora.ops import reference
from fastlora.ops.reference import dropout_threshold, expand_slices, stack_slices
from fastlora.ops.triton import tuning
from fastlora.ops.triton._kernels import _cast_pair_kernel, _lora_db_kernel, _lora_down_kernel
from fastlora.ops.triton.tuning import INTERPRET, precision

Slices = tuple[bool, ...] | None
Needs = tuple[bool, bool, bool]

# Which kernels compute the forward's GEMM and the backward's dx GEMM: the tiled ones, or (``hopper``, not yet
# measured on a GPU, so not the default) the persistent TMA/wgmma kernels of _hopper.py wherever they apply (sm_90+,
# 16-bit, TMA-aligned operands).
GEMM_ENV_VAR = "FASTLORA_TRITON_GEMM"
GEMMS = ("tiled", "hopper")
GEMM = "tiled"


def set_gemm(name: str) -> None:
    """Compute the forward's and dx's GEMMs with the ``tiled`` kernels or, where they apply, the ``hopper`` ones."""
    global GEMM
    if name not in GEMMS:
        raise ValueError(f"unknown {GEMM_ENV_VAR} {name!r}: choose one of {', '.join(GEMMS)}")
    GEMM = name


set_gemm(os.environ.get(GEMM_ENV_VAR, "tiled").strip().lower() or "tiled")

# Seeds on these devices are read by the kernels from memory (drawn there, e.g. inside a CUDA graph, where each
# replay draws anew; never read back to the host); others are passed as two 32-bit scalars.
SEED_IN_MEMORY_ON = frozenset({"cuda"})
NO_SEED = {"seed_ptr": None, "seed_lo": 0, "seed_hi": 0, "SEED_FROM_PTR": False}
NO_DROPOUT = {"inv_keep": 1.0, "threshold": 0, "DROPOUT": False, **NO_SEED}


def int32_bits(value: int) -> int:
    """A uint32 value as the int32 with the same bits (kernel scalars stay 32-bit)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def seed_args(seed: Tensor) -> dict:
    """The kernels' seed arguments: ``seed_ptr`` (read with ``SEED_FROM_PTR``) or the halves ``seed_lo``/``seed_hi``."""
    if seed.device.type in SEED_IN_MEMORY_ON:
        return {"seed_ptr": seed, "seed_lo": 0, "seed_hi": 0, "SEED_FROM_PTR": True}
    value = int(seed) & 0xFFFFFFFFFFFFFFFF
    return {"seed_ptr": None, "seed_lo": int32_bits(value & 0xFFFFFFFF), "seed_hi": int32_bits(value >> 32),
            "SEED_FROM_PTR": False}


def dropout_args(dropout_p: float, seed: Tensor) -> dict:
    """The kernels' dropout arguments: the seed's (:func:`seed_args`), the threshold and 1/(1-p)."""
    if dropout_p == 0:
        return NO_DROPOUT
    return {"inv_keep": 1.0 / (1.0 - dropout_p), "threshold": dropout_threshold(dropout_p), "DROPOUT": True,
            **seed_args(seed)}


def unit_stride(vector: Tensor | None) -> Tensor | None:
    """A 1-D tensor the kernels read at ``ptr + i`` (a bias, DoRA's m): itself when its stride is 1, else a copy."""
    return vector if vector is None or vector.stride(0) == 1 else vector.contiguous()


def on_device(x: Tensor):
    """Launches go to the tensors' GPU, whichever is current (a no-op under the interpreter or when it is current)."""
    if INTERPRET or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


class Layout:
    """How a layer's LoRA parameters map onto the kernels' rank axis: ``rs_pad`` columns for each enabled slice
    (its rank padded to a power of two >= 16, since 16-bit dots need K >= 16), ``h_pad`` in all; the output
    features in ``groups`` equal groups of ``group_rows``, enabled by the bits of ``mask`` (one group without
    slices); the dB kernel's tile, stages and row splits for ``M`` rows."""

    def __init__(self, M: int, N: int, total_rank: int, slices: Slices, sms: int) -> None:
        self.groups = len(slices) if slices is not None else 1
        self.enabled = sum(slices) if slices is not None else 1
        self.mask = sum(1 << g for g, on in enumerate(slices) if on) if slices is not None else 1
        self.rank = total_rank // self.enabled
        self.rs_pad = tuning.rank_pad(self.rank)
        self.h_pad = triton.next_power_of_2(self.enabled * self.rs_pad)
        self.group_rows = N // self.groups
        self.db_rows = self.group_rows * self.enabled  # B's rows, stacked
        side, self.db_stages = tuning.db_tile(self.rs_pad)
        if INTERPRET:
            side = min(side, tuning.INTERPRET_CONFIG["BLOCK_M"])
        if slices is not None:  # a dB tile stays inside one slice
            side = min(side, self.group_rows & -self.group_rows)
        self.db_side = side
        self.db_blocks = triton.cdiv(self.db_rows, side)
        self.db_rows_per_split, self.db_splits = tuning.db_splits(M, self.db_blocks, side,
                                                                  sms * tuning.DB_PROGRAMS_PER_SM)


@functools.lru_cache(maxsize=1024)
def layout(M: int, N: int, total_rank: int, slices: Slices, device_index: int) -> Layout:
    """The :class:`Layout` of a call's shapes (kept: it depends on nothing else)."""
    return Layout(M, N, total_rank, slices, tuning.sm_count(device_index))


def slices_fit(slices: Slices, N: int) -> bool:
    """Whether the kernels take these slices of N features as they are: rows per group a multiple of 16, the dB
    tile's side (always so in common models)."""
    return slices is None or (N // len(slices)) % 16 == 0


def _dense(lora_B: Tensor, slices: Slices, N: int) -> tuple[Tensor, Slices]:
    """B and slices as the kernels take them: slices that do not fit (:func:`slices_fit`) become a dense B."""
    if slices_fit(slices, N):
        return lora_B, slices
    return expand_slices(lora_B, slices, N), None


AUX_PROGRAMS = 16  # the down kernel's programs that also prepare the backward's B and zero its buffers


def down(x: Tensor, lora_A: Tensor, lora_B: Tensor, layout: Layout, drop: dict, bpad: Tensor | None = None,
         dA: Tensor | None = None, dB: Tensor | None = None) -> Tensor:
    """``dropout(x) @ A.T / (1 - p)`` as an fp32 ``(M, h_pad)`` buffer; the same launch fills ``bpad`` (B as the
    backward GEMM reads it) and zeroes the fp32 gradient buffers ``dA`` and ``dB`` when given."""
    (M, K), N = x.shape, lora_B.shape[0] if bpad is None else bpad.shape[0]
    h = torch.empty(M, layout.h_pad, device=x.device, dtype=torch.float32)
    block_m, block_k = tuning.down_tile(M, layout.h_pad)
    m_blocks = triton.cdiv(M, block_m)
    aux = AUX_PROGRAMS if bpad is not None or dA is not None or dB is not None else 0
    args = (x, lora_A, h, M, K, layout.rank, *x.stride(), *lora_A.stride(),
            drop["inv_keep"], drop["seed_ptr"], drop["seed_lo"], drop["seed_hi"], drop["threshold"],
            m_blocks, lora_B, bpad, N, layout.group_rows, *lora_B.stride(),
            dA, 0 if dA is None else dA.numel(), dB, 0 if dB is None else dB.numel())
    meta = {"DROPOUT": drop["DROPOUT"], "SEED_FROM_PTR": drop["SEED_FROM_PTR"], "RS_PAD": layout.rs_pad,
            "H_PAD": layout.h_pad, "GROUPS": layout.groups, "SLICE_MASK": layout.mask, "ENABLED": layout.enabled,
            "PRECISION": precision(x.dtype), "BLOCK_M": block_m, "BLOCK_K": block_k, "AUX_PROGRAMS": AUX_PROGRAMS,
            "num_warps": 4, "num_stages": 2}
    _lora_down_kernel[(m_blocks + aux,)](*args, **meta)
    tuning.compile_seed_variant(_lora_down_kernel, (m_blocks + aux,), args, meta)
    return h


def needs_bpad(lora_B: Tensor, x: Tensor, layout: Layout) -> bool:
    """Whether B must be laid out anew for the backward GEMM (dense, contiguous ``(N, h_pad)``, in x's dtype)."""
    return not (layout.groups == 1 and lora_B.dtype == x.dtype and lora_B.shape[1] == layout.h_pad
                and lora_B.is_contiguous())


def prepare(x: Tensor, lora_A: Tensor, lora_B: Tensor, layout: Layout, drop: dict, N: int, needs: Needs) -> tuple:
    """``(h, bpad, dA buffer, dB buffer)`` for a backward that ``needs`` (dx, dA, dB): h from one launch that also
    lays out B and zeroes the fp32 buffers that dA (always) and dB (when split over rows) accumulate into."""
    need_dx, need_dA, need_dB = needs
    bpad = (torch.empty(N, layout.h_pad, device=x.device, dtype=x.dtype)
            if (need_dx or need_dA) and needs_bpad(lora_B, x, layout) else None)
    dA = torch.empty(lora_A.shape, device=x.device, dtype=torch.float32) if need_dA else None
    dB = (torch.empty(lora_B.shape, device=x.device, dtype=torch.float32)
          if need_dB and layout.db_splits > 1 else None)
    return down(x, lora_A, lora_B, layout, drop, bpad, dA, dB), bpad, dA, dB


# The persistent route. TMA needs 16-byte aligned base addresses and row strides, and unit-stride rows. Device-side
# descriptors live in global scratch memory that Triton asks ``triton.set_allocator``'s allocator for at each
# launch; the allocator is per thread (autograd runs the backward on its own), so every launch sets it.
TMA_ALIGN = 16  # bytes


def _tma_ready(t: Tensor, unit_dim: int) -> bool:
    """Whether a 2-D 16-bit tensor can be read through a descriptor with rows along ``unit_dim``: unit stride
    there, the other stride and the base address 16-byte aligned."""
    other = 1 - unit_dim
    return (t.stride(unit_dim) == 1 and (t.stride(other) * t.element_size()) % TMA_ALIGN == 0
            and t.data_ptr() % TMA_ALIGN == 0)


@functools.cache
def _capable(device_index: int) -> bool:
    """Whether the device has TMA and wgmma (sm_90 or later); the interpreter emulates any."""
    return INTERPRET or torch.cuda.get_device_capability(device_index)[0] >= 9


def _hopper_route(t: Tensor) -> tuple[int, int]:
    """``(SMs, shared memory)`` the persistent kernels size themselves by, or (0, 0) where they are not chosen or
    the device lacks TMA."""
    index = t.device.index or 0
    if GEMM != "hopper" or not _capable(index):
        return 0, 0
    return tuning.sm_count(index), tuning.smem_limit(index)


def hopper_applies(x: Tensor, weight: Tensor, h_pad: int, smem: int) -> bool:
    """Whether the persistent kernel can compute this forward: 16-bit x and W of one dtype, x and W (either layout)
    and y readable by TMA, and some config that fits for this padded rank."""
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    N = weight.shape[0]
    return (_tma_ready(x, 1) and (_tma_ready(weight, 1) or _tma_ready(weight, 0))
            and (N * x.element_size()) % TMA_ALIGN == 0
            and bool(tuning.fitting_tiles("hopper forward", tuning.family("hopper forward", x.shape[0], x.dtype),
                                          h_pad, smem)))


def hopper_applies_dx(dy: Tensor, weight: Tensor, b: Tensor, h_pad: int, smem: int) -> bool:
    """Whether the persistent dx kernel can compute dx: as :func:`hopper_applies` for dy and W, B's dense layout
    (``b``) and dx readable and writable by TMA."""
    if dy.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != dy.dtype or b.dtype != dy.dtype:
        return False
    K = weight.shape[1]
    return (_tma_ready(dy, 1) and (_tma_ready(weight, 1) or _tma_ready(weight, 0)) and _tma_ready(b, 1)
            and (K * dy.element_size()) % TMA_ALIGN == 0
            and bool(tuning.fitting_tiles("hopper dx", tuning.family("hopper dx", dy.shape[0], dy.dtype), h_pad,
                                          smem)))


def scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory for the device-side descriptors (on the current device, which the launcher sets)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def hopper_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, lora_B: Tensor, h: Tensor, scale: float,
                layout: Layout, out: Tensor, sms: int, smem: int) -> None:
    """``out = x @ W.T + bias + scale * h @ B.T`` through the persistent kernel, on ``sms`` programs at most; the
    caller has checked :func:`hopper_applies`."""
    (M, K), N = x.shape, weight.shape[0]
    w_t = weight.stride(1) != 1
    args = (x, weight, h, lora_B, bias if bias is not None else out, out, M, N, K, layout.rank, layout.group_rows,
            x.stride(0), weight.stride(1 if w_t else 0), *lora_B.stride(), out.stride(0), scale)
    meta = {"HAS_BIAS": bias is not None, "W_T": w_t, "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad,
            "GROUPS": layout.groups, "SLICE_MASK": layout.mask}

    def grid(cfg: dict) -> tuple[int]:
        return (max(1, min(sms, triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]))),)
    triton.set_allocator(scratch)
    family = tuning.family("hopper forward", M, x.dtype)
    key = ("hopper forward", family, N, K, *meta.values(), x.dtype, lora_B.dtype, x.device.index)
    tuning.launch("hopper forward", grid, args, meta, key, family, layout.h_pad, smem)


def hopper_dx(dy: Tensor, weight: Tensor, lora_A: Tensor, b: Tensor, x: Tensor, out: Tensor, dA: Tensor | None,
              layout: Layout, scale: float, drop: dict, sms: int, smem: int) -> None:
    """``out = dy @ W + scale * keep * (dy @ B) @ A / (1-p)`` and, with ``dA`` (a zeroed fp32 buffer), dA added
    atomically, through the persistent kernel; ``b`` is B's dense ``(N, h_pad)`` layout; the caller has checked
    :func:`hopper_applies_dx`."""
    (M, N), K = dy.shape, weight.shape[1]
    w_t = weight.stride(1) != 1
    args = (dy, weight, lora_A, b, x, out, dA if dA is not None else out, drop["seed_ptr"], M, N, K, layout.rank,
            dy.stride(0), weight.stride(1 if w_t else 0), *lora_A.stride(), *x.stride(), out.stride(0),
            scale, drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"])
    meta = {"NEED_DA": dA is not None, "DROPOUT": drop["DROPOUT"], "SEED_FROM_PTR": drop["SEED_FROM_PTR"],
            "W_T": w_t, "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad, "ENABLED": layout.enabled}

    def grid(cfg: dict) -> tuple[int]:
        return (max(1, min(sms, triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]))),)
    triton.set_allocator(scratch)
    family = tuning.family("hopper dx", M, dy.dtype)
    key = ("hopper dx", family, N, K, dA is not None, drop["DROPOUT"], w_t, layout.rs_pad, layout.h_pad,
           layout.enabled, dy.dtype, lora_A.dtype, dy.device.index)
    tuning.launch("hopper dx", grid, args, meta, key, family, layout.h_pad, smem)


class DoraEpilogue(NamedTuple):
    """What DoRA adds to the forward GEMM: each feature's fp32 factor ``c``, the dropout arguments (both base
    products accumulated when it drops), and ``u`` (the pre-scale output, written for dm) or None."""

    c: Tensor
    drop: dict
    u: Tensor | None


def gemm(x: Tensor, weight: Tensor, bias: Tensor | None, lora_B: Tensor, h: Tensor, scale: float,
         layout: Layout, dora: DoraEpilogue | None = None) -> Tensor:
    """The forward GEMM with bias and the rank-R term in its epilogue (and DoRA's factors, ``dora``)."""
    (M, K), N = x.shape, weight.shape[0]
    out = x.new_empty(M, N)
    sms, smem = _hopper_route(x) if dora is None else (0, 0)
    if smem and hopper_applies(x, weight, layout.h_pad, smem):
        hopper_gemm(x, weight, bias, lora_B, h, scale, layout, out, sms, smem)
        return out
    drop = dora.drop if dora is not None else NO_DROPOUT
    args = (x, weight, h, lora_B, bias if bias is not None else out, out, M, N, K, layout.rank, layout.group_rows,
            *x.stride(), *weight.stride(), *lora_B.stride(), *out.stride(), scale,
            dora.c if dora is not None else None, dora.u if dora is not None else None, drop["seed_ptr"],
            drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"])
    dropped = dora is not None and drop["DROPOUT"]
    meta = {"HAS_BIAS": bias is not None, "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad, "GROUPS": layout.groups,
            "SLICE_MASK": layout.mask, "PRECISION": precision(x.dtype), "DORA": dora is not None,
            "DROPOUT": dropped, "SEED_FROM_PTR": drop["SEED_FROM_PTR"]}
    role = "dropped forward" if dropped else "dora forward" if dora is not None else "forward"
    family = tuning.family(role, M, x.dtype)
    key = (role, family, N, K, bias is not None, dora is not None, dora is not None and dora.u is not None,
           layout.h_pad, layout.rs_pad, layout.mask, layout.groups, x.dtype, weight.dtype, lora_B.dtype,
           x.device.index)
    tuning.launch(role, lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),), args,
                  meta, key, family, layout.h_pad, tuning.smem_limit(x.device.index or 0))
    return out


def dx_gemm(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, b: Tensor, scale: float, layout: Layout,
            drop: dict, dx: Tensor | None, dA: Tensor | None, dora_c: Tensor | None = None) -> None:
    """The dx GEMM into ``dx`` with the rank-R term fused, and dA added into its zeroed fp32 buffer (``dA``);
    ``dora_c``: DoRA's per-feature factors, which scale dy on its way in."""
    (M, K), N = x.shape, weight.shape[0]
    sms, smem = _hopper_route(x) if dx is not None and dora_c is None else (0, 0)
    if smem and hopper_applies_dx(grad_out, weight, b, layout.h_pad, smem):
        hopper_dx(grad_out, weight, lora_A, b, x, dx, dA, layout, scale, drop, sms, smem)
        return
    args = (grad_out, weight, lora_A, b, x, dx if dx is not None else dA, dA if dA is not None else dx,
            drop["seed_ptr"], dora_c, M, N, K, layout.rank, *grad_out.stride(), *weight.stride(), *lora_A.stride(),
            *x.stride(), *(dx.stride() if dx is not None else (0, 0)),
            scale, drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"])
    meta = {"NEED_DX": dx is not None, "NEED_DA": dA is not None, "DROPOUT": drop["DROPOUT"],
            "SEED_FROM_PTR": drop["SEED_FROM_PTR"], "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad,
            "ENABLED": layout.enabled, "PRECISION": precision(x.dtype), "DORA": dora_c is not None}
    role = "dropped backward" if dora_c is not None and drop["DROPOUT"] and dx is not None else "backward"
    family = tuning.family(role, M, x.dtype)
    key = (role, family, N, K, dx is not None, dA is not None, drop["DROPOUT"], dora_c is not None, layout.h_pad,
           layout.rs_pad, layout.enabled, x.dtype, weight.dtype, lora_A.dtype, x.device.index)
    tuning.launch(role, lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),), args,
                  meta, key, family, layout.h_pad, tuning.smem_limit(x.device.index or 0))


class DoraGrads(NamedTuple):
    """What DoRA's dB kernel takes besides dB's: the factors ``c`` that scale dB's rows, and for dm (``dm`` its
    output, else None) the norms and the forward's pre-scale output ``u``."""

    c: Tensor
    norm: Tensor
    u: Tensor | None
    dm: Tensor | None


def db_gemm(grad_out: Tensor, h: Tensor, scale: float, layout: Layout, dB: Tensor | None, atomic: bool,
            dora: DoraGrads | None = None) -> None:
    """``dB = scale * dy.T @ h`` into ``dB`` (its own dtype), or added into its zeroed fp32 buffer (``atomic``);
    with ``dora``, dB's rows scaled by c and dm reduced into ``dora.dm`` alike."""
    c, norm, u, dm = dora if dora is not None else (None, None, None, None)
    _lora_db_kernel[(layout.db_blocks, layout.db_splits)](
        grad_out, h, dB, grad_out.shape[0], layout.db_rows, layout.rank, layout.group_rows, layout.db_rows_per_split,
        *grad_out.stride(), scale, c, norm, u, dm, grad_out.shape[1],
        ATOMIC=atomic, RS_PAD=layout.rs_pad, H_PAD=layout.h_pad, GROUPS=layout.groups, SLICE_MASK=layout.mask,
        PRECISION=precision(grad_out.dtype), NEED_DB=dB is not None, NEED_DM=dm is not None,
        BLOCK_N=layout.db_side, BLOCK_M=layout.db_side, num_warps=4, num_stages=layout.db_stages,
    )


def in_param_dtypes(dA: Tensor | None, a_dtype: torch.dtype, dB: Tensor | None, db_accumulated: bool,
                    b_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """dA (from its fp32 buffer) and dB (from its fp32 buffer when accumulated) in the parameters' dtypes: as
    they are for fp32 parameters, else converted, both in one launch."""
    cast_a = dA is not None and a_dtype != torch.float32
    cast_b = dB is not None and db_accumulated and b_dtype != torch.float32
    pairs = [(src, torch.empty_like(src, dtype=dtype)) for src, dtype, cast in ((dA, a_dtype, cast_a),
                                                                              (dB, b_dtype, cast_b)) if cast]
    if not pairs:
        return dA, dB
    (src1, dst1), (src2, dst2) = pairs[0], pairs[1] if len(pairs) == 2 else (pairs[0][0][:0], pairs[0][1][:0])
    block = 1024
    _cast_pair_kernel[(triton.cdiv(src1.numel(), block) + triton.cdiv(src2.numel(), block),)](
        src1, dst1, src1.numel(), src2, dst2, src2.numel(), BLOCK=block)
    converted = iter(dst for _, dst in pairs)
    return (next(converted) if cast_a else dA), (next(converted) if cast_b else dB)


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
            dropout_p: float, seed: Tensor, slices: Slices = None, needs: Needs | None = None) -> tuple[Tensor, tuple]:
    """``(out, saved)``: the fused LoRA linear (see :func:`fastlora.ops.reference.forward`) in two launches, and what
    :func:`backward` takes as ``saved`` for gradients ``needs`` (dx, dA, dB): h (so the backward need not read x to
    rebuild it), B laid out for the backward GEMM and the zeroed fp32 gradient buffers, all from the forward's first
    launch."""
    needs = needs or (False, False, False)
    (M, K), N = x.shape, weight.shape[0]
    if M == 0 or N == 0 or K == 0:  # nothing for the kernels to do: the reference's few ops
        return reference.forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices)
    lora_B, slices = _dense(lora_B, slices, N)
    shape = layout(M, N, lora_A.shape[0], slices, x.device.index or 0)
    with on_device(x):
        saved = prepare(x, lora_A, lora_B, shape, dropout_args(dropout_p, seed), N, needs)
        return gemm(x, weight, unit_stride(bias), lora_B, saved[0], scale, shape), saved


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
             dropout_p: float, seed: Tensor, needs: Needs, slices: Slices = None, saved: tuple = ()
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)`` as asked by ``needs``, dA and dB in the LoRA parameters' own dtype and layout; see
    :func:`fastlora.ops.reference.backward`. ``saved``: what :func:`forward` prepared (else prepared here, one more
    launch). Then one launch for dx and dA, one for dB, and one more only for 16-bit LoRA parameters (their fp32
    accumulation buffers converted)."""
    need_dx, need_dA, need_dB = needs
    (M, K), N = x.shape, weight.shape[0]
    if M == 0 or N == 0 or K == 0:
        return reference.backward(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, seed, needs, slices)
    lora_B, slices_in = _dense(lora_B, slices, N)
    shape = layout(M, N, lora_A.shape[0], slices_in, x.device.index or 0)
    drop = dropout_args(dropout_p, seed)
    dx = dB = None
    with on_device(x):
        h, bpad, dA_acc, dB_acc = saved or prepare(x, lora_A, lora_B, shape, drop, N, needs)
        if need_dx or need_dA:
            dx = x.new_empty(M, K) if need_dx else None
            dx_gemm(grad_out, x, weight, lora_A, lora_B if bpad is None else bpad, scale, shape, drop, dx,
                    dA_acc if need_dA else None)
        if need_dB:
            dB = dB_acc if dB_acc is not None else torch.empty(lora_B.shape, device=x.device, dtype=lora_B.dtype)
            db_gemm(grad_out, h, scale, shape, dB, dB_acc is not None)
        dA, dB = in_param_dtypes(dA_acc if need_dA else None, lora_A.dtype, dB, dB_acc is not None, lora_B.dtype)
    if dB is not None and slices is not None and slices_in is None:
        dB = stack_slices(dB, slices)
    return dx, dA, dB
