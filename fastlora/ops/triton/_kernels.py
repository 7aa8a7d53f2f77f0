"""Triton kernels of the triton backend: the dropout hash, the thin rank-R passes and the fused GEMM.

Three kernels serve forward and backward (``R_PAD``: the rank padded to a power of two >= 16,
so that every 16-bit dot has K >= 16; the padding columns of ``A`` and ``B`` load as zeros):

- ``_lora_down_kernel``: ``h = dropout(x) @ A.T / (1 - p)``, an fp32 ``(M, R_PAD)`` buffer.
- ``_lora_gemm_kernel``: ``out = P @ Q + bias + scale * [keep *] (L @ U.T)``, the base GEMM
  with the rank-R update accumulated into the same fp32 tile, written once. Forward uses
  ``P = x, Q = W.T, L = h, U = B``; backward's dx uses ``P = dy, Q = W, L = dy @ B, U = A.T``
  with the dropout mask applied to the rank-R term.
- ``_lora_grad_kernel``: one pass over ``dy`` per row block gives ``g = dy @ B`` and adds
  ``scale * dy.T @ h`` into dB, then one pass over ``x`` adds ``scale * g.T @ dropout(x)`` into dA.

The dropout mask is the hash of :mod:`fastlora.ops.reference` on uint32 values, regenerated
from (seed, row, col) wherever it is needed, never stored.
"""

import triton
import triton.language as tl

_NO_SPECIALIZE = ["seed_lo", "seed_hi", "threshold"]


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
    """``(len(rows), len(cols))`` keep-mask; seed halves and threshold are int32 bit patterns."""
    lo = seed_lo.to(tl.uint32, bitcast=True)
    hi = seed_hi.to(tl.uint32, bitcast=True)
    row_key = _mix(_mix(rows.to(tl.uint32) ^ lo) ^ hi)
    col_key = cols.to(tl.uint32) * 0x9E3779B9
    return _mix(row_key[:, None] ^ col_key[None, :]) >= threshold.to(tl.uint32, bitcast=True)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
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


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _lora_gemm_kernel(
    p_ptr, q_ptr, low_ptr, up_ptr, bias_ptr, out_ptr, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_un, stride_ur, stride_om, stride_on,
    scale, seed_lo, seed_hi, threshold,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``P @ Q + bias + scale * [keep *] (L @ U.T)``.

    ``P: (M, K)``, ``Q: (K, N)`` and ``U: (N, R)`` take any strides; ``L`` is the contiguous
    fp32 ``(M, R_PAD)`` buffer of a thin kernel. The keep-mask (``DROPOUT``) is the dropout
    hash at the output's (row, col).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m = (offs_m % M).to(tl.int64)  # out-of-range rows/cols re-read valid ones; never stored
    safe_n = (offs_n % N).to(tl.int64)
    p_ptrs = p_ptr + safe_m[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + safe_n[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        p = tl.load(p_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        q = tl.load(q_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    offs_r = tl.arange(0, R_PAD)
    low = tl.load(low_ptr + safe_m[:, None] * R_PAD + offs_r[None, :])
    up_t = tl.load(up_ptr + offs_r[:, None] * stride_ur + safe_n[None, :] * stride_un,
                   mask=offs_r[:, None] < R, other=0.0)
    low = (low * scale).to(up_t.dtype)
    if DROPOUT:
        update = tl.dot(low, up_t, input_precision=PRECISION)
        acc += tl.where(_keep_mask(offs_m, offs_n, seed_lo, seed_hi, threshold), update, 0.0)
    else:
        acc = tl.dot(low, up_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _lora_grad_kernel(
    dy_ptr, b_ptr, h_ptr, x_ptr, g_ptr, da_ptr, db_ptr, M, N, K, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xm, stride_xk,
    scale, inv_keep, seed_lo, seed_hi, threshold,
    NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row block: ``g = dy @ B`` (stored), ``dB += scale * dy.T @ h``, ``dA += scale * g.T @ dropout(x)``.

    dA ``(R, K)`` and dB ``(N, R)`` are contiguous fp32 buffers that row blocks add into atomically.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    row_ok = offs_m < M
    rows64 = offs_m.to(tl.int64)
    if NEED_DB:
        h = tl.load(h_ptr + rows64[:, None] * R_PAD + offs_r[None, :], mask=row_ok[:, None], other=0.0)
        h = h.to(dy_ptr.dtype.element_ty)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=col_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        if NEED_DB:
            db = tl.dot(tl.trans(dy), h, input_precision=PRECISION)
            tl.atomic_add(db_ptr + cols[:, None] * R + offs_r[None, :], db * scale,
                          mask=col_ok[:, None] & (offs_r[None, :] < R))
    tl.store(g_ptr + rows64[:, None] * R_PAD + offs_r[None, :], g, mask=row_ok[:, None])
    if NEED_DA:
        g_t = tl.trans(g.to(dy_ptr.dtype.element_ty))
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
            if DROPOUT:
                x = tl.where(_keep_mask(offs_m, cols, seed_lo, seed_hi, threshold), x, 0.0)
            da = tl.dot(g_t, x, input_precision=PRECISION)
            tl.atomic_add(da_ptr + offs_r[:, None] * K + cols[None, :], da * (scale * inv_keep),
                          mask=(offs_r[:, None] < R) & (cols[None, :] < K))
