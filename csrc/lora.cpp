// The fused LoRA passes, single-adapter and mixed-batch: our kernels for the dropout hash, the
// rank-R update and the base product of a few rows; OpenBLAS single-threaded sgemm for the thin
// products and, unless the caller adds it itself (base_product false), the base product of many
// rows; PyTorch's OpenMP runtime (parallel.h) for the parallelism.
#include "lora.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace fastlora {
namespace {

constexpr int64_t kBlockRows = 64;        // rows whose dropped-out x and rank-R terms are made together
constexpr int64_t kRowsPerThread = 64;    // threads split rows only with at least this many each
constexpr int64_t kColsPerThread = 256;   // the least output columns worth a thread
constexpr int64_t kColAlign = 64;         // column splits fall on whole kernel tiles
constexpr int64_t kSmallRows = kStreamedRows;  // up to this many rows, W is streamed by our kernels

// n floats, uninitialised (a std::vector would zero them: a cost per call in decode).
using Buffer = std::unique_ptr<float[]>;
Buffer buffer(int64_t n) { return Buffer(new float[static_cast<size_t>(std::max<int64_t>(n, 1))]); }

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
        active_kernels().small_gemm_nt(c, ldc, a, lda, rows, w.data + n0 * w.row_stride, w.row_stride, cols, in,
                                        nullptr);
    else if (rows <= kSmallRows)
        active_kernels().lowrank_rows(c, ldc, nullptr, a, lda, w.data + n0, w.col_stride, in, rows, cols, 1.0f, true);
    else if (row_major)
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, to_int(rows), to_int(cols), to_int(in), 1.0f, a,
                          ld(lda), w.data + n0 * w.row_stride, ld(w.row_stride), 1.0f, c, ld(ldc));
    else
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, to_int(rows), to_int(cols), to_int(in), 1.0f,
                          a, ld(lda), w.data + n0, ld(w.col_stride), 1.0f, c, ld(ldc));
}

// c (rows x rank, ldc) += a (rows x in, lda) * A^T for a LoRA A (rank x in): our streaming kernel for any number
// of rows when A is row-major. Its lane-split sums are more accurate than a BLAS's at N = rank (1.6x smaller
// errors than OpenBLAS, as small as MKL's, measured against float64), and A stays in cache.
void thin_x_wt(const float* a, int64_t lda, int64_t rows, const Matrix& w, float* c, int64_t ldc) {
    if (w.col_stride == 1)
        active_kernels().small_gemm_nt(c, ldc, a, lda, rows, w.data, w.row_stride, w.rows, w.cols, nullptr);
    else
        gemm_x_wt(a, lda, rows, w, 0, w.rows, c, ldc);
}

// c (rows x cols, ldc) += a (rows x out, lda) * W[:, k0 : k0 + cols], dispatched as gemm_x_wt.
void gemm_dy_w(const float* a, int64_t lda, int64_t rows, const Matrix& w, int64_t k0, int64_t cols, float* c,
               int64_t ldc) {
    const int64_t out = w.rows;
    const bool row_major = w.col_stride == 1;
    if (rows <= kSmallRows && row_major)
        active_kernels().lowrank_rows(c, ldc, nullptr, a, lda, w.data + k0, w.row_stride, out, rows, cols, 1.0f, true);
    else if (rows <= kSmallRows)
        active_kernels().small_gemm_nt(c, ldc, a, lda, rows, w.data + k0 * w.col_stride, w.col_stride, cols, out,
                                        nullptr);
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

// h (rows x rank) = scale * dropout(x[rows]) A^T, in blocks of up to kBlockRows rows; buf holds a block
// of x's rows. A few rows take the streaming kernel (gemm_x_wt picks it): no OpenBLAS call, no packing.
void project(const LoraProblem& p, const uint32_t* col_keys, Range rows, float* h, float* buf) {
    const Matrix a{p.lora_A, p.rank, p.x.cols, p.x.cols, 1};
    const float scale = lora_scale(p);
    for (int64_t r0 = rows.begin; r0 < rows.end; r0 += kBlockRows) {
        const int64_t n = std::min(kBlockRows, rows.end - r0);
        int64_t lds;
        const float* xs = lora_input(p, col_keys, r0, n, buf, &lds);
        float* hb = h + (r0 - rows.begin) * p.rank;
        std::fill(hb, hb + n * p.rank, 0.0f);
        thin_x_wt(xs, lds, n, a, hb, p.rank);
        for (int64_t i = 0; i < n * p.rank; ++i) hb[i] *= scale;
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
bool split_rows(int threads, int64_t m, int64_t cols) {
    return m > kSmallRows && m >= cols && m >= kRowsPerThread * threads;
}

// c[0, cols.size()) = bias[cols), or zeros without a bias.
void start_row(float* c, const float* bias, Range cols) {
    if (bias)
        std::copy(bias + cols.begin, bias + cols.end, c);
    else
        std::fill(c, c + cols.size(), 0.0f);
}

// One thread's buffers for backward: a block's dropped-out x, h and g, and its partial dA, dB.
struct BackwardScratch {
    Buffer x_block, h, g, dA, dB;
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
                              ld(ld_dy), p.lora_B, ld(rank), 0.0f, s.g.get(), ld(rank));
        if (dA || dB) {
            int64_t lds;
            const float* xs = lora_input(p, col_keys, r0, n, s.x_block.get(), &lds);
            if (dA)
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(rank), to_int(in), n, scale,
                                  s.g.get(), ld(rank), xs, ld(lds), 1.0f, dA, ld(in));
            if (dB) {
                std::fill(s.h.get(), s.h.get() + n * rank, 0.0f);
                thin_x_wt(xs, lds, n, Matrix{p.lora_A, rank, in, in, 1}, s.h.get(), rank);
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(out), to_int(rank), n, scale,
                                  dy_block, ld(ld_dy), s.h.get(), ld(rank), 1.0f, dB, ld(rank));
            }
        }
        if (dx) {
            float* dx_block = dx + r0 * in;
            k.lowrank_rows(dx_block, in, nullptr, s.g.get(), rank, p.lora_A, in, rank, n, in, scale, false);
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
    const std::vector<uint32_t> col_keys = column_keys(p);
    // h = scale * dropout(x) A^T, its rows shared among threads.
    const Buffer h = buffer(m * rank);
    const int np = share(p.threads, m, kBlockRows);
    const int64_t buf_size = p.dropout_p > 0.0f ? std::min(kBlockRows, m) * in : 0;
    const Buffer buf = buffer(np * buf_size);
    parallel_run(np, [&](int t) {
        const Range rows = part(m, np, t, 1);
        project(p, col_keys.data(), rows, h.get() + rows.begin * rank, buf.get() + t * buf_size);
    });
    if (m <= kSmallRows && p.base_product && p.weight.col_stride == 1) {
        // A few rows: bias, then x W^T and h B^T in one pass of small_gemm_nt over W and B (untransposed).
        const int n = share(p.threads, n_out, kColsPerThread);
        parallel_run(n, [&](int t) {
            const Range cols = part(n_out, n, t, kColAlign);
            RowLora lora[kSmallRows];
            for (int64_t i = 0; i < m; ++i) {
                lora[i] = {h.get() + i * rank, p.lora_B + cols.begin * rank, rank, rank};
                start_row(out + i * n_out + cols.begin, p.bias, cols);
            }
            active_kernels().small_gemm_nt(out + cols.begin, n_out, p.x.data, p.x.row_stride, m,
                                           p.weight.data + cols.begin * p.weight.row_stride, p.weight.row_stride,
                                           cols.size(), in, lora);
        });
        return;
    }
    // Else each output tile gets bias + h B^T and += x W^T. Each thread packs its part of W and
    // all of x, or all of W and its part of x: whichever part is the larger matrix gets split.
    const Buffer bt = buffer(rank * n_out);
    active_kernels().transpose(p.lora_B, rank, n_out, rank, bt.get(), n_out);
    if (split_rows(p.threads, m, n_out)) {
        const int n = share(p.threads, m, kRowsPerThread);
        parallel_run(n, [&](int t) {
            const Range rows = part(m, n, t, 1);
            forward_tile(p, rows, {0, n_out}, h.get() + rows.begin * rank, bt.get(), out);
        });
    } else {
        const int n = share(p.threads, n_out, kColsPerThread);
        parallel_run(n, [&](int t) { forward_tile(p, {0, m}, part(n_out, n, t, kColAlign), h.get(), bt.get(), out); });
    }
}

void lora_backward(const LoraProblem& p, const float* dy, int64_t ld_dy, float* dx, float* dA, float* dB) {
    const int64_t m = p.x.rows, n_out = p.weight.rows, in = p.x.cols, rank = p.rank;
    if (dA) std::fill(dA, dA + rank * in, 0.0f);
    if (dB) std::fill(dB, dB + n_out * rank, 0.0f);
    if (m == 0) return;
    const std::vector<uint32_t> col_keys = column_keys(p);
    const int n = share(p.threads, m, kBlockRows);
    const int64_t block = std::min(kBlockRows, m);
    std::vector<BackwardScratch> scratch(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) {
        BackwardScratch& s = scratch[static_cast<size_t>(t)];
        s.x_block = buffer(p.dropout_p > 0.0f ? block * in : 0);
        s.h = buffer(block * rank);
        s.g = buffer(block * rank);
        if (t > 0 && dA) {
            s.dA = buffer(rank * in);
            std::fill(s.dA.get(), s.dA.get() + rank * in, 0.0f);
        }
        if (t > 0 && dB) {
            s.dB = buffer(n_out * rank);
            std::fill(s.dB.get(), s.dB.get() + n_out * rank, 0.0f);
        }
    }
    parallel_run(n, [&](int t) {  // thread 0 accumulates straight into dA, dB; the others into scratch
        BackwardScratch& s = scratch[static_cast<size_t>(t)];
        backward_thin(p, col_keys.data(), dy, ld_dy, part(m, n, t, 1), dx, t == 0 || !dA ? dA : s.dA.get(),
                      t == 0 || !dB ? dB : s.dB.get(), s);
    });
    for (int t = 1; t < n; ++t) {
        const BackwardScratch& s = scratch[static_cast<size_t>(t)];
        if (dA) for (int64_t i = 0; i < rank * in; ++i) dA[i] += s.dA[i];
        if (dB) for (int64_t i = 0; i < n_out * rank; ++i) dB[i] += s.dB[i];
    }
    if (!dx || !p.base_product) return;
    if (split_rows(p.threads, m, in)) {  // dx += dy W, split as forward splits its tiles
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

// Mixed batches. The rows are grouped by adapter once per call (group_rows), so that each
// adapter's A and B serve all of its rows while in cache; the base product is the single-adapter
// path's, over all rows in their own order. The rank-R update: for a forward of a few rows, fused
// into small_gemm_nt's pass over W (each row's B read as it is); else, per output tile, by
// OpenBLAS's sgemv for an adapter with few rows there, and through a transposed chunk of B (the
// cost shared by its rows) for more.
namespace {

constexpr int64_t kTransposeRows = 4;              // an adapter with this many rows in a tile gets B transposed
constexpr int64_t kChunkFloats = 4096;             // the transposed chunk of a B that a tile keeps in L1
constexpr int64_t kThreadMacs = int64_t{1} << 18;  // the least multiply-adds of a thin pass worth a thread

int64_t adapter_count(const MixedProblem& p) { return static_cast<int64_t>(p.adapters.size()); }
int64_t rank_of(const Adapter& a) { return a.A.rows; }
int64_t rows_of(const MixedProblem& p, int64_t a) { return p.starts[a + 2] - p.starts[a + 1]; }

int64_t largest_group(const MixedProblem& p) {
    int64_t most = 0;
    for (int64_t a = 0; a < adapter_count(p); ++a) most = std::max(most, rows_of(p, a));
    return most;
}

// Group g's positions in the sorted order whose rows lie in [rows): a subrange, as a group's rows ascend.
Range positions_in(const MixedProblem& p, int64_t g, Range rows) {
    const int64_t* first = p.order.data() + p.starts[g];
    const int64_t* last = p.order.data() + p.starts[g + 1];
    return {std::lower_bound(first, last, rows.begin) - p.order.data(),
            std::lower_bound(first, last, rows.end) - p.order.data()};
}

std::vector<uint32_t> mixed_column_keys(const MixedProblem& p) {
    bool dropout = false;
    for (const Adapter& a : p.adapters) dropout = dropout || a.dropout_p > 0.0f;
    std::vector<uint32_t> keys(static_cast<size_t>(dropout ? p.x.cols : 0));
    for (size_t c = 0; c < keys.size(); ++c) keys[c] = dropout_col_key(static_cast<int64_t>(c));
    return keys;
}

// The rows of m (row stride ld, cols wide) at positions [k0, k0 + n): in place when they are
// consecutive rows (a group's rows ascend, so its first and last tell), else copied to buf.
const float* gathered(const MixedProblem& p, const float* m, int64_t ld, int64_t cols, int64_t k0, int64_t n,
                      float* buf, int64_t* stride) {
    if (p.order[k0 + n - 1] - p.order[k0] == n - 1) {
        *stride = ld;
        return m + p.order[k0] * ld;
    }
    for (int64_t i = 0; i < n; ++i) std::copy_n(m + p.order[k0 + i] * ld, cols, buf + i * cols);
    *stride = cols;
    return buf;
}

// Adapter ad's rows at positions [k0, k0 + n) as its LoRA branch sees them, up to the 1 / (1 - p)
// in its scale: gathered as above without dropout, else masked into buf (n x in).
const float* mixed_input(const MixedProblem& p, const Adapter& ad, const uint32_t* col_keys, int64_t k0, int64_t n,
                         float* buf, int64_t* stride) {
    const Matrix& x = p.x;
    if (ad.dropout_p == 0.0f) return gathered(p, x.data, x.row_stride, x.cols, k0, n, buf, stride);
    const Kernels& k = active_kernels();
    for (int64_t i = 0; i < n; ++i) {
        const int64_t row = p.order[k0 + i];
        k.dropout_row(x.data + row * x.row_stride, buf + i * x.cols, x.cols, dropout_row_key(p.seed, row), col_keys,
                      ad.threshold);
    }
    *stride = x.cols;
    return buf;
}

// n parts [bounds[t], bounds[t + 1]) of the adapters' positions [starts[1], M), of near-equal cost
// when a row of adapter a costs cost[a].
std::vector<int64_t> balanced_parts(const MixedProblem& p, const std::vector<int64_t>& cost, int n) {
    double total = 0.0;
    for (int64_t a = 0; a < adapter_count(p); ++a) total += static_cast<double>(rows_of(p, a)) * cost[a];
    std::vector<int64_t> bounds(static_cast<size_t>(n + 1), p.x.rows);
    bounds[0] = p.starts[1];
    double done = 0.0;
    int t = 1;
    for (int64_t a = 0; a < adapter_count(p) && t < n; ++a) {
        const int64_t begin = p.starts[a + 1], count = rows_of(p, a);
        const double row_cost = static_cast<double>(cost[a]);
        while (t < n && done + count * row_cost >= total * t / n) {
            const double k = row_cost > 0.0 ? std::ceil((total * t / n - done) / row_cost) : 0.0;
            bounds[t++] = begin + std::clamp(static_cast<int64_t>(k), int64_t{0}, count);
        }
        done += count * row_cost;
    }
    return bounds;
}

// f(a, k0, n) for each block of up to kBlockRows positions of one adapter within [positions).
template <class F>
void for_each_block(const MixedProblem& p, Range positions, F&& f) {
    for (int64_t a = 0; a < adapter_count(p); ++a) {
        const int64_t end = std::min(positions.end, p.starts[a + 2]);
        for (int64_t k0 = std::max(positions.begin, p.starts[a + 1]); k0 < end; k0 += kBlockRows)
            f(a, k0, std::min(kBlockRows, end - k0));
    }
}

// h = scale * dropout(x) A^T for each adapter's rows, in sorted order: adapter a's (count x rank,
// row-major) from offset[a].
struct Projection {
    std::vector<int64_t> offset;
    Buffer h;

    // The row of h at sorted position k, one of adapter a's.
    float* row(const MixedProblem& p, int64_t a, int64_t k) const {
        return h.get() + offset[static_cast<size_t>(a)] + (k - p.starts[a + 1]) * rank_of(p.adapters[a]);
    }
};

Projection project_mixed(const MixedProblem& p, const uint32_t* col_keys) {
    const int64_t adapters = adapter_count(p), in = p.x.cols;
    Projection proj{std::vector<int64_t>(static_cast<size_t>(adapters + 1), 0), nullptr};
    std::vector<int64_t> cost(static_cast<size_t>(adapters));
    int64_t total = 0;
    for (int64_t a = 0; a < adapters; ++a) {
        const int64_t rank = rank_of(p.adapters[a]);
        proj.offset[a + 1] = proj.offset[a] + rows_of(p, a) * rank;
        cost[a] = rank * in;
        total += rows_of(p, a) * cost[a];
    }
    proj.h = buffer(proj.offset[adapters]);
    const int n = share(p.threads, total, kThreadMacs);
    const std::vector<int64_t> bounds = balanced_parts(p, cost, n);
    const int64_t buf_size = std::min(kBlockRows, largest_group(p)) * in;
    const Buffer bufs = buffer(n * buf_size);
    parallel_run(n, [&](int t) {
        for_each_block(p, {bounds[t], bounds[t + 1]}, [&](int64_t a, int64_t k0, int64_t rows) {
            const Adapter& ad = p.adapters[a];
            const int64_t rank = rank_of(ad);
            int64_t lds;
            const float* xs = mixed_input(p, ad, col_keys, k0, rows, bufs.get() + t * buf_size, &lds);
            float* h = proj.row(p, a, k0);
            std::fill(h, h + rows * rank, 0.0f);
            thin_x_wt(xs, lds, rows, ad.A, h, rank);
            for (int64_t i = 0; i < rows * rank; ++i) h[i] *= ad.scale;
        });
    });
    return proj;
}

// Whether a forward takes the fused decode pass: a few rows, the extension doing the base
// product, and W and each named adapter's B row-major.
bool fused_decode(const MixedProblem& p) {
    if (p.x.rows > kSmallRows || !p.base_product || p.weight.col_stride != 1) return false;
    for (int64_t a = 0; a < adapter_count(p); ++a)
        if (rows_of(p, a) > 0 && p.adapters[a].B.col_stride != 1) return false;
    return true;
}

// Columns [cols) of out for a few rows: bias, then x W^T and each row's h B^T in one pass over W
// and the B's.
void fused_decode_tile(const MixedProblem& p, Range cols, const Projection& proj, float* out) {
    const int64_t n_out = p.weight.rows;
    RowLora lora[kSmallRows] = {};
    for (int64_t a = 0; a < adapter_count(p); ++a) {
        const Matrix& b = p.adapters[a].B;
        for (int64_t k = p.starts[a + 1]; k < p.starts[a + 2]; ++k)
            lora[p.order[k]] = {proj.row(p, a, k), b.data + cols.begin * b.row_stride, b.row_stride, b.cols};
    }
    for (int64_t i = 0; i < p.x.rows; ++i) start_row(out + i * n_out + cols.begin, p.bias, cols);
    active_kernels().small_gemm_nt(out + cols.begin, n_out, p.x.data, p.x.row_stride, p.x.rows,
                                   p.weight.data + cols.begin * p.weight.row_stride, p.weight.row_stride, cols.size(),
                                   p.x.cols, lora);
}

// Columns of a row-major B^T that one chunk holds: kChunkFloats / rank, whole 16-column tiles.
int64_t chunk_width(int64_t rank) { return std::max<int64_t>(16, kChunkFloats / rank / 16 * 16); }

// One thread's buffers for the forward tiles: a transposed chunk of B, and row pointers.
struct TileScratch {
    Buffer bt;
    std::vector<float*> rows;
};

// Rows [rows) x columns [cols) of out: bias + each row's h B^T (bias alone for rows without an
// adapter), then += x W^T if the extension does the base product.
void mixed_forward_tile(const MixedProblem& p, Range rows, Range cols, const Projection& proj, float* out,
                        TileScratch& s) {
    const int64_t n_out = p.weight.rows;
    const Kernels& k = active_kernels();
    const Range none = positions_in(p, 0, rows);
    for (int64_t q = none.begin; q < none.end; ++q) start_row(out + p.order[q] * n_out + cols.begin, p.bias, cols);
    for (int64_t a = 0; a < adapter_count(p); ++a) {
        const Range ks = positions_in(p, a + 1, rows);
        if (ks.size() == 0) continue;
        const Matrix& b = p.adapters[a].B;
        const int64_t rank = b.cols;
        const float* h = proj.row(p, a, ks.begin);
        if (b.col_stride == 1 && ks.size() < kTransposeRows) {  // bias + B h per row: OpenBLAS's sgemv
            for (int64_t q = ks.begin; q < ks.end; ++q) {
                float* c = out + p.order[q] * n_out + cols.begin;
                start_row(c, p.bias, cols);
                scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, to_int(cols.size()), to_int(rank), 1.0f,
                                  b.data + cols.begin * b.row_stride, ld(b.row_stride), h + (q - ks.begin) * rank, 1,
                                  1.0f, c, 1);
            }
            continue;
        }
        // bias + h B^T by chunks of B^T: B itself if column-major (element (j, r) at j + r * col_stride), else
        // transposed into s.bt.
        const int64_t width = b.col_stride == 1 ? chunk_width(rank) : cols.size();
        for (int64_t j0 = cols.begin; j0 < cols.end; j0 += width) {
            const int64_t w = std::min(width, cols.end - j0);
            const float* bt = b.data + j0;
            int64_t ldbt = b.col_stride;
            if (b.col_stride == 1) {
                k.transpose(b.data + j0 * b.row_stride, b.row_stride, w, rank, s.bt.get(), w);
                bt = s.bt.get();
                ldbt = w;
            }
            for (int64_t i = 0; i < ks.size(); ++i)
                s.rows[static_cast<size_t>(i)] = out + p.order[ks.begin + i] * n_out + j0;
            k.lowrank_scatter(s.rows.data(), p.bias ? p.bias + j0 : nullptr, h, rank, bt, ldbt, rank, ks.size(), w,
                              1.0f, false);
        }
    }
    if (p.base_product)
        gemm_x_wt(p.x.data + rows.begin * p.x.row_stride, p.x.row_stride, rows.size(), p.weight, cols.begin,
                  cols.size(), out + rows.begin * n_out + cols.begin, n_out);
}

// One thread's buffers for the mixed backward: a block's gathered x and dy, g = dy B and
// h = x A^T, row pointers into dx, and the partial dA, dB of an adapter it shares with an
// earlier thread.
struct BackwardMixedScratch {
    Buffer x_block, dy_block, g, h, dA, dB;
    std::vector<float*> rows;
};

// A row-major copy of a column-major A, for dx's rank-R term (empty for a row-major one).
std::vector<float> row_major_copy(const Matrix& a) {
    std::vector<float> copy;
    if (a.col_stride == 1) return copy;
    copy.resize(static_cast<size_t>(a.rows * a.cols));
    for (int64_t r = 0; r < a.rows; ++r)
        for (int64_t c = 0; c < a.cols; ++c) copy[r * a.cols + c] = a.data[r + c * a.col_stride];
    return copy;
}

}  // namespace

void group_rows(MixedProblem& p, const int64_t* ids, int64_t stride) {
    const int64_t m = p.x.rows, groups = adapter_count(p) + 1;
    p.starts.assign(static_cast<size_t>(groups + 1), 0);
    for (int64_t i = 0; i < m; ++i) ++p.starts[ids[i * stride] + 2];  // group g = id + 1 counted at g + 1
    for (int64_t g = 1; g <= groups; ++g) p.starts[g] += p.starts[g - 1];
    p.order.resize(static_cast<size_t>(m));
    std::vector<int64_t> next(p.starts.begin(), p.starts.end() - 1);
    for (int64_t i = 0; i < m; ++i) p.order[next[ids[i * stride] + 1]++] = i;
}

void lora_forward_mixed(const MixedProblem& p, float* out) {
    const int64_t m = p.x.rows, n_out = p.weight.rows;
    if (m == 0 || n_out == 0) return;
    const std::vector<uint32_t> col_keys = mixed_column_keys(p);
    const Projection proj = project_mixed(p, col_keys.data());
    if (fused_decode(p)) {
        const int n = share(p.threads, n_out, kColsPerThread);
        parallel_run(n, [&](int t) { fused_decode_tile(p, part(n_out, n, t, kColAlign), proj, out); });
        return;
    }
    // Each thread takes all of W and its part of the rows, or its part of W and all rows, as
    // lora_forward splits its tiles.
    const bool by_rows = split_rows(p.threads, m, n_out);
    const int n = by_rows ? share(p.threads, m, kRowsPerThread) : share(p.threads, n_out, kColsPerThread);
    int64_t bt_size = 0;
    for (const Adapter& a : p.adapters) bt_size = std::max(bt_size, chunk_width(rank_of(a)) * rank_of(a));
    std::vector<TileScratch> scratch(static_cast<size_t>(n));
    for (TileScratch& s : scratch) {
        s.bt = buffer(bt_size);
        s.rows.resize(static_cast<size_t>(largest_group(p)));
    }
    parallel_run(n, [&](int t) {
        const Range rows = by_rows ? part(m, n, t, 1) : Range{0, m};
        const Range cols = by_rows ? Range{0, n_out} : part(n_out, n, t, kColAlign);
        mixed_forward_tile(p, rows, cols, proj, out, scratch[static_cast<size_t>(t)]);
    });
}

void lora_backward_mixed(const MixedProblem& p, const float* dy, int64_t ld_dy, float* dx,
                         const std::vector<float*>& dA, const std::vector<float*>& dB) {
    const int64_t m = p.x.rows, n_out = p.weight.rows, in = p.x.cols, adapters = adapter_count(p);
    for (int64_t a = 0; a < adapters; ++a) {
        const int64_t rank = rank_of(p.adapters[a]);
        if (dA[a]) std::fill(dA[a], dA[a] + rank * in, 0.0f);
        if (dB[a]) std::fill(dB[a], dB[a] + n_out * rank, 0.0f);
    }
    if (m == 0) return;
    const std::vector<uint32_t> col_keys = mixed_column_keys(p);
    // The thin part, adapter by adapter: the multiply-adds of a row (g, dx's rank-R term, dA, dB).
    std::vector<int64_t> cost(static_cast<size_t>(adapters), 0);
    std::vector<std::vector<float>> a_copies(static_cast<size_t>(adapters));
    int64_t total = 0, max_rank = 0;
    bool any_grads = false;
    for (int64_t a = 0; a < adapters; ++a) {
        const bool grads = dA[a] || dB[a];
        if (rows_of(p, a) == 0 || !(dx || grads)) continue;
        const int64_t rank = rank_of(p.adapters[a]);
        cost[a] = rank * (n_out + (dx ? in : 0) + (grads ? 2 * in + n_out : 0));
        total += rows_of(p, a) * cost[a];
        max_rank = std::max(max_rank, rank);
        any_grads = any_grads || grads;
        if (dx) a_copies[a] = row_major_copy(p.adapters[a].A);
    }
    const int n = share(p.threads, total, kThreadMacs);
    const std::vector<int64_t> bounds = balanced_parts(p, cost, n);
    // Thread t shares its first adapter with an earlier thread when its part starts inside that
    // adapter's rows: it sums that adapter's dA, dB into its own buffers, added up afterwards.
    std::vector<int64_t> shared(static_cast<size_t>(n), -1);
    for (int t = 1; t < n; ++t) {
        const int64_t k = bounds[t];
        if (k >= bounds[t + 1]) continue;
        const int64_t a = std::upper_bound(p.starts.begin() + 1, p.starts.end(), k) - p.starts.begin() - 2;
        if (k > p.starts[a + 1] && (dA[a] || dB[a])) shared[t] = a;
    }
    const int64_t block = std::min(kBlockRows, largest_group(p));
    std::vector<BackwardMixedScratch> scratch(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) {
        BackwardMixedScratch& s = scratch[static_cast<size_t>(t)];
        s.x_block = buffer(any_grads ? block * in : 0);
        s.dy_block = buffer(block * n_out);
        s.g = buffer(block * max_rank);
        s.h = buffer(block * max_rank);
        s.rows.resize(static_cast<size_t>(block));
        if (shared[t] >= 0) {
            const int64_t rank = rank_of(p.adapters[shared[t]]);
            s.dA = buffer(rank * in);
            s.dB = buffer(n_out * rank);
            std::fill(s.dA.get(), s.dA.get() + rank * in, 0.0f);
            std::fill(s.dB.get(), s.dB.get() + n_out * rank, 0.0f);
        }
    }
    parallel_run(n, [&](int t) {
        BackwardMixedScratch& s = scratch[static_cast<size_t>(t)];
        const Kernels& k = active_kernels();
        for_each_block(p, {bounds[t], bounds[t + 1]}, [&](int64_t a, int64_t k0, int64_t rows) {
            if (cost[a] == 0) return;
            const Adapter& ad = p.adapters[a];
            const int64_t rank = rank_of(ad);
            const bool own = shared[t] != a;
            float* da = dA[a] && !own ? s.dA.get() : dA[a];
            float* db = dB[a] && !own ? s.dB.get() : dB[a];
            int64_t ldd;
            const float* dys = gathered(p, dy, ld_dy, n_out, k0, rows, s.dy_block.get(), &ldd);
            float* g = s.g.get();  // g = dy B: the gradient reaching dropout(x) A^T, unscaled
            std::fill(g, g + rows * rank, 0.0f);
            gemm_dy_w(dys, ldd, rows, ad.B, 0, rank, g, rank);
            if (da || db) {
                int64_t lds;
                const float* xs = mixed_input(p, ad, col_keys.data(), k0, rows, s.x_block.get(), &lds);
                if (da)
                    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(rank), to_int(in), to_int(rows),
                                      ad.scale, g, ld(rank), xs, ld(lds), 1.0f, da, ld(in));
                if (db) {
                    float* h = s.h.get();
                    std::fill(h, h + rows * rank, 0.0f);
                    thin_x_wt(xs, lds, rows, ad.A, h, rank);
                    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(n_out), to_int(rank),
                                      to_int(rows), ad.scale, dys, ld(ldd), h, ld(rank), 1.0f, db, ld(rank));
                }
            }
            if (dx) {  // dx's rows: scale mask (g A) / (1 - p), masked in place
                const std::vector<float>& copy = a_copies[static_cast<size_t>(a)];
                for (int64_t i = 0; i < rows; ++i) s.rows[static_cast<size_t>(i)] = dx + p.order[k0 + i] * in;
                k.lowrank_scatter(s.rows.data(), nullptr, g, rank, copy.empty() ? ad.A.data : copy.data(),
                                  copy.empty() ? ad.A.row_stride : in, rank, rows, in, ad.scale, false);
                if (ad.dropout_p > 0.0f)
                    for (int64_t i = 0; i < rows; ++i)
                        k.dropout_row(s.rows[static_cast<size_t>(i)], s.rows[static_cast<size_t>(i)], in,
                                      dropout_row_key(p.seed, p.order[k0 + i]), col_keys.data(), ad.threshold);
            }
        });
    });
    for (int t = 1; t < n; ++t) {
        const int64_t a = shared[static_cast<size_t>(t)];
        if (a < 0) continue;
        const BackwardMixedScratch& s = scratch[static_cast<size_t>(t)];
        const int64_t rank = rank_of(p.adapters[a]);
        if (dA[a]) for (int64_t i = 0; i < rank * in; ++i) dA[a][i] += s.dA[i];
        if (dB[a]) for (int64_t i = 0; i < n_out * rank; ++i) dB[a][i] += s.dB[i];
    }
    // dx's rows without an adapter start at zero; then dx += dy W, split as lora_backward splits it.
    if (!dx || (!p.base_product && p.starts[1] == 0)) return;
    auto dx_tile = [&](Range rows, Range cols) {
        const Range none = positions_in(p, 0, rows);
        for (int64_t q = none.begin; q < none.end; ++q)
            std::fill(dx + p.order[q] * in + cols.begin, dx + p.order[q] * in + cols.end, 0.0f);
        if (p.base_product)
            gemm_dy_w(dy + rows.begin * ld_dy, ld_dy, rows.size(), p.weight, cols.begin, cols.size(),
                      dx + rows.begin * in + cols.begin, in);
    };
    if (split_rows(p.threads, m, in)) {
        const int nr = share(p.threads, m, kRowsPerThread);
        parallel_run(nr, [&](int t) { dx_tile(part(m, nr, t, 1), {0, in}); });
    } else {
        const int nc = share(p.threads, in, kColsPerThread);
        parallel_run(nc, [&](int t) { dx_tile({0, m}, part(in, nc, t, kColAlign)); });
    }
}

}  // namespace fastlora
