"""The forward and dx GEMMs at Hopper grade (sm_90+, 16-bit): persistent Triton kernels with TMA loads and wgmma,
the LoRA work fused. The launchers (:mod:`fastlora.ops.triton.single`) choose them over the tiled kernels with
``FASTLORA_TRITON_GEMM=hopper`` where they apply.

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

TMA needs 16-byte aligned base addresses and row strides and unit-stride rows (the launchers check).
W is read as ``(N, K)`` rows (nn.Linear) or, ``W_T``, as ``(K, N)`` rows (a Conv1D weight used as its transpose).
"""

import triton
import triton.language as tl

# relative: tests/compile_kernels.py loads this file outside the package
from ._kernels import _b_tile, _col_keys, _grouped_tile, _kept, _rank_row, _row_keys, _seed_halves


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
