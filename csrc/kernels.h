// The vectorised inner loops of the extension, one table per instruction set, picked at run time.
#pragma once

#include <cstdint>

namespace fastlora {

// The shared dropout hash, bit for bit as fastlora/ops/reference.py documents it.
constexpr uint32_t kMixMul1 = 0x21F0AAADu;
constexpr uint32_t kMixMul2 = 0x735A2D97u;
constexpr uint32_t kColMul = 0x9E3779B9u;
constexpr uint32_t kElementMul = 0x9E3779B1u;

inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= kMixMul1;
    h ^= h >> 15;
    h *= kMixMul2;
    h ^= h >> 15;
    return h;
}

// The per-row key of the hash: mix(mix(row ^ seed_lo) ^ seed_hi).
inline uint32_t dropout_row_key(uint64_t seed, int64_t row) {
    return mix32(mix32(static_cast<uint32_t>(row) ^ static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(seed >> 32));
}

// The per-column key: mix(col * kColMul). Element (r, c) is kept iff
// int32((row_key ^ col_key) * kElementMul) >= threshold, threshold = floor(p * 2^32) - 2^31.
inline uint32_t dropout_col_key(int64_t col) { return mix32(static_cast<uint32_t>(col) * kColMul); }

// One row's LoRA term for small_gemm_nt: c[i, j] += sum_{r < rank} h[r] * b[j * ldb + r], b's rows aligned
// with w's (rank 0: none, and h, b are not read).
struct RowLora {
    const float* h;
    const float* b;
    int64_t ldb;
    int64_t rank;
};

struct Kernels {
    const char* name;
    // out[k] = kept(row_key, col_keys[k]) ? x[k] : 0 for k < n (a dropped NaN becomes 0, as the
    // reference's masked_fill does); out may equal x.
    void (*dropout_row)(const float* x, float* out, int64_t n, uint32_t row_key, const uint32_t* col_keys,
                        int32_t threshold);
    // For each of `rows` rows i and j < n: c[i, j] = bias[j] + (accumulate ? c[i, j] : 0) +
    // alpha * sum_r h[i, r] * bt[r, j] (bias may be null for 0). c has row stride ldc, h row
    // stride ldh, bt (rank, >= n) row stride ldbt. The rank-R update, and with rank = in and
    // bt = W^T the whole product of a few rows with a column-major W, streaming W once.
    void (*lowrank_rows)(float* c, int64_t ldc, const float* bias, const float* h, int64_t ldh,
                         const float* bt, int64_t ldbt, int64_t rank, int64_t rows, int64_t n, float alpha,
                         bool accumulate);
    // bt[c * ldbt + r] = b[r * ldb + c] for r < rows, c < cols: B^T, or a chunk, for lowrank_rows / _scatter.
    void (*transpose)(const float* b, int64_t ldb, int64_t rows, int64_t cols, float* bt, int64_t ldbt);
    // lowrank_rows with row i of c at c_rows[i] (rows anywhere, e.g. a mixed batch's rows of one adapter).
    void (*lowrank_scatter)(float* const* c_rows, const float* bias, const float* h, int64_t ldh, const float* bt,
                            int64_t ldbt, int64_t rank, int64_t rows, int64_t n, float alpha, bool accumulate);
    // c[i, j] += sum_p a[i, p] * w[j, p] for i < rows, j < n, p < k: a few rows (the decode case)
    // times a row-major W^T, streaming W once per group of up to 4 rows. With lora (null or one per
    // row), row i also gets lora[i]'s term, summed with its dot products: a decode step streams W
    // and each row's B in one pass, B untransposed.
    void (*small_gemm_nt)(float* c, int64_t ldc, const float* a, int64_t lda, int64_t rows, const float* w,
                          int64_t ldw, int64_t n, int64_t k, const RowLora* lora);
    // DoRA's epilogue over `rows` rows and n columns, with l = alpha * h bt (as lowrank_rows; bias may be null):
    // without u, y = bias + factor * (y + l) (y held x W^T); with u (which held x_d W^T, the dropped input's
    // product), y += bias + (factor - 1) * u + factor * l and u += l.
    void (*dora_rows)(float* y, int64_t ldy, float* u, int64_t ldu, const float* bias, const float* factor,
                      const float* h, int64_t ldh, const float* bt, int64_t ldbt, int64_t rank, int64_t rows, int64_t n,
                      float alpha);
    // out[i] = sum_p a[i, p]^2 for i < rows, p < k: the squared norms of a's rows.
    void (*square_sums)(const float* a, int64_t lda, int64_t rows, int64_t k, float* out);
    // c[i, j] = sum_p a[i, p] * bt[p, j] for i < rows, j < n, p < k, n a multiple of 16: a GEMM micro-kernel
    // (accumulators in registers over all of k): W A^T, W's rows against A^T padded to 16 columns, or a
    // column-major W's packed columns against A's rows.
    void (*panel_gemm)(float* c, int64_t ldc, const float* a, int64_t lda, int64_t rows, const float* bt,
                       int64_t ldbt, int64_t k, int64_t n);
};

// The table of each instruction set built into this binary; null where it is not built here.
extern const Kernels* const portable_kernels;
extern const Kernels* const avx2_kernels;
extern const Kernels* const avx512_kernels;

}  // namespace fastlora
