// The fused LoRA passes: our kernels for the dropout hash, the rank-R update and the base
// product of a few rows; OpenBLAS single-threaded sgemm for the thin products and, unless the
// caller adds it itself (base_product false), the base product of many rows; PyTorch's OpenMP
// runtime (parallel.h) for the parallelism.
#include "lora.h"

#include <cblas.h>

#include <algorithm>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace fastlora {
namespace {

constexpr int64_t kBlockRows = 64;        // rows whose dropped-out x and rank-R terms are made together
constexpr int64_t kRowsPerThread = 64;    // threads split rows only with at least this many each
constexpr int64_t kColsPerThread = 256;   // the least output columns worth a thread
constexpr int64_t kColAlign = 64;         // column splits fall on whole kernel tiles
constexpr int64_t kSmallRows = 8;         // up to this many rows, W is streamed by our kernels

int to_int(int64_t v) { return static_cast<int>(v); }  // sizes were checked to fit a blasint
int ld(int64_t v) { return to_int(std::max<int64_t>(v, 1)); }

struct Range {
    int64_t begin, end;
    int64_t size() const { return end - begin; }
};

// Part t of n near-equal parts of [0, total), boundaries rounded to multiples of align.
Range part(int64_t total, int n, int t, int64_t align) {
    auto edge = [&](int k) { return std::min(total, (total * k / n + align - 1) / align * align); };
    return {edge(t), t + 1 == n ? total : edge(t + 1)};
}

// How many threads share work of `units` units when each needs at least `least` of them.
int share(int threads, int64_t units, int64_t least) {
    return static_cast<int>(std::clamp<int64_t>(units / least, 1, std::max(threads, 1)));
}

// c (rows x cols, ldc) += a (rows x in, lda) * W[n0 : n0 + cols, :]^T. A few rows take our
// streaming kernels (W read once, no packing); more take OpenBLAS.
void gemm_x_wt(const float* a, int64_t lda, int64_t rows, const Matrix& w, int64_t n0, int64_t cols, float* c,
               int64_t ldc) {
    const int64_t in = w.cols;
    const bool row_major = w.col_stride == 1;
    if (rows <= kSmallRows && row_major)
        active_kernels().small_gemm_nt(c, ldc, a, lda, rows, w.data + n0 * w.row_stride, w.row_stride, cols, in);
    else if (rows <= kSmallRows)
        active_kernels().lowrank_rows(c, ldc, nullptr, a, lda, w.data + n0, w.col_stride, in, rows, cols, 1.0f, true);
    else if (row_major)
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, to_int(rows), to_int(cols), to_int(in), 1.0f, a,
                          ld(lda), w.data + n0 * w.row_stride, ld(w.row_stride), 1.0f, c, ld(ldc));
    else
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, to_int(rows), to_int(cols), to_int(in), 1.0f,
                          a, ld(lda), w.data + n0, ld(w.col_stride), 1.0f, c, ld(ldc));
}

// c (rows x cols, ldc) += a (rows x out, lda) * W[:, k0 : k0 + cols], dispatched as gemm_x_wt.
void gemm_dy_w(const float* a, int64_t lda, int64_t rows, const Matrix& w, int64_t k0, int64_t cols, float* c,
               int64_t ldc) {
    const int64_t out = w.rows;
    const bool row_major = w.col_stride == 1;
    if (rows <= kSmallRows && row_major)
        active_kernels().lowrank_rows(c, ldc, nullptr, a, lda, w.data + k0, w.row_stride, out, rows, cols, 1.0f, true);
    else if (rows <= kSmallRows)
        active_kernels().small_gemm_nt(c, ldc, a, lda, rows, w.data + k0 * w.col_stride, w.col_stride, cols, out);
    else if (row_major)
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, to_int(rows), to_int(cols), to_int(out), 1.0f,
                          a, ld(lda), w.data + k0, ld(w.row_stride), 1.0f, c, ld(ldc));
    else
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, to_int(rows), to_int(cols), to_int(out), 1.0f, a,
                          ld(lda), w.data + k0 * w.col_stride, ld(w.col_stride), 1.0f, c, ld(ldc));
}

// The LoRA scale with inverted dropout's 1 / (1 - p) folded in.
float lora_scale(const LoraProblem& p) { return static_cast<float>(double{p.scale} / (1.0 - double{p.dropout_p})); }

std::vector<uint32_t> column_keys(const LoraProblem& p) {
    std::vector<uint32_t> keys(static_cast<size_t>(p.dropout_p > 0.0f ? p.x.cols : 0));
    for (size_t c = 0; c < keys.size(); ++c) keys[c] = dropout_col_key(static_cast<int64_t>(c));
    return keys;
}

// The input rows [r0, r0 + rows) as the LoRA branch sees them, up to the 1 / (1 - p) that
// lora_scale folds in: x itself without dropout, else the masked copy written to buf
// (rows x in). Returns the pointer and sets its row stride.
const float* lora_input(const LoraProblem& p, const uint32_t* col_keys, int64_t r0, int64_t rows, float* buf,
                        int64_t* stride) {
    const Matrix& x = p.x;
    if (p.dropout_p == 0.0f) {
        *stride = x.row_stride;
        return x.data + r0 * x.row_stride;
    }
    const Kernels& k = active_kernels();
    for (int64_t i = 0; i < rows; ++i)
        k.dropout_row(x.data + (r0 + i) * x.row_stride, buf + i * x.cols, x.cols, dropout_row_key(p.seed, r0 + i),
                      col_keys, p.threshold);
    *stride = x.cols;
    return buf;
}

// h (rows x rank) = scale * dropout(x[rows]) A^T, in blocks of kBlockRows; buf holds kBlockRows x in.
void project(const LoraProblem& p, const uint32_t* col_keys, Range rows, float* h, float* buf) {
    for (int64_t r0 = rows.begin; r0 < rows.end; r0 += kBlockRows) {
        const int64_t n = std::min(kBlockRows, rows.end - r0);
        int64_t lds;
        const float* xs = lora_input(p, col_keys, r0, n, buf, &lds);
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, to_int(n), to_int(p.rank), to_int(p.x.cols),
                          lora_scale(p), xs, ld(lds), p.lora_A, ld(p.x.cols), 0.0f, h + (r0 - rows.begin) * p.rank,
                          ld(p.rank));
    }
}

// Columns [cols) of out rows [rows): bias + h B^T (h holds those rows), then, if the extension
// does the base product, += x W^T.
void forward_tile(const LoraProblem& p, Range rows, Range cols, const float* h, const float* bt, float* out) {
    const int64_t n_out = p.weight.rows;
    float* c = out + rows.begin * n_out + cols.begin;
    active_kernels().lowrank_rows(c, n_out, p.bias ? p.bias + cols.begin : nullptr, h, p.rank, bt + cols.begin,
                                  n_out, p.rank, rows.size(), cols.size(), 1.0f, false);
    if (p.base_product)
        gemm_x_wt(p.x.data + rows.begin * p.x.row_stride, p.x.row_stride, rows.size(), p.weight, cols.begin, cols.size(),
              c, n_out);
}

// Whether threads should split the rows of an (m x cols) product with W rather than its
// columns: when x's part (m rows) is the larger operand, and there are enough rows to share.
bool split_rows(const LoraProblem& p, int64_t m, int64_t cols) {
    return m > kSmallRows && m >= cols && m >= kRowsPerThread * p.threads;
}

std::vector<float> transpose(const float* m, int64_t rows, int64_t cols) {
    std::vector<float> t(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = m[i * cols + j];
    return t;
}

// One thread's buffers for backward: a block's dropped-out x, h and g, and its partial dA, dB.
struct BackwardScratch {
    std::vector<float> x_block, h, g, dA, dB;
};

// Backward's thin part for rows [rows), block by block: adds scale g^T dropout(x) to dA and
// scale dy^T (dropout(x) A^T) to dB, and writes dx's masked rank-R term scale mask (g A) / (1-p)
// into dx, where g = dy B. Each output is skipped when null.
void backward_thin(const LoraProblem& p, const uint32_t* col_keys, const float* dy, int64_t ld_dy, Range rows,
                   float* dx, float* dA, float* dB, BackwardScratch& s) {
    const int64_t in = p.x.cols, out = p.weight.rows, rank = p.rank;
    const Kernels& k = active_kernels();
    const float scale = lora_scale(p);
    for (int64_t r0 = rows.begin; r0 < rows.end; r0 += kBlockRows) {
        const int n = to_int(std::min(kBlockRows, rows.end - r0));
        const float* dy_block = dy + r0 * ld_dy;
        if (dA || dx)  // g = dy B: the gradient reaching dropout(x) A^T, unscaled
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, to_int(rank), to_int(out), 1.0f, dy_block,
                              ld(ld_dy), p.lora_B, ld(rank), 0.0f, s.g.data(), ld(rank));
        if (dA || dB) {
            int64_t lds;
            const float* xs = lora_input(p, col_keys, r0, n, s.x_block.data(), &lds);
            if (dA)
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(rank), to_int(in), n, scale,
                                  s.g.data(), ld(rank), xs, ld(lds), 1.0f, dA, ld(in));
            if (dB) {
                scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, to_int(rank), to_int(in), 1.0f, xs,
                                  ld(lds), p.lora_A, ld(in), 0.0f, s.h.data(), ld(rank));
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(out), to_int(rank), n, scale,
                                  dy_block, ld(ld_dy), s.h.data(), ld(rank), 1.0f, dB, ld(rank));
            }
        }
        if (dx) {
            float* dx_block = dx + r0 * in;
            k.lowrank_rows(dx_block, in, nullptr, s.g.data(), rank, p.lora_A, in, rank, n, in, scale, false);
            if (p.dropout_p > 0.0f)
                for (int64_t i = 0; i < n; ++i)
                    k.dropout_row(dx_block + i * in, dx_block + i * in, in, dropout_row_key(p.seed, r0 + i),
                                  col_keys, p.threshold);
        }
    }
}

}  // namespace

void lora_forward(const LoraProblem& p, float* out) {
    const int64_t m = p.x.rows, n_out = p.weight.rows, in = p.x.cols, rank = p.rank;
    if (m == 0 || n_out == 0) return;
    const std::vector<float> bt = transpose(p.lora_B, n_out, rank);
    const std::vector<uint32_t> col_keys = column_keys(p);
    // h = scale * dropout(x) A^T, its rows shared among threads.
    std::vector<float> h(static_cast<size_t>(m * rank));
    const int np = share(p.threads, m, kBlockRows);
    const int64_t buf_size = p.dropout_p > 0.0f ? kBlockRows * in : 0;
    std::vector<float> buf(static_cast<size_t>(np * buf_size));
    parallel_run(np, [&](int t) {
        const Range rows = part(m, np, t, 1);
        project(p, col_keys.data(), rows, h.data() + rows.begin * rank, buf.data() + t * buf_size);
    });
    // Then each output tile gets bias + h B^T and += x W^T. Each thread packs its part of W and
    // all of x, or all of W and its part of x: whichever part is the larger matrix gets split.
    if (split_rows(p, m, n_out)) {
        const int n = share(p.threads, m, kRowsPerThread);
        parallel_run(n, [&](int t) {
            const Range rows = part(m, n, t, 1);
            forward_tile(p, rows, {0, n_out}, h.data() + rows.begin * rank, bt.data(), out);
        });
    } else {
        const int n = share(p.threads, n_out, kColsPerThread);
        parallel_run(n, [&](int t) { forward_tile(p, {0, m}, part(n_out, n, t, kColAlign), h.data(), bt.data(), out); });
    }
}

void lora_backward(const LoraProblem& p, const float* dy, int64_t ld_dy, float* dx, float* dA, float* dB) {
    const int64_t m = p.x.rows, n_out = p.weight.rows, in = p.x.cols, rank = p.rank;
    if (dA) std::fill(dA, dA + rank * in, 0.0f);
    if (dB) std::fill(dB, dB + n_out * rank, 0.0f);
    if (m == 0) return;
    const std::vector<uint32_t> col_keys = column_keys(p);
    const int n = share(p.threads, m, kBlockRows);
    std::vector<BackwardScratch> scratch(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) {
        BackwardScratch& s = scratch[static_cast<size_t>(t)];
        s.x_block.resize(static_cast<size_t>(p.dropout_p > 0.0f ? kBlockRows * in : 0));
        s.h.resize(static_cast<size_t>(kBlockRows * rank));
        s.g.resize(static_cast<size_t>(kBlockRows * rank));
        if (t > 0 && dA) s.dA.assign(static_cast<size_t>(rank * in), 0.0f);
        if (t > 0 && dB) s.dB.assign(static_cast<size_t>(n_out * rank), 0.0f);
    }
    parallel_run(n, [&](int t) {  // thread 0 accumulates straight into dA, dB; the others into scratch
        BackwardScratch& s = scratch[static_cast<size_t>(t)];
        backward_thin(p, col_keys.data(), dy, ld_dy, part(m, n, t, 1), dx, t == 0 || !dA ? dA : s.dA.data(),
                      t == 0 || !dB ? dB : s.dB.data(), s);
    });
    for (int t = 1; t < n; ++t) {
        const BackwardScratch& s = scratch[static_cast<size_t>(t)];
        if (dA) for (int64_t i = 0; i < rank * in; ++i) dA[i] += s.dA[static_cast<size_t>(i)];
        if (dB) for (int64_t i = 0; i < n_out * rank; ++i) dB[i] += s.dB[static_cast<size_t>(i)];
    }
    if (!dx || !p.base_product) return;
    if (split_rows(p, m, in)) {  // dx += dy W, split as forward splits its tiles
        const int nr = share(p.threads, m, kRowsPerThread);
        parallel_run(nr, [&](int t) {
            const Range rows = part(m, nr, t, 1);
            gemm_dy_w(dy + rows.begin * ld_dy, ld_dy, rows.size(), p.weight, 0, in, dx + rows.begin * in, in);
        });
    } else {
        const int nc = share(p.threads, in, kColsPerThread);
        parallel_run(nc, [&](int t) {
            const Range cols = part(in, nc, t, kColAlign);
            gemm_dy_w(dy, ld_dy, m, p.weight, cols.begin, cols.size(), dx + cols.begin, in);
        });
    }
}

}  // namespace fastlora
