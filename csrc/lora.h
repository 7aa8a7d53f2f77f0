// The fused LoRA forward and backward on raw fp32 buffers (validated by the caller, module.cpp).
#pragma once

#include <cstdint>

namespace fastlora {

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

}  // namespace fastlora
