"""Triton kernels of the triton backend: the dropout hash, two thin low-rank passes and two fused GEMMs.

``R_PAD`` is the rank padded to a power of two >= 16, so that every 16-bit dot has K >= 16;
the padding columns of ``A`` and ``B`` load as zeros.

- ``_lora_down_kernel``: ``h = dropout(x) @ A.T / (1 - p)``, an fp32 ``(M, R_PAD)`` buffer
  (one pass over x; the dropout hash is evaluated once per element).
- ``_lora_forward_kernel``: the base GEMM ``x @ W.T`` whose fp32 tile also accumulates
  ``scale * h @ B.T`` and the bias before it is written once.
- ``_lora_backward_kernel``: the dx GEMM ``dy @ W`` that also accumulates ``g = dy @ B`` (B
  zero-padded to ``(N, R_PAD)``) from the same dy tiles, fuses ``scale * keep * (g @ A) /
  (1-p)`` into dx and adds dA from the masked x tile of the same columns.
- ``_lora_db_kernel``: ``dB = scale * dy.T @ h``, one fp32 tile per program over a split of
  the rows, written once after its loop.
- ``_mixed_stack_kernel``, ``_mixed_down_kernel``, ``_mixed_gemm_kernel``, ``_mixed_grad_kernel``: the same
  for batches whose rows each name their own adapter (see the comment above them).

Rules the CPU interpreter cannot check (it runs no software pipeline) but a GPU compile can
break: a pipelined loop holds only loads and dots under compile-time conditions; no tile it
loads is masked along its unit-stride axis by anything but the loop's own bound (not by the
rank R: padding to R_PAD is the launcher's job), so that each can be copied asynchronously
into a shared-memory ring; every atomic add is one per program, after its loop; transposed
operands are loaded through transposed pointers, never made with ``tl.trans``.

A dB added inside the backward's loop, and B's tile masked along the rank, each passed the interpreter and
came out wrong on a GPU (docs/triton-notes.md); tests/compile_kernels.py reads the machine code of every variant.

The dropout mask is the hash of :mod:`fastlora.ops.reference` on uint32 values, regenerated
from (seed, row, col) wherever it is needed, never stored.
"""

import triton
import triton.language as tl

# Scalars not worth a compiled variant per value class (==1, multiple of 16, other): the seed
# words; the row count and rank, which only bound masks along non-contiguous axes; and, in the
# forward, B's row stride (the rank, for a contiguous B), which only addresses its one epilogue
# tile. N, K and the other strides stay specialized: their divisibility lets the big loads
# vectorize.
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
def _row_keys(rows, seed_lo, seed_hi):
    """Each row's fully mixed key; the seed halves are int32 bit patterns."""
    lo = seed_lo.to(tl.uint32, bitcast=True)
    hi = seed_hi.to(tl.uint32, bitcast=True)
    return _mix(_mix(rows.to(tl.uint32) ^ lo) ^ hi)


@triton.jit
def _col_keys(cols):
    """Each column's fully mixed key."""
    return _mix(cols.to(tl.uint32) * 0x9E3779B9)


@triton.jit
def _kept(row_key, col_key, threshold):
    """Keep-mask of broadcast row and column keys, in either orientation; threshold a signed int32."""
    hashed = (row_key ^ col_key) * 0x9E3779B1
    return hashed.to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR: tl.constexpr):
    """The seed's low and high 32 bits as int32 bit patterns: the scalars, or read from the 0-d int64 at
    ``seed_ptr`` (a seed drawn on the device, e.g. inside a CUDA graph, where every replay draws anew)."""
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
        return seed.to(tl.int32), (seed >> 32).to(tl.int32)
    return seed_lo, seed_hi


@triton.jit
def _slice_of(cols, GROUP_ROWS, GROUPS: tl.constexpr, SLICE_MASK: tl.constexpr):
    """For output features ``cols``: whether their group is enabled, the group's index among the enabled ones,
    and each feature's row in the stacked ``(GROUP_ROWS * enabled, r)`` B."""
    group = cols // GROUP_ROWS
    enabled = tl.zeros_like(cols) != 0
    index = tl.zeros_like(cols)
    for g in tl.static_range(GROUPS):
        if (SLICE_MASK >> g) & 1:
            enabled |= group == g
            index += (group > g).to(index.dtype)
    return enabled, index, index * GROUP_ROWS + cols - group * GROUP_ROWS


@triton.jit
def _rank_row(cols, RANK, RS_PAD: tl.constexpr, ENABLED: tl.constexpr):
    """For columns of the padded rank axis (``RS_PAD`` per enabled slice): whether each is a real rank column,
    and its row in the stacked ``(RANK * enabled, in)`` A."""
    if ENABLED == 1:
        return cols < RANK, cols
    piece = cols // RS_PAD
    within = cols - piece * RS_PAD
    return (within < RANK) & (piece < ENABLED), piece * RANK + within


@triton.jit(do_not_specialize=[*_SHAPE, *_SEED, "N", "GROUP_ROWS", "m_blocks", "n_da", "n_db"])
def _lora_down_kernel(
    x_ptr, a_ptr, h_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak,
    inv_keep, seed_ptr, seed_lo, seed_hi, threshold,
    m_blocks, b_ptr, bpad_ptr, N, GROUP_ROWS, stride_bn, stride_br, da_ptr, n_da, db_ptr, n_db,
    DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr, RS_PAD: tl.constexpr, H_PAD: tl.constexpr,
    GROUPS: tl.constexpr, SLICE_MASK: tl.constexpr, ENABLED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, AUX_PROGRAMS: tl.constexpr,
):
    """Programs below ``m_blocks``: one row block of ``h = dropout(x) @ A.T * inv_keep`` (fp32 ``(M, H_PAD)``,
    ``RS_PAD`` columns per enabled slice, the padding zero). A is read in its own dtype (fp32 LoRA parameters
    over a 16-bit x are cast tile by tile). The ``AUX_PROGRAMS`` after them do what the backward needs
    ready, so that it needs no launch of its own for it: B laid out as the backward GEMM reads it (``bpad``:
    dense ``(N, H_PAD)`` in x's dtype, slices expanded, when ``bpad_ptr`` is given), and the fp32 buffers that
    dA and dB are atomically accumulated into set to zero (``n_da`` / ``n_db`` elements)."""
    pid = tl.program_id(0)
    if pid < m_blocks:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        real, a_row = _rank_row(tl.arange(0, H_PAD), R, RS_PAD, ENABLED)
        row_ok = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        if DROPOUT:
            lo, hi = _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
            row_key = _row_keys(offs_m, lo, hi)
        acc = tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
            if DROPOUT:
                x = tl.where(_kept(row_key[:, None], _col_keys(cols)[None, :], threshold), x, 0.0)
            a = tl.load(a_ptr + cols[:, None] * stride_ak + a_row[None, :] * stride_ar,
                        mask=(cols[:, None] < K) & real[None, :], other=0.0)
            acc = tl.dot(x, a.to(x.dtype), acc, input_precision=PRECISION)
        h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * H_PAD + tl.arange(0, H_PAD)[None, :]
        tl.store(h_ptrs, acc * inv_keep, mask=row_ok[:, None])
    else:
        aux = pid - m_blocks
        if bpad_ptr is not None:
            offs_c = tl.arange(0, H_PAD)
            piece = offs_c // RS_PAD
            within = offs_c - piece * RS_PAD
            for first in range(aux * 32, N, AUX_PROGRAMS * 32):
                rows = first + tl.arange(0, 32)
                enabled, index, b_row = _slice_of(rows, GROUP_ROWS, GROUPS, SLICE_MASK)
                take = (rows[:, None] < N) & enabled[:, None] & (piece[None, :] == index[:, None]) \
                    & (within[None, :] < R)
                b = tl.load(b_ptr + b_row.to(tl.int64)[:, None] * stride_bn + within[None, :] * stride_br,
                            mask=take, other=0.0)
                tl.store(bpad_ptr + rows.to(tl.int64)[:, None] * H_PAD + offs_c[None, :],
                         b.to(bpad_ptr.dtype.element_ty), mask=rows[:, None] < N)
        if da_ptr is not None:
            for first in range(aux * 1024, n_da, AUX_PROGRAMS * 1024):
                offs = first + tl.arange(0, 1024)
                tl.store(da_ptr + offs, tl.zeros((1024,), dtype=tl.float32), mask=offs < n_da)
        if db_ptr is not None:
            for first in range(aux * 1024, n_db, AUX_PROGRAMS * 1024):
                offs = first + tl.arange(0, 1024)
                tl.store(db_ptr + offs, tl.zeros((1024,), dtype=tl.float32), mask=offs < n_db)


@triton.jit
def _b_tile(b_ptr, offs_c, cols, R, stride_br, stride_bn, GROUP_ROWS, GROUPS: tl.constexpr, SLICE_MASK: tl.constexpr,
            RS_PAD: tl.constexpr):
    """The ``(H_PAD, len(cols))`` tile of ``B.T`` that h's columns ``offs_c`` meet at output columns ``cols``: B's
    rows as they are without slices (fewer live address registers at large ranks); with slices each column reads
    its own group's rows of the stacked B, and a disabled group's columns read zeros."""
    if GROUPS == 1:
        b_t = tl.load(b_ptr + offs_c[:, None] * stride_br + cols[None, :] * stride_bn, mask=offs_c[:, None] < R,
                      other=0.0)
    else:
        piece = offs_c // RS_PAD
        within = offs_c - piece * RS_PAD
        enabled, index, b_row = _slice_of(cols, GROUP_ROWS, GROUPS, SLICE_MASK)
        take = enabled[None, :] & (piece[:, None] == index[None, :]) & (within[:, None] < R)
        b_t = tl.load(b_ptr + within[:, None] * stride_br + b_row[None, :] * stride_bn, mask=take, other=0.0)
    return b_t


@triton.jit
def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile number ``tile``'s (row block, column block), in groups of GROUP_M row blocks for L2 reuse."""
    group_size = GROUP_M * num_n
    first_m = (tile // group_size) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % rows_in_group, (tile % group_size) // rows_in_group


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row block, column block), in groups of GROUP_M row blocks for L2 reuse."""
    return _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def _base_product(x_ptrs, w_ptrs, K, stride_xk, stride_wk, row_key, threshold, DROPPED: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 ``(BLOCK_M, BLOCK_N)`` tile of ``x @ W.T`` from the tiles' first K-step pointers: a loop of
    loads masked along K only, and dots. DROPPED (DoRA with dropout) also accumulates ``(x * keep) @ W.T`` from
    the same W tiles, the keep-mask regenerated from the rows' keys (``row_key``) on each x tile; else the second
    tile returned stays zero (and ``row_key``, ``threshold`` are not read)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dropped = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if DROPPED:
            keep = _kept(row_key[:, None], _col_keys(k * BLOCK_K + offs_k)[None, :], threshold)
            dropped = tl.dot(tl.where(keep, x, 0.0), w, dropped, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, dropped


@triton.jit(do_not_specialize=[*_SHAPE, *_SEED, "stride_bn", "GROUP_ROWS"])
def _lora_forward_kernel(
    x_ptr, w_ptr, h_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, R, GROUP_ROWS,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_om, stride_on,
    scale, c_ptr, u_ptr, seed_ptr, inv_keep, seed_lo, seed_hi, threshold,
    HAS_BIAS: tl.constexpr, RS_PAD: tl.constexpr, H_PAD: tl.constexpr, GROUPS: tl.constexpr,
    SLICE_MASK: tl.constexpr, PRECISION: tl.constexpr, DORA: tl.constexpr, DROPOUT: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = x @ W.T + bias + scale * h @ B.T``, written once.

    ``x: (M, K)`` and ``W: (N, K)`` take any strides; ``h`` is ``_lora_down_kernel``'s fp32 ``(M, H_PAD)``
    (dropout applied). ``B`` is the LoRA parameter as stored, in its own dtype and any strides: ``(N, R)``, or
    with slices the enabled groups' ``(GROUP_ROWS, R)`` blocks stacked; the epilogue reads, for each output
    feature, its group's rows of B into that group's ``RS_PAD`` columns of the rank axis (zero for a disabled
    group), so no dense B is ever built.

    DORA: each feature's factor ``c = m / n`` (fp32 at ``c_ptr``, ``_dora_norm_kernel``'s) scales the pre-scale
    output ``u = x_d @ W.T + scale * h @ B.T`` in the epilogue: ``y = c * u + bias`` without dropout; with it
    (DROPOUT: x_d the dropped-out x, its product accumulated beside the base one from the same W tiles)
    ``y = x @ W.T + bias + (c - 1) * (x_d @ W.T) + c * scale * h @ B.T``, as peft computes it. ``u`` is also
    written (``u_ptr``, contiguous ``(M, N)`` in x's dtype) when given: the backward's dm reduces against it.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m = (offs_m % M).to(tl.int64)  # rows/cols past the end re-read valid ones and are never stored
    safe_n = (offs_n % N).to(tl.int64)
    in_out = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    x_ptrs = x_ptr + safe_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + safe_n[None, :] * stride_wn
    lo, hi = _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)  # (read only by DoRA's dropout)
    acc, dropped = _base_product(x_ptrs, w_ptrs, K, stride_xk, stride_wk, _row_keys(offs_m, lo, hi), threshold,
                                 DORA and DROPOUT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    offs_c = tl.arange(0, H_PAD)
    b_t = _b_tile(b_ptr, offs_c, safe_n, R, stride_br, stride_bn, GROUP_ROWS, GROUPS, SLICE_MASK, RS_PAD)
    h = tl.load(h_ptr + safe_m[:, None] * H_PAD + offs_c[None, :])
    low_rank_h = (h * scale).to(x_ptr.dtype.element_ty)
    low_rank_b = b_t.to(x_ptr.dtype.element_ty)
    if DORA and DROPOUT:
        c = tl.load(c_ptr + safe_n)[None, :]
        lora = tl.dot(low_rank_h, low_rank_b, input_precision=PRECISION)
        dropped *= inv_keep
        if u_ptr is not None:
            tl.store(u_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                     (dropped + lora).to(u_ptr.dtype.element_ty), mask=in_out)
        acc += (c - 1.0) * dropped + c * lora  # c = 1 (a disabled slice): the base output, bit for bit
    else:
        acc = tl.dot(low_rank_h, low_rank_b, acc, input_precision=PRECISION)
        if DORA:
            if u_ptr is not None:
                tl.store(u_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                         acc.to(u_ptr.dtype.element_ty), mask=in_out)
            acc *= tl.load(c_ptr + safe_n)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_out)


@triton.jit(do_not_specialize=["R", "GROUP_ROWS", "n_dm"])
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, m_ptr, norm_ptr, c_ptr, dm_ptr, N, K, R, GROUP_ROWS, n_dm,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scale,
    RS_PAD: tl.constexpr, H_PAD: tl.constexpr, GROUPS: tl.constexpr, SLICE_MASK: tl.constexpr,
    ENABLED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One block of output features: ``n_i = |W_i + scale * B_i A|`` (fp32, the sum of squares of W's tiles plus
    the matching tiles of ``scale * B A``, formed one ``(BLOCK_K, BLOCK_N)`` tile at a time: no (out, in) matrix
    and no cancellation) and the factor ``c_i = m_i / n_i`` (1 for a disabled slice's features; m stacked like
    B's rows), both written to fp32 ``(N,)`` buffers; with ``dm_ptr``, the block's share of dm's fp32 buffer
    (``n_dm`` values, accumulated atomically by the backward) zeroed. A, B and W are read in their own dtypes and
    strides (a Conv1D weight as its transposed view)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, H_PAD)
    safe_n = (offs_n % N).to(tl.int64)  # features past the end re-read valid ones and are never written
    b_t = _b_tile(b_ptr, offs_c, safe_n, R, stride_br, stride_bn, GROUP_ROWS, GROUPS, SLICE_MASK, RS_PAD)
    b_t = b_t.to(tl.float32) * scale
    real, a_row = _rank_row(offs_c, R, RS_PAD, ENABLED)
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + a_row[None, :] * stride_ar
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + safe_n[None, :] * stride_wn
    squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a_t = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & real[None, :], other=0.0)
        w_t = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        merged = w_t.to(tl.float32) + tl.dot(a_t.to(tl.float32), b_t, input_precision="ieee")
        squares += tl.sum(merged * merged, axis=0)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    norm = tl.sqrt(squares)
    enabled, _, m_row = _slice_of(offs_n, GROUP_ROWS, GROUPS, SLICE_MASK)
    in_n = offs_n < N
    m = tl.load(m_ptr + m_row, mask=in_n & enabled, other=1.0).to(tl.float32)
    tl.store(norm_ptr + offs_n, norm, mask=in_n)
    tl.store(c_ptr + offs_n, tl.where(enabled, m / norm, 1.0), mask=in_n)
    if dm_ptr is not None:
        tl.store(dm_ptr + offs_n, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=offs_n < n_dm)


@triton.jit(do_not_specialize=[*_SHAPE, *_SEED])
def _lora_backward_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, dx_ptr, da_ptr, seed_ptr, c_ptr, M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxm, stride_dxk,
    scale, inv_keep, seed_lo, seed_hi, threshold,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
    RS_PAD: tl.constexpr, H_PAD: tl.constexpr, ENABLED: tl.constexpr, PRECISION: tl.constexpr, DORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_K)`` tile of dx and its share of dA, reading its rows of dy once.

    ``b_ptr`` is B as a dense contiguous ``(N, H_PAD)`` in dy's dtype, zero outside each enabled slice's rank
    columns (``_lora_down_kernel``'s ``bpad``, or B itself when it is so already). The loop over the N output
    features accumulates ``dy @ W`` and ``g = dy @ B`` and holds nothing but loads and dots. The epilogue adds
    ``scale * keep * (g @ A) / (1-p)`` to the dx tile and writes it once, then adds ``scale * (dropout(x).T @
    g).T / (1-p)`` for these columns into dA, a zeroed contiguous fp32 ``(R * enabled, K)`` buffer, with one
    atomic add. A is read in its own dtype.

    DORA: the gradient reaching the pre-scale output is ``dy * c`` (each feature's factor, fp32 at ``c_ptr``), so
    each dy tile is scaled by its columns' c before the dots; with dropout the base path's ``dy @ W`` and the
    dropped path's ``(dy * (c - 1)) @ W`` accumulate side by side from the same W tiles, the second masked and
    added in the epilogue beside the rank-R term.
    """
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, H_PAD)
    row_ok = offs_m < M
    col_ok = offs_k < K
    safe_m = (offs_m % M).to(tl.int64)  # rows/cols past the end re-read valid ones; x is zeroed there
    safe_k = (offs_k % K).to(tl.int64)
    dy_ptrs = dy_ptr + safe_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + safe_k[None, :] * stride_wk
    b_ptrs = b_ptr + offs_n[:, None] * H_PAD + offs_c[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if DORA and DROPOUT:
        dropped = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_left = N - n * BLOCK_N
        dy = tl.load(dy_ptrs, mask=offs_n[None, :] < n_left, other=0.0)
        if DORA:
            c = tl.load(c_ptr + n * BLOCK_N + offs_n, mask=offs_n < n_left, other=0.0)[None, :]
            scaled = (dy.to(tl.float32) * c).to(dy.dtype)
        else:
            scaled = dy
        if NEED_DX:
            w = tl.load(w_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
            if DROPOUT:
                acc = tl.dot(dy, w, acc, input_precision=PRECISION)
                if DORA:
                    dropped = tl.dot((dy.to(tl.float32) * (c - 1.0)).to(dy.dtype), w, dropped,
                                     input_precision=PRECISION)
            else:
                acc = tl.dot(scaled, w, acc, input_precision=PRECISION)
        b = tl.load(b_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
        g = tl.dot(scaled, b, g, input_precision=PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
        b_ptrs += BLOCK_N * H_PAD

    g_scaled = (g * (scale * inv_keep)).to(dy_ptr.dtype.element_ty)
    real, a_row = _rank_row(offs_c, R, RS_PAD, ENABLED)
    if DROPOUT:
        lo, hi = _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
        row_key = _row_keys(offs_m, lo, hi)
        col_key = _col_keys(offs_k)
    if NEED_DX:
        a_t = tl.load(a_ptr + a_row[:, None] * stride_ar + safe_k[None, :] * stride_ak, mask=real[:, None], other=0.0)
        a_t = a_t.to(dy_ptr.dtype.element_ty)
        if DROPOUT:
            keep = _kept(row_key[:, None], col_key[None, :], threshold)
            dropped_path = tl.dot(g_scaled, a_t, input_precision=PRECISION)
            if DORA:
                dropped_path += dropped * inv_keep
            acc += tl.where(keep, dropped_path, 0.0)
        else:
            acc = tl.dot(g_scaled, a_t, acc, input_precision=PRECISION)
        dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DA:  # x is loaded transposed, so dA's (BLOCK_K, H_PAD) tile needs no tl.trans
        x_t = tl.load(x_ptr + safe_k[:, None] * stride_xk + safe_m[None, :] * stride_xm,
                      mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        if DROPOUT:
            x_t = tl.where(_kept(row_key[None, :], col_key[:, None], threshold), x_t, 0.0)
        da_t = tl.dot(x_t, g_scaled, input_precision=PRECISION)
        tl.atomic_add(da_ptr + a_row[None, :] * K + offs_k[:, None], da_t,
                      mask=col_ok[:, None] & real[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["M", "R", "rows_per_split", "GROUP_ROWS", "N_B", "N"])
def _lora_db_kernel(
    dy_ptr, h_ptr, db_ptr, M, N_B, R, GROUP_ROWS, rows_per_split, stride_dym, stride_dyn, scale,
    c_ptr, norm_ptr, u_ptr, dm_ptr, N,
    ATOMIC: tl.constexpr, RS_PAD: tl.constexpr, H_PAD: tl.constexpr, GROUPS: tl.constexpr,
    SLICE_MASK: tl.constexpr, PRECISION: tl.constexpr, NEED_DB: tl.constexpr, NEED_DM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One ``(BLOCK_N, RS_PAD)`` tile of ``dB = scale * dy.T @ h`` over one split of the rows.

    dB is stacked like B: ``(N_B, R)`` with ``N_B = GROUP_ROWS * enabled`` (one group without slices).
    Program ``(n, s)`` covers dB rows ``n * BLOCK_N ...``, all of one enabled slice (the launcher picks
    BLOCK_N dividing GROUP_ROWS), so that they read that slice's group of dy's columns and its ``RS_PAD``
    columns of ``h`` (``_lora_down_kernel``'s output); dy rows ``s * rows_per_split`` (a multiple of BLOCK_M)
    up to the next split. dy is read transposed as ``(BLOCK_N, BLOCK_M)`` tiles, so no ``tl.trans``. The loop
    holds only masked loads and a dot; the one write follows it: a plain store into dB (its own dtype) when
    there is one split, else (ATOMIC) an atomic add into a zeroed fp32 buffer.

    DoRA (``c_ptr`` given): dB's rows are scaled by their features' factors c after the loop; NEED_DM also
    reduces ``dm_i = sum(dy[:, i] * u[:, i]) / n_i`` over the same rows (``u``: the forward's pre-scale output,
    contiguous ``(M, N)``; n at ``norm_ptr``) and writes it like dB, m stacked like B's rows.
    """
    first = tl.program_id(1) * rows_per_split
    first_row = tl.program_id(0) * BLOCK_N
    index = first_row // GROUP_ROWS  # the slice among the enabled ones, and its group
    group = index * 0
    seen = index * 0
    for g in tl.static_range(GROUPS):
        if (SLICE_MASK >> g) & 1:
            group = tl.where(seen == index, g, group)
            seen += 1
    offs_n = first_row + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RS_PAD)
    safe_n = (offs_n % N_B).to(tl.int64)  # rows past the end of dB re-read valid ones and are never written
    dy_cols = safe_n + (group - index) * GROUP_ROWS
    rows = (first + offs_m).to(tl.int64)
    dy_ptrs = dy_ptr + dy_cols[:, None] * stride_dyn + rows[None, :] * stride_dym
    h_ptrs = h_ptr + rows[:, None] * H_PAD + index * RS_PAD + offs_r[None, :]
    if NEED_DM:
        u_ptrs = u_ptr + dy_cols[:, None] + rows[None, :] * N
    acc = tl.zeros((BLOCK_N, RS_PAD), dtype=tl.float32)
    dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m in range(0, tl.cdiv(min(rows_per_split, M - first), BLOCK_M)):
        m_left = M - first - m * BLOCK_M
        dy_t = tl.load(dy_ptrs, mask=offs_m[None, :] < m_left, other=0.0)
        if NEED_DB:
            h = tl.load(h_ptrs, mask=offs_m[:, None] < m_left, other=0.0)
            acc = tl.dot(dy_t, h.to(dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)
        if NEED_DM:
            u_t = tl.load(u_ptrs, mask=offs_m[None, :] < m_left, other=0.0)
            dm += tl.sum(dy_t.to(tl.float32) * u_t.to(tl.float32), axis=1)
            u_ptrs += BLOCK_M * N
        dy_ptrs += BLOCK_M * stride_dym
        h_ptrs += BLOCK_M * H_PAD
    if NEED_DB:
        db_ptrs = db_ptr + offs_n[:, None] * R + offs_r[None, :]
        in_db = (offs_n[:, None] < N_B) & (offs_r[None, :] < R)
        acc *= scale
        if c_ptr is not None:
            acc *= tl.load(c_ptr + dy_cols)[:, None]
        if ATOMIC:
            tl.atomic_add(db_ptrs, acc, mask=in_db, sem="relaxed")
        else:
            tl.store(db_ptrs, acc.to(db_ptr.dtype.element_ty), mask=in_db)
    if NEED_DM:
        dm /= tl.load(norm_ptr + dy_cols)
        if ATOMIC:
            tl.atomic_add(dm_ptr + offs_n, dm, mask=offs_n < N_B, sem="relaxed")
        else:
            tl.store(dm_ptr + offs_n, dm.to(dm_ptr.dtype.element_ty), mask=offs_n < N_B)


@triton.jit
def _cast_pair_kernel(src1_ptr, dst1_ptr, n1, src2_ptr, dst2_ptr, n2, BLOCK: tl.constexpr):
    """``dst = src`` converted to dst's dtype, for two flat buffers at once (16-bit LoRA gradients from
    their fp32 accumulation buffers): the first ``cdiv(n1, BLOCK)`` programs take the first pair."""
    pid = tl.program_id(0)
    first_blocks = tl.cdiv(n1, BLOCK)
    if pid < first_blocks:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst1_ptr + offs, tl.load(src1_ptr + offs, mask=offs < n1).to(dst1_ptr.dtype.element_ty),
                 mask=offs < n1)
    else:
        offs = (pid - first_blocks) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst2_ptr + offs, tl.load(src2_ptr + offs, mask=offs < n2).to(dst2_ptr.dtype.element_ty),
                 mask=offs < n2)


# Mixed-adapter batches: each row names its own adapter (or none, -1). The batch's routing holds the rows
# sorted by adapter: ``ids`` the sorted ids (int32) and ``order`` the original row of each sorted position, so
# that every adapter's rows form one contiguous segment. ``_mixed_stack_kernel`` stacks the adapters' A's and
# B's zero-padded to R_PAD, A as ``(n, R_PAD, in)``, B as ``(n, out, R_PAD)``, and writes the per-adapter
# ``scale / (1 - p)`` (``factor``) and dropout threshold (``thr``) tables. Kernels tile
# the sorted positions; a tile meets a few segments and loops over them (``_first_segment``: the first
# adapter and how many distinct adapters the tile holds), each iteration masking the tile's rows to its
# segment, so that one accumulator serves them all. Rows are read through ``order`` and results written
# back to the rows' original positions; the dropout hash keys on the original row, as the
# single-adapter op's.
_MAX_ID = tl.constexpr(2**31 - 1)


# Tuple arguments' elements are specialized (a value of 1 compiles as a constant) whatever do_not_specialize says:
# the stacking kernel takes in tuples only what is fixed for a set of adapters, and what varies per batch (which
# adapters are selected) as plain scalars.
@triton.jit(do_not_specialize=["selected", "sel_first", "n_zero", "first"])
def _mixed_stack_kernel(
    a_ptrs, b_ptrs, ranks, a_strides, b_strides, factors, thresholds,
    a_stack_ptr, b_stack_ptr, factor_ptr, thr_ptr, sel_ptr, selected, sel_first, zero_ptr, n_zero, K, N, first,
    R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Adapters ``first + s`` for each ``s`` of the tuples (``a_ptrs[s]``: A ``(ranks[s], K)`` with strides
    ``a_strides[2s:2s+2]``, ``b_ptrs[s]``: B ``(N, ranks[s])``) into the stacks, in the stacks' dtype: A padded
    with zero rows to ``(R_PAD, K)``, B with zero columns to ``(N, R_PAD)``; each program copies every
    ``num_programs``-th BLOCK-wide block of A's columns and of B's rows. Program 0 also writes each adapter's
    ``factors[s]`` and ``thresholds[s]`` into the tables and, with ``sel_ptr``, appends from ``sel_first`` on
    those whose bit ``s`` of ``selected`` is set (the adapters whose gradients the backward computes); with
    ``zero_ptr``, the programs zero its ``n_zero`` fp32 values (the gradient buffers accumulated atomically)."""
    pid = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    offs = tl.arange(0, BLOCK)
    offs_r = tl.arange(0, R_PAD)
    for s in tl.static_range(len(a_ptrs)):
        adapter = (first + s).to(tl.int64)
        real = offs_r < ranks[s]
        a_stack = a_stack_ptr + adapter * R_PAD * K + offs_r[:, None] * K
        a_rows = a_ptrs[s] + offs_r[:, None] * a_strides[2 * s]
        for k0 in range(pid * BLOCK, K, stride):
            cols = k0 + offs
            a = tl.load(a_rows + cols[None, :] * a_strides[2 * s + 1], mask=real[:, None] & (cols[None, :] < K),
                        other=0.0)
            tl.store(a_stack + cols[None, :], a.to(a_stack_ptr.dtype.element_ty), mask=cols[None, :] < K)
        b_stack = b_stack_ptr + adapter * N * R_PAD + offs_r[None, :]
        b_cols = b_ptrs[s] + offs_r[None, :] * b_strides[2 * s + 1]
        for n0 in range(pid * BLOCK, N, stride):
            rows = n0 + offs
            b = tl.load(b_cols + rows.to(tl.int64)[:, None] * b_strides[2 * s],
                        mask=(rows[:, None] < N) & real[None, :], other=0.0)
            tl.store(b_stack + rows.to(tl.int64)[:, None] * R_PAD, b.to(b_stack_ptr.dtype.element_ty),
                     mask=rows[:, None] < N)
    if pid == 0:
        for s in tl.static_range(len(a_ptrs)):
            tl.store(factor_ptr + first + s, factors[s])
            tl.store(thr_ptr + first + s, thresholds[s])
        if sel_ptr is not None:
            position = sel_first
            for s in tl.static_range(len(a_ptrs)):
                bit = (selected >> s) & 1
                tl.store(sel_ptr + position, first + s, mask=bit != 0)
                position += bit
    if zero_ptr is not None:
        for z0 in range(pid * 1024, n_zero, tl.num_programs(0) * 1024):
            offs_z = z0 + tl.arange(0, 1024)
            tl.store(zero_ptr + offs_z, tl.zeros((1024,), dtype=tl.float32), mask=offs_z < n_zero)


@triton.jit
def _first_segment(ids_ptr, offs_m, ids, M, first_pos):
    """The smallest adapter id (>= 0) among a tile's sorted rows and how many distinct ones it holds."""
    valid = (offs_m < M) & (ids >= 0)
    prev = tl.load(ids_ptr + offs_m - 1, mask=(offs_m < M) & (offs_m > first_pos), other=-2)
    segments = tl.sum((valid & (ids != prev)).to(tl.int32), axis=0)
    return tl.min(tl.where(valid, ids, _MAX_ID), axis=0), segments


@triton.jit
def _next_segment(ids, adapter):
    """The next larger adapter id among the tile's rows (ids are sorted, so rows past the end add none)."""
    return tl.min(tl.where(ids > adapter, ids, _MAX_ID), axis=0)


@triton.jit(do_not_specialize=["M", *_SEED])
def _mixed_down_kernel(
    x_ptr, a_ptr, ids_ptr, order_ptr, factor_ptr, thr_ptr, h_ptr, seed_ptr, M, K,
    stride_xm, stride_xk, stride_aa, stride_ar, stride_ak, seed_lo, seed_hi,
    DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One block of sorted rows of ``h = factor_a * dropout_a(x_i) @ A_a.T``, fp32 ``(M, R_PAD)`` in sorted
    order (zero for rows without adapter). Also ``g = factor_a * dy_i @ B_a`` (x: dy, A: B's stack read as
    ``(n, R_PAD, out)`` through its strides, no dropout): the backward's rank-wide gradient."""
    first = tl.program_id(0) * BLOCK_M
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    row_ok = offs_m < M
    ids = tl.load(ids_ptr + offs_m, mask=row_ok, other=-1)
    rows = tl.load(order_ptr + offs_m, mask=row_ok, other=0)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    has_adapter = ids >= 0
    if DROPOUT:
        lo, hi = _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
        row_key = _row_keys(rows, lo, hi)
        thr = tl.load(thr_ptr + ids, mask=has_adapter, other=0)
    adapter, segments = _first_segment(ids_ptr, offs_m, ids, M, first)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for _ in range(segments):
        in_segment = ids == adapter
        a_ptrs = a_ptr + adapter.to(tl.int64) * stride_aa + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=in_segment[:, None] & (cols[None, :] < K),
                        other=0.0)
            if DROPOUT:
                x = tl.where(_kept(row_key[:, None], _col_keys(cols)[None, :], thr[:, None]), x, 0.0)
            a = tl.load(a_ptrs, mask=cols[:, None] < K, other=0.0)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        adapter = _next_segment(ids, adapter)
    factor = tl.load(factor_ptr + ids, mask=has_adapter, other=0.0)
    tl.store(h_ptr + offs_m.to(tl.int64)[:, None] * R_PAD + offs_r[None, :], acc * factor[:, None],
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=["M", *_SEED])
def _mixed_gemm_kernel(
    x_ptr, w_ptr, l_ptr, u_ptr, ids_ptr, order_ptr, thr_ptr, bias_ptr, out_ptr, seed_ptr, M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ua, stride_ur, stride_un, stride_om, stride_on,
    seed_lo, seed_hi,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of sorted rows of ``out_i = x_i @ w + bias + keep_i * l_i @ U_a``,
    written once to the rows' original positions.

    ``x: (M, K)`` rows read through ``order``; ``w: (K, N)`` through its strides; ``l`` the fp32 ``(M,
    R_PAD)`` rank-wide buffer in sorted order (scale and 1/(1-p) applied); ``U`` a stack of ``(R_PAD, N)``
    per-adapter matrices through their strides. Forward: x, W.T, h, B's stack, with bias, no mask. dx:
    dy, W, g, A's stack, the keep-mask of each row's adapter (DROPOUT), no bias. The K loop is the plain
    GEMM; the segment loop after it holds loads and one dot per adapter of the tile.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    row_ok = offs_m < M
    safe_n = (offs_n % N).to(tl.int64)  # columns past the end re-read valid ones and are never stored
    rows = tl.load(order_ptr + offs_m % M).to(tl.int64)  # sorted positions past the end: a valid row, never stored
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + safe_n[None, :] * stride_wn
    acc, _ = _base_product(x_ptrs, w_ptrs, K, stride_xk, stride_wk, rows, 0, False, PRECISION, BLOCK_M, BLOCK_N,
                           BLOCK_K)

    ids = tl.load(ids_ptr + offs_m, mask=row_ok, other=-1)
    adapter, segments = _first_segment(ids_ptr, offs_m, ids, M, pid_m * BLOCK_M)
    l_ptrs = l_ptr + offs_m.to(tl.int64)[:, None] * R_PAD + offs_r[None, :]
    u_offsets = offs_r[:, None] * stride_ur + safe_n[None, :] * stride_un
    if DROPOUT:
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        low_rank = acc
    for _ in range(segments):
        u = tl.load(u_ptr + adapter.to(tl.int64) * stride_ua + u_offsets)
        rank_wide = tl.load(l_ptrs, mask=(ids == adapter)[:, None], other=0.0)
        low_rank = tl.dot(rank_wide.to(u.dtype), u, low_rank, input_precision=PRECISION)
        adapter = _next_segment(ids, adapter)
    if DROPOUT:
        thr = tl.load(thr_ptr + ids, mask=ids >= 0, other=0)
        lo, hi = _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
        keep = _kept(_row_keys(rows, lo, hi)[:, None], _col_keys(offs_n)[None, :], thr[:, None])
        acc += tl.where(keep, low_rank, 0.0)
    else:
        acc = low_rank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["rows_per_split", *_SEED])
def _mixed_grad_kernel(
    l_ptr, r_ptr, seg_ptr, sel_ptr, order_ptr, thr_ptr, out_ptr, seed_ptr, P, Q, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_rq, seed_lo, seed_hi,
    DA: tl.constexpr, DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr, ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One ``(BLOCK_P, BLOCK_Q)`` tile of ``out[s] = left.T @ right`` over one split of the rows of adapter
    ``a = sel[s]`` (its segment of the sorted positions, from ``seg``: each adapter's first position).

    DA: ``dA_a = g.T @ dropout_a(x)`` (left: g, fp32 in sorted order, ``P = R_PAD``; right: x's rows through
    ``order``, masked when DROPOUT). Else ``dB_a = dy.T @ h`` (left: dy's rows through ``order``; right: h,
    fp32 in sorted order, ``Q = R_PAD``). The fp32 operand is cast to the other's dtype for the dot; the
    left one is loaded transposed (no ``tl.trans``). The loop over the split's rows holds loads and a dot;
    the one write follows it: a store into the fp32 ``(len(sel), P, Q)`` output, or (ATOMIC, several
    splits) an atomic add into it zeroed.
    """
    num_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (tl.program_id(0) // num_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (tl.program_id(0) % num_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_m = tl.arange(0, BLOCK_M)
    safe_p = (offs_p % P).to(tl.int64)  # past the end: valid ones re-read, never written
    safe_q = (offs_q % Q).to(tl.int64)
    adapter = tl.load(sel_ptr + tl.program_id(1))
    lo = tl.load(seg_ptr + adapter) + tl.program_id(2) * rows_per_split
    hi = tl.minimum(tl.load(seg_ptr + adapter + 1), lo + rows_per_split)
    if DROPOUT:
        col_key = _col_keys(offs_q)
        thr = tl.load(thr_ptr + adapter)
        seed_low, seed_high = _seed_halves(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        pos = m0 + offs_m
        in_split = pos < hi
        rows = tl.load(order_ptr + pos, mask=in_split, other=0)
        if DA:
            l_rows = pos.to(tl.int64)
            r_rows = rows.to(tl.int64)
        else:
            l_rows = rows.to(tl.int64)
            r_rows = pos.to(tl.int64)
        left_t = tl.load(l_ptr + safe_p[:, None] * stride_lp + l_rows[None, :] * stride_lm,
                         mask=in_split[None, :], other=0.0)
        right = tl.load(r_ptr + r_rows[:, None] * stride_rm + safe_q[None, :] * stride_rq,
                        mask=in_split[:, None], other=0.0)
        if DROPOUT:
            right = tl.where(_kept(_row_keys(rows, seed_low, seed_high)[:, None], col_key[None, :], thr), right,
                             0.0)
        if DA:
            acc = tl.dot(left_t.to(right.dtype), right, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(left_t, right.to(left_t.dtype), acc, input_precision=PRECISION)
    out_ptrs = out_ptr + tl.program_id(1).to(tl.int64) * P * Q + offs_p[:, None] * Q + offs_q[None, :]
    in_out = (offs_p[:, None] < P) & (offs_q[None, :] < Q)
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=in_out, sem="relaxed")
    else:
        tl.store(out_ptrs, acc, mask=in_out)
