"""The forward and dx GEMMs at Hopper grade (sm_90+, 16-bit): persistent kernels with TMA loads and wgmma, the
LoRA work fused. Chosen over the tiled kernels by ``FASTLORA_TRITON_GEMM=hopper`` where :func:`applies` /
:func:`applies_dx`.

``_hopper_forward_kernel`` computes what ``_lora_forward_kernel`` does, ``y = x @ W.T + bias + scale * h @ B.T``
with h the down kernel's fp32 ``(M, H_PAD)`` and B read natively (its own dtype and strides, slices through
``_slice_of``), but as Triton's persistent matmul tutorial and Inductor's persistent TMA template do: one
program per SM walks the output tiles in grouped order; x and W tiles come through device-side tensor
descriptors (TMA copies into a shared-memory ring, zero-filled past the edges, so the K loop has no masks) and
feed wgmma; the epilogue adds the rank-R term (one more small dot into the fp32 tile) and the bias, and stores
the tile through a descriptor in ``SUBTILES`` column pieces (the store's shared-memory buffer shrinks, leaving
room for pipeline stages). ``_hopper_dx_kernel`` does the same for ``_lora_backward_kernel``'s dx (with dA):
dy, W and B's dense layout through descriptors in its loop, the masked rank-R term, the dx store and dA's
atomic add in its epilogue. The tile loops are not flattened into the inner loops (``tl.range(...,
flatten=True)``), as Inductor's template is not: ptxas 12.8 serialized a flattened forward's wgmma
(docs/triton-notes.md).

TMA needs 16-byte aligned base addresses and row strides and unit-stride rows: the ``applies`` checks test them.
W is read as ``(N, K)`` rows (nn.Linear) or, ``W_T``, as ``(K, N)`` rows (a Conv1D weight used as its transpose).
Device-side descriptors live in a global scratch buffer that Triton asks ``triton.set_allocator``'s allocator
for at each launch; the allocator is per thread (autograd runs the backward on its own), so every launch sets it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# relative: tests/compile_kernels.py loads this file outside the package
from ._kernels import _b_tile, _col_keys, _grouped_tile, _kept, _rank_row, _row_keys, _seed_halves

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, SUBTILES), after Inductor's persistent TMA configs; below SMALL_M
# rows (the tiled kernel's bound) one 64-row tile. Configs that do not fit are dropped (see _fitting).
TILES = {
    "large": [(128, 256, 64, 3, 8, 2), (256, 128, 64, 3, 8, 2), (128, 128, 64, 4, 8, 1), (128, 128, 128, 3, 4, 2),
              (128, 128, 64, 5, 4, 2)],
    "small-m": [(64, 128, 64, 4, 4, 1)],
}
# The dx kernel's (BLOCK_M, BLOCK_K, BLOCK_N, stages, warps, SUBTILES): its output tile spans in-features, its loop
# runs over out-features; it holds g and, with dropout, a second output-sized fp32 tile, so no 256-wide tiles.
DX_TILES = {
    "large": [(128, 128, 64, 4, 8, 2), (128, 128, 64, 3, 8, 1), (128, 64, 64, 4, 4, 1)],
    "small-m": [(64, 128, 64, 4, 4, 1)],
}
SMALL_M = 1024
REGISTER_BUDGET = 192  # fp32 values a thread may hold at the epilogue (see _fitting), as the tiled kernels' budget
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SUBTILES": 2}
INTERPRET_SMS = 2
TMA_ALIGN = 16  # bytes
BARRIERS = 1024  # bytes of shared memory for the pipeline's mbarriers and alignment, above the tiles


@triton.jit(do_not_specialize=["M", "R", "stride_bn", "GROUP_ROWS"])
def _hopper_forward_kernel(
    x_ptr, w_ptr, h_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, R, GROUP_ROWS,
    stride_xm, stride_w, stride_bn, stride_br, stride_om, scale,
    HAS_BIAS: tl.constexpr, W_T: tl.constexpr, RS_PAD: tl.constexpr, H_PAD: tl.constexpr, GROUPS: tl.constexpr,
    SLICE_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SUBTILES: tl.constexpr,
):
    """``y = x @ W.T + bias + scale * h @ B.T`` over all ``(BLOCK_M, BLOCK_N)`` tiles, this program taking every
    ``num_programs``-th. x ``(M, K)``, W ``(N, K)`` (or ``(K, N)`` with W_T) and y have unit-stride rows and
    16-byte aligned row strides; h and B as ``_lora_forward_kernel`` reads them."""
    dtype = x_ptr.dtype.element_ty
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_T:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_w, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_w, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                       block_shape=[BLOCK_M, BLOCK_N // SUBTILES])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    offs_c = tl.arange(0, H_PAD)
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
        first_m = pid_m * BLOCK_M
        first_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_steps):
            x = x_desc.load([first_m, k * BLOCK_K])
            if W_T:
                w = w_desc.load([k * BLOCK_K, first_n])
            else:
                w = w_desc.load([first_n, k * BLOCK_K]).T
            acc = tl.dot(x, w, acc)

        # rows/cols past the end re-read valid ones; the descriptor's store drops them
        safe_m = ((first_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
        safe_n = (first_n + tl.arange(0, BLOCK_N)) % N
        b_t = _b_tile(b_ptr, offs_c, safe_n, R, stride_br, stride_bn, GROUP_ROWS, GROUPS, SLICE_MASK, RS_PAD)
        h = tl.load(h_ptr + safe_m[:, None] * H_PAD + offs_c[None, :])
        acc = tl.dot((h * scale).to(dtype), b_t.to(dtype), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
        if SUBTILES == 2:
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            y_desc.store([first_m, first_n], left.to(dtype))
            y_desc.store([first_m, first_n + BLOCK_N // 2], right.to(dtype))
        else:
            y_desc.store([first_m, first_n], acc.to(dtype))


@triton.jit(do_not_specialize=["M", "R", "seed_lo", "seed_hi", "threshold"])
def _hopper_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, dx_ptr, da_ptr, seed_ptr, M, N, K, R,
    stride_dym, stride_w, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm,
    scale, inv_keep, seed_lo, seed_hi, threshold,
    NEED_DA: tl.constexpr, DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr, W_T: tl.constexpr,
    RS_PAD: tl.constexpr, H_PAD: tl.constexpr, ENABLED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILES: tl.constexpr,
):
    """``_lora_backward_kernel``'s dx (and dA, NEED_DA) over all ``(BLOCK_M, BLOCK_K)`` tiles of dx, persistent:
    the loop over out-features loads dy, W and B tiles through descriptors and accumulates ``dy @ W`` and
    ``g = dy @ B`` (B: the dense ``(N, H_PAD)`` layout in dy's dtype); the epilogue adds ``scale * keep *
    (g @ A) / (1-p)``, stores dx through a descriptor and adds dA from the masked x tile. dy ``(M, N)``, W
    ``(N, K)`` rows (or ``(K, N)`` rows with W_T, a Conv1D weight) and dx have unit-stride rows and 16-byte
    aligned row strides; A and x any strides; dA an fp32 ``(R * enabled, K)`` buffer."""
    dtype = dy_ptr.dtype.element_ty
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, N], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_N])
    if W_T:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_w, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_w, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, H_PAD], strides=[H_PAD, 1], block_shape=[BLOCK_N, H_PAD])
    dx_desc = tl.make_tensor_descriptor(dx_ptr, shape=[M, K], strides=[stride_dxm, 1],
                                        block_shape=[BLOCK_M, BLOCK_K // SUBTILES])
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    n_steps = tl.cdiv(N, BLOCK_N)
    real, a_row = _rank_row(tl.arange(0, H_PAD), R, RS_PAD, ENABLED)
    if DROPOUT:
        lo, hi = _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
    for tile in range(tl.program_id(0), num_m * num_k, tl.num_programs(0)):
        pid_m, pid_k = _grouped_tile(tile, num_m, num_k, GROUP_M)
        first_m = pid_m * BLOCK_M
        first_k = pid_k * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        g = tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32)
        for n in range(n_steps):
            dy = dy_desc.load([first_m, n * BLOCK_N])
            if W_T:
                w = w_desc.load([first_k, n * BLOCK_N]).T
            else:
                w = w_desc.load([n * BLOCK_N, first_k])
            acc = tl.dot(dy, w, acc)
            g = tl.dot(dy, b_desc.load([n * BLOCK_N, 0]), g)

        g_scaled = (g * (scale * inv_keep)).to(dtype)
        offs_m = first_m + tl.arange(0, BLOCK_M)
        offs_k = first_k + tl.arange(0, BLOCK_K)
        safe_k = (offs_k % K).to(tl.int64)  # columns past the end re-read valid ones; the store drops them
        a_t = tl.load(a_ptr + a_row[:, None] * stride_ar + safe_k[None, :] * stride_ak, mask=real[:, None], other=0.0)
        if DROPOUT:
            row_key = _row_keys(offs_m, lo, hi)
            col_key = _col_keys(offs_k)
            keep = _kept(row_key[:, None], col_key[None, :], threshold)
            acc += tl.where(keep, tl.dot(g_scaled, a_t.to(dtype)), 0.0)
        else:
            acc = tl.dot(g_scaled, a_t.to(dtype), acc)
        if SUBTILES == 2:
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_K // 2)), (0, 2, 1)))
            dx_desc.store([first_m, first_k], left.to(dtype))
            dx_desc.store([first_m, first_k + BLOCK_K // 2], right.to(dtype))
        else:
            dx_desc.store([first_m, first_k], acc.to(dtype))
        if NEED_DA:  # x loaded transposed, so dA's (BLOCK_K, H_PAD) tile needs no tl.trans
            row_ok = offs_m < M
            col_ok = offs_k < K
            safe_m = (offs_m % M).to(tl.int64)
            x_t = tl.load(x_ptr + safe_k[:, None] * stride_xk + safe_m[None, :] * stride_xm,
                          mask=col_ok[:, None] & row_ok[None, :], other=0.0)
            if DROPOUT:
                x_t = tl.where(_kept(row_key[None, :], col_key[:, None], threshold), x_t, 0.0)
            tl.atomic_add(da_ptr + a_row[None, :] * K + offs_k[:, None], tl.dot(x_t, g_scaled),
                          mask=col_ok[:, None] & real[None, :], sem="relaxed")


def _smem_bytes(tile: tuple, h_pad: int, dx: bool = False) -> int:
    """Shared memory of a config, an upper estimate: the pipeline's stages (x and W; dx: dy, W and B), the
    store's buffer and the epilogue's operands (h and B; dx: A and x), all at once (the persistent loop may keep
    the ring live across the epilogue)."""
    rows, cols, step, stages, _, subtiles = tile
    loop = (rows + cols + h_pad) * step if dx else (rows + cols) * step
    return 2 * (stages * loop + rows * cols // subtiles + h_pad * (rows + cols) + (cols * rows if dx else 0)) + BARRIERS


@functools.cache
def _fitting(family: str, h_pad: int, smem_limit: int, dx: bool = False) -> tuple[tuple, ...]:
    """The family's configs that fit ``smem_limit`` bytes and the register budget (none: the tiled kernel runs):
    the output tile and h (forward), or the dx tile, g and the masked rank-R term (dx)."""
    return tuple(t for t in (DX_TILES if dx else TILES)[family] if _smem_bytes(t, h_pad, dx) <= smem_limit
                 and t[0] * ((2 if dx else 1) * t[1] + h_pad) // (32 * t[4]) <= REGISTER_BUDGET)


def _family(rows: int) -> str:
    return "small-m" if rows < SMALL_M else "large"


def _tma_ready(t: Tensor, unit_dim: int) -> bool:
    """Whether a 2-D 16-bit tensor can be read through a descriptor with rows along ``unit_dim``: unit stride
    there, the other stride and the base address 16-byte aligned."""
    other = 1 - unit_dim
    return (t.stride(unit_dim) == 1 and (t.stride(other) * t.element_size()) % TMA_ALIGN == 0
            and t.data_ptr() % TMA_ALIGN == 0)


_CAPABLE: dict[int, bool] = {}


def _capable(t: Tensor) -> bool:
    """Whether ``t``'s device has TMA and wgmma (sm_90 or later), asked once per device; the interpreter emulates
    any."""
    index = t.device.index or 0
    if index not in _CAPABLE:
        _CAPABLE[index] = INTERPRET or torch.cuda.get_device_capability(t.device)[0] >= 9
    return _CAPABLE[index]


def applies(x: Tensor, weight: Tensor, h_pad: int, smem_limit: int) -> bool:
    """Whether the persistent kernel can compute this forward: 16-bit x and W of one dtype on an sm_90+ GPU, x
    and W (either layout) and y readable by TMA, and some config that fits for this padded rank."""
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    N = weight.shape[0]
    return (_capable(x) and _tma_ready(x, 1) and (_tma_ready(weight, 1) or _tma_ready(weight, 0))
            and (N * x.element_size()) % TMA_ALIGN == 0 and bool(_fitting(_family(x.shape[0]), h_pad, smem_limit)))


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory for the device-side descriptors (on the current device, which the launcher sets)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def applies_dx(dy: Tensor, weight: Tensor, b: Tensor, h_pad: int, smem_limit: int) -> bool:
    """Whether the persistent dx kernel can compute dx: as :func:`applies` for dy and W, B's dense layout (``b``)
    and dx readable and writable by TMA."""
    if dy.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != dy.dtype or b.dtype != dy.dtype:
        return False
    K = weight.shape[1]
    return (_capable(dy) and _tma_ready(dy, 1) and (_tma_ready(weight, 1) or _tma_ready(weight, 0))
            and _tma_ready(b, 1) and (K * dy.element_size()) % TMA_ALIGN == 0
            and bool(_fitting(_family(dy.shape[0]), h_pad, smem_limit, True)))


_AUTOTUNED: dict[tuple, triton.runtime.Autotuner] = {}
_CHOSEN: dict[tuple, triton.Config] = {}


def _configs(family: str, h_pad: int, smem_limit: int, dx: bool = False) -> list[triton.Config]:
    loop_step = "BLOCK_N" if dx else "BLOCK_K"  # dx: the tile spans (M, K), the loop runs over N
    return [triton.Config({"BLOCK_M": rows, "BLOCK_K" if dx else "BLOCK_N": cols, loop_step: step, "GROUP_M": 8,
                           "SUBTILES": subtiles}, num_stages=stages, num_warps=warps)
            for rows, cols, step, stages, warps, subtiles in _fitting(family, h_pad, smem_limit, dx)]


def _tuned_launch(kernel, dx: bool, grid, args: tuple, meta: dict, key: tuple, h_pad: int, smem_limit: int,
                  reset: list[str] | None = None) -> dict:
    """Launch with the config autotuning chose for ``key`` (kernel, shape family, ...), tuned on its first call
    and launched straight from the JIT afterwards; returns the launch's full meta-parameters (config included)."""
    triton.set_allocator(_scratch)
    config = _CHOSEN.get(key)
    if config is None:
        variant = (dx, key[1], h_pad, smem_limit)
        if variant not in _AUTOTUNED:
            _AUTOTUNED[variant] = triton.autotune(_configs(key[1], h_pad, smem_limit, dx), key=["N", "K", *meta],
                                                  reset_to_zero=reset)(kernel)
        tuned = _AUTOTUNED[variant]
        tuned[grid](*args, **meta)
        config = _CHOSEN[key] = tuned.best_config
    else:
        kernel[grid(config.kwargs)](*args, **meta, **config.all_kwargs())
    return {**meta, **config.all_kwargs()}


def gemm(x: Tensor, weight: Tensor, bias: Tensor | None, lora_B: Tensor, h: Tensor, scale: float, layout,
         out: Tensor, sms: int, smem_limit: int) -> None:
    """``out = x @ W.T + bias + scale * h @ B.T`` (see the kernel) for the rank axis of ``layout`` (the
    launcher's ``_Layout``), on ``sms`` programs at most; the caller has checked :func:`applies`. Autotuned on
    the first call for each variant and shape family, launched straight from the JIT afterwards."""
    (M, K), N = x.shape, weight.shape[0]
    w_t = weight.stride(1) != 1
    args = (x, weight, h, lora_B, bias if bias is not None else out, out, M, N, K, layout.rank, layout.group_rows,
            x.stride(0), weight.stride(1 if w_t else 0), *lora_B.stride(), out.stride(0), scale)
    meta = {"HAS_BIAS": bias is not None, "W_T": w_t, "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad,
            "GROUPS": layout.groups, "SLICE_MASK": layout.mask}

    def grid(cfg: dict) -> tuple[int]:
        return (max(1, min(sms, triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]))),)
    if INTERPRET:
        _hopper_forward_kernel[grid(INTERPRET_CONFIG)](*args, **meta, **INTERPRET_CONFIG)
        return
    key = ("forward", _family(M), N, K, *meta.values(), x.dtype, lora_B.dtype, x.device.index)
    _tuned_launch(_hopper_forward_kernel, False, grid, args, meta, key, layout.h_pad, smem_limit)


def dx(dy: Tensor, weight: Tensor, lora_A: Tensor, b: Tensor, x: Tensor, out: Tensor, dA: Tensor | None, layout,
       scale: float, drop: dict, sms: int, smem_limit: int) -> tuple:
    """``out = dy @ W + scale * keep * (dy @ B) @ A / (1-p)`` and, with ``dA`` (a zeroed fp32 buffer), dA added
    atomically (see the kernel); ``b`` is B's dense ``(N, h_pad)`` layout, ``drop`` the launcher's dropout
    arguments; the caller has checked :func:`applies_dx`. Returns the launch's ``(grid, args, meta)``."""
    (M, N), K = dy.shape, weight.shape[1]
    w_t = weight.stride(1) != 1
    args = (dy, weight, lora_A, b, x, out, dA if dA is not None else out, drop["seed_ptr"], M, N, K, layout.rank,
            dy.stride(0), weight.stride(1 if w_t else 0), *lora_A.stride(), *x.stride(), out.stride(0),
            scale, drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"])
    meta = {"NEED_DA": dA is not None, "DROPOUT": drop["DROPOUT"], "SEED_FROM_PTR": drop["SEED_FROM_PTR"],
            "W_T": w_t, "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad, "ENABLED": layout.enabled}

    def grid(cfg: dict) -> tuple[int]:
        return (max(1, min(sms, triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]))),)
    if INTERPRET:
        _hopper_dx_kernel[grid(INTERPRET_CONFIG)](*args, **meta, **INTERPRET_CONFIG)
        return grid(INTERPRET_CONFIG), args, {**meta, **INTERPRET_CONFIG}
    key = ("dx", _family(M), N, K, *meta.values(), dy.dtype, lora_A.dtype, dy.device.index)
    # dA is accumulated atomically: tuning zeroes it before every trial (dx, in its place without dA, is overwritten)
    meta = _tuned_launch(_hopper_dx_kernel, True, grid, args, meta, key, layout.h_pad, smem_limit, reset=["da_ptr"])
    return grid(meta), args, meta


def tuned_configs() -> list[dict]:
    """What autotuning chose in this process, per key: for benchmark reports."""
    return [{"key": [str(k) for k in key], "tile": dict(config.kwargs), "num_warps": config.num_warps,
             "num_stages": config.num_stages} for key, config in _CHOSEN.items()]
