// The fused LoRA forward and backward on raw fp32 buffers (validated by the caller, module.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace fastlora {

// Forwards of up to this many rows over a row-major weight stream W through the extension's own kernel,
// which beats any GEMM there.
constexpr int64_t kStreamedRows = 8;

// A 2-D fp32 matrix with element strides; one of the two strides is 1.
struct Matrix {
    const float* data;
    int64_t rows, cols;
    int64_t row_stride, col_stride;
};

// The operands shared by forward and backward. x is row-major (unit column stride), lora_A
// (rank, in) and lora_B (out, rank) are contiguous, weight (out, in) is row- or column-major.
struct LoraProblem {
    Matrix x;
    Matrix weight;
    const float* bias;  // (out,) or null
    const float* lora_A;
    const float* lora_B;
    int64_t rank;
    float scale;
    float dropout_p;
    int32_t threshold;  // an element is kept iff its signed hash >= threshold
    uint64_t seed;
    int threads;
    bool base_product;  // false: leave x W^T (forward) and dy W (backward's dx) to the caller
};

// out (M, out) contiguous = x W^T + bias + scale * dropout(x) A^T B^T (without x W^T when
// problem.base_product is false).
void lora_forward(const LoraProblem& problem, float* out);

// grad_out (M, out) row-major with row stride ld_grad. Each of dx (M, in), dA (rank, in),
// dB (out, rank) (contiguous) is computed when non-null; dx lacks dy W when
// problem.base_product is false.
void lora_backward(const LoraProblem& problem, const float* grad_out, int64_t ld_grad, float* dx, float* dA,
                   float* dB);

// A row-major GEMM with cblas_sgemm's arguments: c (m x n, ldc) = alpha op(a) op(b) + beta c, op(t) = t^T
// when asked; beta 0 ignores c's contents. OpenBLAS's (openblas_gemm), or PyTorch's (module.cpp).
using Gemm = void (*)(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc);
void openblas_gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                   const float* b, int ldb, float beta, float* c, int ldc);

// DoRA over a LoRA problem whose lora_B is dense (out, rank) (slices expanded): per output feature i,
// n_i = |W_i + scale B_i A| and the factor c_i = m_i / n_i (1 for a disabled group's features). The base
// products run through gemm (the streaming kernels for a few rows); lora.base_product is not read.
struct DoraProblem {
    LoraProblem lora;
    const float* magnitude;      // m: one per feature of the enabled groups, stacked
    std::vector<int64_t> slots;  // per output group (one without slices): its index among the enabled, or -1
    Gemm gemm;
};

// norm (out,) = n, from one pass over W (W A^T and |W_i|^2 together) and A A^T.
void dora_norm(const DoraProblem& problem, float* norm);

// factor (out,) = m / norm, 1 for a disabled group's features. Returns whether every enabled factor is finite
// and nonzero: only then does the output y determine u (as (y - bias) / c).
bool dora_factors(const DoraProblem& problem, const float* norm, float* factor);

// y (M, out) contiguous = x W^T + bias + (c - 1) (x_d W^T) + c (scale x_d A^T B^T), x_d the dropped-out input;
// without dropout c (x W^T + scale x A^T B^T) + bias. u (M, out) contiguous, or null without dropout, receives
// the dropped path's pre-scale output x_d W^T + scale x_d A^T B^T.
void dora_forward(const DoraProblem& problem, const float* factor, float* y, float* u);

// grad_out (M, out) row-major with row stride ld_grad. Each of dx (M, in), dA (rank, in), dB (out, rank), dm (one
// per enabled feature) (contiguous) is computed when non-null. dm reduces dy against u (M, out) contiguous when
// given (dm_i = sum dy_i u_i / n_i), else against the forward's output y and problem.lora.bias
// (dm_i = sum dy_i (y_i - bias_i) / m_i).
void dora_backward(const DoraProblem& problem, const float* factor, const float* norm, const float* grad_out,
                   int64_t ld_grad, const float* y, const float* u, float* dx, float* dA, float* dB, float* dm);

// One adapter of a mixed batch.
struct Adapter {
    Matrix A;           // (rank, in), row- or column-major
    Matrix B;           // (out, rank), row- or column-major
    float scale;        // the LoRA scale with inverted dropout's 1 / (1 - p) folded in
    float dropout_p;
    int32_t threshold;  // an element is kept iff its signed hash >= threshold
};

// A mixed batch: one base layer, each row of x with its own adapter or none. The rows are grouped
// by adapter: group g (adapter g - 1; group 0 holds the rows without one) is
// order[starts[g], starts[g + 1]), ascending. x is row-major, weight row- or column-major.
struct MixedProblem {
    Matrix x;
    Matrix weight;
    const float* bias;  // (out,) or null
    std::vector<Adapter> adapters;
    std::vector<int64_t> order;
    std::vector<int64_t> starts;  // adapters.size() + 2 entries
    uint64_t seed;
    int threads;
    bool base_product;  // false: leave x W^T (forward) and dy W (backward's dx) to the caller
};

// Fills problem.order and problem.starts from ids[i * stride] (i < problem.x.rows), each in
// [-1, adapters.size()) (checked by the caller): a stable counting sort.
void group_rows(MixedProblem& problem, const int64_t* ids, int64_t stride);

// out (M, out) contiguous: row i = x_i W^T + bias + scale_a * dropout_a(x_i) A_a^T B_a^T with a its
// adapter (none: the base alone), without x W^T when problem.base_product is false.
void lora_forward_mixed(const MixedProblem& problem, float* out);

// grad_out (M, out) row-major with row stride ld_grad. dx (M, in) contiguous, or null; dA[a]
// (rank_a, in) and dB[a] (out, rank_a) contiguous, or null to skip adapter a's gradients. Each
// adapter's come from its own rows only; dx lacks dy W when problem.base_product is false.
void lora_backward_mixed(const MixedProblem& problem, const float* grad_out, int64_t ld_grad, float* dx,
                         const std::vector<float*>& dA, const std::vector<float*>& dB);

}  // namespace fastlora
