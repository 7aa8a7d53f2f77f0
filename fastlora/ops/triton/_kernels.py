"""Triton kernels of the triton backend: the dropout hash, the thin down-projection and two fused GEMMs.

``R_PAD`` is the rank padded to a power of two >= 16, so that every 16-bit dot has K >= 16;
the padding columns of ``A`` and ``B`` load as zeros.

- ``_lora_down_kernel``: ``h = dropout(x) @ A.T / (1 - p)``, an fp32 ``(M, R_PAD)`` buffer
  (one pass over x; the dropout hash is evaluated once per element).
- ``_lora_forward_kernel``: the base GEMM ``x @ W.T`` whose fp32 tile also accumulates
  ``scale * h @ B.T`` and the bias before it is written once.
- ``_lora_backward_kernel``: the dx GEMM ``dy @ W`` that also accumulates ``g = dy @ B`` from
  the same dy tiles, adds dB's share from them, fuses ``scale * keep * (g @ A) / (1-p)`` into
  dx and adds dA from the masked x tile of the same columns.

The dropout mask is the hash of :mod:`fastlora.ops.reference` on uint32 values, regenerated
from (seed, row, col) wherever it is needed, never stored.
"""

import triton
import triton.language as tl

# Scalars not worth a compiled variant per value class (==1, multiple of 16, other): the seed
# words; the row count and rank, which only bound masks along non-contiguous axes; and B's
# row stride (the rank, for a contiguous B), which only addresses one small tile. N, K and the
# other strides stay specialized: their divisibility lets the big loads vectorize.
_SHAPE = ["M", "R"]
_SEED = ["seed_lo", "seed_hi", "threshold"]


@triton.jit
def _mix(h):
    """lowbias32 on uint32 values (wrapping arithmetic)."""
    h ^= h >> 16
    h *= 0x21F0AAAD
    h ^= h >> 15
    h *= 0x735A2D97
    h ^= h >> 15
    return h


@triton.jit
def _keep_mask(rows, cols, seed_lo, seed_hi, threshold):
    """``(len(rows), len(cols))`` keep-mask; seed halves are int32 bit patterns, threshold a signed int32."""
    lo = seed_lo.to(tl.uint32, bitcast=True)
    hi = seed_hi.to(tl.uint32, bitcast=True)
    row_key = _mix(_mix(rows.to(tl.uint32) ^ lo) ^ hi)
    col_key = _mix(cols.to(tl.uint32) * 0x9E3779B9)
    hashed = (row_key[:, None] ^ col_key[None, :]) * 0x9E3779B1
    return hashed.to(tl.int32, bitcast=True) >= threshold


@triton.jit(do_not_specialize=_SHAPE + _SEED)
def _lora_down_kernel(
    x_ptr, a_ptr, h_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak,
    inv_keep, seed_lo, seed_hi, threshold,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row block of ``h = dropout(x) @ A.T * inv_keep`` (fp32, padding columns zero)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    row_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(offs_m, cols, seed_lo, seed_hi, threshold), x, 0.0)
        a = tl.load(a_ptr + cols[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                    mask=(cols[:, None] < K) & (offs_r[None, :] < R), other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * R_PAD + offs_r[None, :]
    tl.store(h_ptrs, acc * inv_keep, mask=row_ok[:, None])


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row block, column block), in groups of GROUP_M row blocks for L2 reuse."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit(do_not_specialize=[*_SHAPE, "stride_bn"])
def _lora_forward_kernel(
    x_ptr, w_ptr, h_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_om, stride_on,
    scale,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = x @ W.T + bias + scale * h @ B.T``, written once.

    ``x: (M, K)``, ``W: (N, K)`` and ``B: (N, R)`` take any strides; ``h`` is the contiguous
    fp32 ``(M, R_PAD)`` output of ``_lora_down_kernel`` (dropout already applied).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m = (offs_m % M).to(tl.int64)  # rows/cols past the end re-read valid ones and are never stored
    safe_n = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + safe_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + safe_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    offs_r = tl.arange(0, R_PAD)
    h = tl.load(h_ptr + safe_m[:, None] * R_PAD + offs_r[None, :])
    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + safe_n[None, :] * stride_bn,
                  mask=offs_r[:, None] < R, other=0.0)
    acc = tl.dot((h * scale).to(b_t.dtype), b_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=[*_SHAPE, "stride_bn", *_SEED])
def _lora_backward_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, h_ptr, dx_ptr, da_ptr, db_ptr, M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xm, stride_xk, stride_dxm, stride_dxk,
    scale, inv_keep, seed_lo, seed_hi, threshold,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_K)`` tile of dx, reading its rows of dy once for everything.

    The loop over the N output features accumulates ``dy @ W`` and ``g = dy @ B`` and, for
    every num_k-th chunk of N, adds ``dy.T @ h`` into dB. The epilogue adds
    ``scale * keep * (g @ A) / (1-p)`` to the dx tile, writes it once, and adds
    ``scale * g.T @ dropout(x)`` for these columns into dA. dA ``(R, K)`` and dB ``(N, R)`` are
    zeroed contiguous fp32 buffers that every program adds into atomically; ``h`` is
    ``_lora_down_kernel``'s output (dropout and 1/(1-p) included).
    """
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    num_k = tl.cdiv(K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    row_ok = offs_m < M
    safe_m = (offs_m % M).to(tl.int64)  # rows past the end re-read valid ones; h and x zero them
    safe_k = (offs_k % K).to(tl.int64)
    dy_ptrs = dy_ptr + safe_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + safe_k[None, :] * stride_wk
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    if NEED_DB:
        h = tl.load(h_ptr + safe_m[:, None] * R_PAD + offs_r[None, :], mask=row_ok[:, None], other=0.0)
        h = h.to(dy_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_left = N - n * BLOCK_N
        dy = tl.load(dy_ptrs, mask=offs_n[None, :] < n_left, other=0.0)
        if NEED_DX:
            w = tl.load(w_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        b = tl.load(b_ptrs, mask=(offs_n[:, None] < n_left) & (offs_r[None, :] < R), other=0.0)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        if NEED_DB:  # noqa: SIM102 (a constexpr test: h only exists when NEED_DB)
            if n % num_k == pid_k:  # the dB work is spread over the programs of this row block
                db = tl.dot(tl.trans(dy), h, input_precision=PRECISION)
                tl.atomic_add(db_ptr + (n * BLOCK_N + offs_n)[:, None] * R + offs_r[None, :], db * scale,
                              mask=(offs_n[:, None] < n_left) & (offs_r[None, :] < R), sem="relaxed")
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
        b_ptrs += BLOCK_N * stride_bn

    g_scaled = (g * (scale * inv_keep)).to(dy_ptr.dtype.element_ty)
    if DROPOUT:
        keep = _keep_mask(offs_m, offs_k, seed_lo, seed_hi, threshold)
    if NEED_DX:
        a_t = tl.load(a_ptr + offs_r[:, None] * stride_ar + safe_k[None, :] * stride_ak,
                      mask=offs_r[:, None] < R, other=0.0)
        if DROPOUT:
            acc += tl.where(keep, tl.dot(g_scaled, a_t, input_precision=PRECISION), 0.0)
        else:
            acc = tl.dot(g_scaled, a_t, acc, input_precision=PRECISION)
        dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_k[None, :] < K))
    if NEED_DA:
        x = tl.load(x_ptr + safe_m[:, None] * stride_xm + safe_k[None, :] * stride_xk,
                    mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(keep, x, 0.0)
        da = tl.dot(tl.trans(g_scaled), x, input_precision=PRECISION)
        tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da,
                      mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), sem="relaxed")
