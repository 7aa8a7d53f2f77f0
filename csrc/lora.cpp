// The fused LoRA passes, single-adapter and mixed-batch: our kernels for the dropout hash, the
// rank-R update and the base product of a few rows; OpenBLAS single-threaded sgemm for the thin
// products and, unless the caller adds it itself (base_product false), the base product of many
// rows; PyTorch's OpenMP runtime (parallel.h) for the parallelism.
#include "lora.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace fastlora {

void openblas_gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                   const float* b, int ldb, float beta, float* c, int ldc) {
    scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n,
                      k, alpha, a, lda, b, ldb, beta, c, ldc);
}

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

// c (rows x cols, ldc) = 0 before a streaming kernel accumulates onto it (a GEMM's beta 0).
void clear(float* c, int64_t ldc, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) std::fill(c + i * ldc, c + i * ldc + cols, 0.0f);
}

// c (rows x cols, ldc) = beta c + a (rows x in, lda) * W[n0 : n0 + cols, :]^T, beta 0 or 1. A few rows take our
// streaming kernels (W read once, no packing); more take the GEMM (OpenBLAS unless a DoRA call names PyTorch's).
void gemm_x_wt(const float* a, int64_t lda, int64_t rows, const Matrix& w, int64_t n0, int64_t cols, float* c,
               int64_t ldc, float beta = 1.0f, Gemm gemm = openblas_gemm) {
    const int64_t in = w.cols;
    const bool row_major = w.col_stride == 1;
    if (rows <= kSmallRows && beta == 0.0f) clear(c, ldc, rows, cols);
    if (rows <= kSmallRows && row_major)
        active_kernels().small_gemm_nt(c, ldc, a, lda, rows, w.data + n0 * w.row_stride, w.row_stride, cols, in,
                                        nullptr);
    else if (rows <= kSmallRows)
        active_kernels().lowrank_rows(c, ldc, nullptr, a, lda, w.data + n0, w.col_stride, in, rows, cols, 1.0f, true);
    else if (row_major)
        gemm(false, true, to_int(rows), to_int(cols), to_int(in), 1.0f, a, ld(lda), w.data + n0 * w.row_stride,
             ld(w.row_stride), beta, c, ld(ldc));
    else
        gemm(false, false, to_int(rows), to_int(cols), to_int(in), 1.0f, a, ld(lda), w.data + n0, ld(w.col_stride),
             beta, c, ld(ldc));
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

// c (rows x cols, ldc) = beta c + a (rows x out, lda) * W[:, k0 : k0 + cols], dispatched as gemm_x_wt.
void gemm_dy_w(const float* a, int64_t lda, int64_t rows, const Matrix& w, int64_t k0, int64_t cols, float* c,
               int64_t ldc, float beta = 1.0f, Gemm gemm = openblas_gemm) {
    const int64_t out = w.rows;
    const bool row_major = w.col_stride == 1;
    if (rows <= kSmallRows && beta == 0.0f) clear(c, ldc, rows, cols);
    if (rows <= kSmallRows && row_major)
        active_kernels().lowrank_rows(c, ldc, nullptr, a, lda, w.data + k0, w.row_stride, out, rows, cols, 1.0f, true);
    else if (rows <= kSmallRows)
        active_kernels().small_gemm_nt(c, ldc, a, lda, rows, w.data + k0 * w.col_stride, w.col_stride, cols, out,
                                        nullptr);
    else if (row_major)
        gemm(false, false, to_int(rows), to_int(cols), to_int(out), 1.0f, a, ld(lda), w.data + k0, ld(w.row_stride),
             beta, c, ld(ldc));
    else
        gemm(false, true, to_int(rows), to_int(cols), to_int(out), 1.0f, a, ld(lda), w.data + k0 * w.col_stride,
             ld(w.col_stride), beta, c, ld(ldc));
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

// The tiles of an (m x cols) product with W, one per thread, split by rows or by columns as split_rows says:
// tile(rows, cols) for each.
void parallel_tiles(int threads, int64_t m, int64_t cols, const std::function<void(Range, Range)>& tile) {
    if (split_rows(threads, m, cols)) {
        const int n = share(threads, m, kRowsPerThread);
        parallel_run(n, [&](int t) { tile(part(m, n, t, 1), {0, cols}); });
    } else {
        const int n = share(threads, cols, kColsPerThread);
        parallel_run(n, [&](int t) { tile({0, m}, part(cols, n, t, kColAlign)); });
    }
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
    Buffer x_block, h, g, dA, dB, sums, block_sums;
};

// What DoRA changes in backward's thin pass: dm's column dots, sums[j] += sum_i dy[i, j] (v[i, j] - shift[j])
// (v (M, out) contiguous, or null for none; shift (out,) or null for 0); g = (c dy) B already made (M x rank), or
// null to make it from lora_B; and dx already holding its product, onto which the rank-R term is added.
struct DoraThin {
    const float* v;
    const float* shift;
    const float* g;
    bool dx_accumulates;
};

// sums (n,) += the column dots of dy's and v's rows [r0, r0 + rows) (see DoraThin), summed by block into
// block_sums first: a block's sums stay small, so adding them up loses less than one running sum of all rows.
void column_dots(const DoraThin& d, const float* dy, int64_t ld_dy, int64_t r0, int64_t rows, int64_t n,
                 float* block_sums, float* sums) {
    std::fill(block_sums, block_sums + n, 0.0f);
    for (int64_t i = r0; i < r0 + rows; ++i) {
        const float* g = dy + i * ld_dy;
        const float* v = d.v + i * n;
        if (d.shift)
            for (int64_t j = 0; j < n; ++j) block_sums[j] += g[j] * (v[j] - d.shift[j]);
        else
            for (int64_t j = 0; j < n; ++j) block_sums[j] += g[j] * v[j];
    }
    for (int64_t j = 0; j < n; ++j) sums[j] += block_sums[j];
}

// Backward's thin part for rows [rows), block by block: adds scale g^T dropout(x) to dA and
// scale dy^T (dropout(x) A^T) to dB, and writes dx's masked rank-R term scale mask (g A) / (1-p)
// into dx, where g = dy B; with dora, DoRA's changes (see DoraThin), dm's column dots made while dy's block is in
// cache. Each output is skipped when null.
void backward_thin(const LoraProblem& p, const uint32_t* col_keys, const float* dy, int64_t ld_dy, Range rows,
                   float* dx, float* dA, float* dB, const DoraThin* dora, float* sums, BackwardScratch& s) {
    const int64_t in = p.x.cols, out = p.weight.rows, rank = p.rank;
    const Kernels& k = active_kernels();
    const float scale = lora_scale(p);
    for (int64_t r0 = rows.begin; r0 < rows.end; r0 += kBlockRows) {
        const int n = to_int(std::min(kBlockRows, rows.end - r0));
        const float* dy_block = dy + r0 * ld_dy;
        const float* g = dora && dora->g ? dora->g + r0 * rank : s.g.get();
        if ((dA || dx) && g == s.g.get())  // g = dy B: the gradient reaching dropout(x) A^T, unscaled
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, to_int(rank), to_int(out), 1.0f, dy_block,
                              ld(ld_dy), p.lora_B, ld(rank), 0.0f, s.g.get(), ld(rank));
        if (dA || dB) {
            int64_t lds;
            const float* xs = lora_input(p, col_keys, r0, n, s.x_block.get(), &lds);
            if (dA)
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(rank), to_int(in), n, scale, g,
                                  ld(rank), xs, ld(lds), 1.0f, dA, ld(in));
            if (dB) {
                std::fill(s.h.get(), s.h.get() + n * rank, 0.0f);
                thin_x_wt(xs, lds, n, Matrix{p.lora_A, rank, in, in, 1}, s.h.get(), rank);
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(out), to_int(rank), n, scale,
                                  dy_block, ld(ld_dy), s.h.get(), ld(rank), 1.0f, dB, ld(rank));
            }
        }
        if (dora && dora->v) column_dots(*dora, dy, ld_dy, r0, n, out, s.block_sums.get(), sums);
        if (dx) {
            float* dx_block = dx + r0 * in;
            k.lowrank_rows(dx_block, in, nullptr, g, rank, p.lora_A, in, rank, n, in, scale,
                           dora && dora->dx_accumulates);
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
    parallel_tiles(p.threads, m, n_out, [&](Range rows, Range cols) {
        forward_tile(p, rows, cols, h.get() + rows.begin * rank, bt.get(), out);
    });
}

namespace {

// Buffer(n) of zeros.
Buffer zeros(int64_t n) {
    Buffer b = buffer(n);
    std::fill(b.get(), b.get() + n, 0.0f);
    return b;
}

// backward_thin over all rows, threads splitting them: dA, dB (zeroed here), dx's rank-R term and, with dora,
// the column dots into sums (out,) (zeroed by the caller).
void backward_thin_all(const LoraProblem& p, const uint32_t* col_keys, const float* dy, int64_t ld_dy, float* dx,
                       float* dA, float* dB, const DoraThin* dora, float* sums) {
    const bool dots = dora && dora->v;
    const int64_t m = p.x.rows, n_out = p.weight.rows, in = p.x.cols, rank = p.rank;
    if (dA) std::fill(dA, dA + rank * in, 0.0f);
    if (dB) std::fill(dB, dB + n_out * rank, 0.0f);
    if (m == 0) return;
    const int n = share(p.threads, m, kBlockRows);
    const int64_t block = std::min(kBlockRows, m);
    std::vector<BackwardScratch> scratch(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) {
        BackwardScratch& s = scratch[static_cast<size_t>(t)];
        s.x_block = buffer(p.dropout_p > 0.0f ? block * in : 0);
        s.h = buffer(block * rank);
        s.g = buffer(block * rank);
        if (t > 0 && dA) s.dA = zeros(rank * in);
        if (t > 0 && dB) s.dB = zeros(n_out * rank);
        if (t > 0 && dots) s.sums = zeros(n_out);
        if (dots) s.block_sums = buffer(n_out);
    }
    parallel_run(n, [&](int t) {  // thread 0 accumulates straight into dA, dB, sums; the others into scratch
        BackwardScratch& s = scratch[static_cast<size_t>(t)];
        backward_thin(p, col_keys, dy, ld_dy, part(m, n, t, 1), dx, t == 0 || !dA ? dA : s.dA.get(),
                      t == 0 || !dB ? dB : s.dB.get(), dora, t == 0 ? sums : s.sums.get(), s);
    });
    for (int t = 1; t < n; ++t) {
        const BackwardScratch& s = scratch[static_cast<size_t>(t)];
        if (dA) for (int64_t i = 0; i < rank * in; ++i) dA[i] += s.dA[i];
        if (dB) for (int64_t i = 0; i < n_out * rank; ++i) dB[i] += s.dB[i];
        if (dots) for (int64_t i = 0; i < n_out; ++i) sums[i] += s.sums[i];
    }
}

}  // namespace

void lora_backward(const LoraProblem& p, const float* dy, int64_t ld_dy, float* dx, float* dA, float* dB) {
    const int64_t m = p.x.rows, in = p.x.cols;
    const std::vector<uint32_t> col_keys = column_keys(p);
    backward_thin_all(p, col_keys.data(), dy, ld_dy, dx, dA, dB, nullptr, nullptr);
    if (m == 0 || !dx || !p.base_product) return;
    parallel_tiles(p.threads, m, in, [&](Range rows, Range cols) {  // dx += dy W, split as forward splits its tiles
        gemm_dy_w(dy + rows.begin * ld_dy, ld_dy, rows.size(), p.weight, cols.begin, cols.size(),
                  dx + rows.begin * in + cols.begin, in);
    });
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
    parallel_tiles(p.threads, m, in, dx_tile);
}

// DoRA: LoRA's passes with a per-output-feature factor c = m / n. The norms take one pass over W, a block of rows
// at a time: W A^T and |W_i|^2 while the block is in cache, then n_i^2 = |W_i|^2 + 2 scale B_i (W A^T)_i +
// scale^2 B_i (A A^T) B_i^T per feature. Forward's tiles get the base product(s) from the GEMM, then
// dora_rows adds bias, rank-R update and factor while each tile row is in cache. Backward makes dx's product
// first, the factor on dy's columns a chunk of them at a time (no scaled copy of dy, none of W), then runs
// LoRA's thin pass with g = (c dy) B, dB's factor applied after, and dm's column dots beside dB's.
namespace {

constexpr int64_t kNormRows = 48;           // rows of W whose W A^T and squared norms are made together
constexpr int64_t kScaledFloats = 1 << 16;  // a thread's chunk of column-scaled dy for dx's product (256 KiB)

// Whether output feature i has a magnitude (its group is enabled), and where: m[*k].
bool magnitude_index(const DoraProblem& p, int64_t i, int64_t* k) {
    const int64_t per = p.lora.weight.rows / static_cast<int64_t>(p.slots.size());
    const int64_t slot = p.slots[static_cast<size_t>(i / per)];
    *k = slot * per + i % per;
    return slot >= 0;
}

// A^T (in x padded), zero-padded to 16 columns, for the norms' W A^T by panel_gemm over a row-major W's rows,
// from rank 12 up; below it padding would cost more than it gains and the streaming kernel takes them. Empty
// when not used (padded 0).
struct NormScratch {
    std::vector<float> at;
    int64_t padded;
};

NormScratch norm_scratch(const LoraProblem& q) {
    NormScratch s{{}, 0};
    if (q.weight.col_stride != 1 || q.rank < 12) return s;
    s.padded = (q.rank + 15) / 16 * 16;
    s.at.assign(static_cast<size_t>(q.x.cols * s.padded), 0.0f);
    active_kernels().transpose(q.lora_A, q.x.cols, q.rank, q.x.cols, s.at.data(), s.padded);
    return s;
}

// One thread's buffers for norm_block: panel_gemm's (padded) output, and a column-major W's block packed.
struct NormBlockScratch {
    Buffer wide, packed;
};

// wa (rows x rank, rows <= kNormRows) = W[i0 : i0 + rows] A^T and sq (rows,) = those rows' squared norms,
// reading the block from memory once. A column-major W's block (columns of the row-major W^T) is packed first
// into rows' columns padded to 16 (a strided W^T would alias in cache), then W A^T = (A W^T)^T comes from
// panel_gemm over A's rows and the squares from the packed copy.
void norm_block(const DoraProblem& p, const NormScratch& ns, int64_t i0, int64_t rows, float* wa, float* sq,
                NormBlockScratch& s) {
    const Matrix& w = p.lora.weight;
    const int64_t in = w.cols, rank = p.lora.rank;
    const Kernels& k = active_kernels();
    if (w.col_stride == 1) {
        const float* block = w.data + i0 * w.row_stride;
        if (ns.padded) {
            k.panel_gemm(s.wide.get(), ns.padded, block, w.row_stride, rows, ns.at.data(), ns.padded, in, ns.padded);
            for (int64_t i = 0; i < rows; ++i)
                std::copy(s.wide.get() + i * ns.padded, s.wide.get() + i * ns.padded + rank, wa + i * rank);
        } else {
            std::fill(wa, wa + rows * rank, 0.0f);
            k.small_gemm_nt(wa, rank, block, w.row_stride, rows, p.lora.lora_A, in, rank, in, nullptr);
        }
        k.square_sums(block, w.row_stride, rows, in, sq);
        return;
    }
    const int64_t width = (rows + 15) / 16 * 16;
    float* packed = s.packed.get();
    for (int64_t q = 0; q < in; ++q) {
        const float* src = w.data + q * w.col_stride + i0;
        std::copy(src, src + rows, packed + q * width);
        std::fill(packed + q * width + rows, packed + (q + 1) * width, 0.0f);
    }
    float* wat = s.wide.get();  // (rank x width): W A^T transposed
    k.panel_gemm(wat, width, p.lora.lora_A, in, rank, packed, width, in, width);
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t r = 0; r < rank; ++r) wa[i * rank + r] = wat[r * width + i];
    std::fill(sq, sq + rows, 0.0f);
    for (int64_t q = 0; q < in; ++q)
        for (int64_t i = 0; i < rows; ++i) sq[i] += packed[q * width + i] * packed[q * width + i];
}

}  // namespace

void dora_norm(const DoraProblem& p, float* norm) {
    const LoraProblem& q = p.lora;
    const int64_t out = q.weight.rows, in = q.weight.cols, rank = q.rank;
    if (out == 0) return;
    std::vector<float> gram(static_cast<size_t>(rank * rank), 0.0f);  // A A^T
    active_kernels().small_gemm_nt(gram.data(), rank, q.lora_A, in, rank, q.lora_A, in, rank, in, nullptr);
    const double s = q.scale;
    const NormScratch scratch = norm_scratch(q);
    const bool packs = q.weight.col_stride != 1;
    const int n = share(q.threads, out, kColsPerThread);
    parallel_run(n, [&](int t) {
        const Range rows = part(out, n, t, 1);
        NormBlockScratch blocks{buffer(kNormRows * std::max(rank, scratch.padded)), buffer(packs ? kNormRows * in : 0)};
        const Buffer wa = buffer(kNormRows * rank), bg = buffer(kNormRows * rank);
        float sq[kNormRows];
        for (int64_t i0 = rows.begin; i0 < rows.end; i0 += kNormRows) {
            const int64_t b = std::min(kNormRows, rows.end - i0);
            const float* lora_B = q.lora_B + i0 * rank;
            norm_block(p, scratch, i0, b, wa.get(), sq, blocks);
            std::fill(bg.get(), bg.get() + b * rank, 0.0f);  // B G (G symmetric)
            active_kernels().small_gemm_nt(bg.get(), rank, lora_B, rank, b, gram.data(), rank, rank, rank, nullptr);
            for (int64_t i = 0; i < b; ++i) {
                double cross = 0.0, quad = 0.0;
                for (int64_t r = 0; r < rank; ++r) {
                    cross += double{lora_B[i * rank + r]} * wa[i * rank + r];
                    quad += double{lora_B[i * rank + r]} * bg[i * rank + r];
                }
                norm[i0 + i] = static_cast<float>(std::sqrt(std::max(sq[i] + 2.0 * s * cross + s * s * quad, 0.0)));
            }
        }
    });
}

bool dora_factors(const DoraProblem& p, const float* norm, float* factor) {
    bool fine = true;
    for (int64_t i = 0; i < p.lora.weight.rows; ++i) {
        int64_t k;
        if (!magnitude_index(p, i, &k)) {
            factor[i] = 1.0f;
            continue;
        }
        factor[i] = p.magnitude[k] / norm[i];
        fine = fine && std::isfinite(factor[i]) && factor[i] != 0.0f;
    }
    return fine;
}

void dora_forward(const DoraProblem& p, const float* factor, float* y, float* u) {
    const LoraProblem& q = p.lora;
    const int64_t m = q.x.rows, out = q.weight.rows, in = q.x.cols, rank = q.rank;
    if (m == 0 || out == 0) return;
    // The dropped path's input x_d: x, or x's masked rows scaled by 1 / (1 - p) (the reference's order: the
    // products then take x_d as it is).
    LoraProblem d = q;
    Buffer xd;
    if (q.dropout_p > 0.0f) {
        xd = buffer(m * in);
        const std::vector<uint32_t> col_keys = column_keys(q);
        const float keep = static_cast<float>(1.0 / (1.0 - double{q.dropout_p}));
        const int n = share(q.threads, m, kBlockRows);
        parallel_run(n, [&](int t) {
            const Range rows = part(m, n, t, 1);
            for (int64_t i = rows.begin; i < rows.end; ++i) {
                float* row = xd.get() + i * in;
                active_kernels().dropout_row(q.x.data + i * q.x.row_stride, row, in, dropout_row_key(q.seed, i),
                                             col_keys.data(), q.threshold);
                for (int64_t k = 0; k < in; ++k) row[k] *= keep;
            }
        });
        d.x = Matrix{xd.get(), m, in, in, 1};
        d.dropout_p = 0.0f;
    }
    const Buffer h = buffer(m * rank);  // scale x_d A^T
    const int np = share(q.threads, m, kBlockRows);
    parallel_run(np, [&](int t) {
        const Range rows = part(m, np, t, 1);
        project(d, nullptr, rows, h.get() + rows.begin * rank, nullptr);
    });
    const Buffer bt = buffer(rank * out);
    active_kernels().transpose(q.lora_B, rank, out, rank, bt.get(), out);
    // Each tile: y = x W^T (and u = x_d W^T), then the epilogue; split as lora_forward splits its tiles.
    auto tile = [&](Range rows, Range cols) {
        float* yc = y + rows.begin * out + cols.begin;
        float* uc = u ? u + rows.begin * out + cols.begin : nullptr;
        gemm_x_wt(q.x.data + rows.begin * q.x.row_stride, q.x.row_stride, rows.size(), q.weight, cols.begin,
                  cols.size(), yc, out, 0.0f, p.gemm);
        if (uc)
            gemm_x_wt(d.x.data + rows.begin * d.x.row_stride, d.x.row_stride, rows.size(), q.weight, cols.begin,
                      cols.size(), uc, out, 0.0f, p.gemm);
        active_kernels().dora_rows(yc, out, uc, out, q.bias ? q.bias + cols.begin : nullptr, factor + cols.begin,
                                   h.get() + rows.begin * rank, rank, bt.get() + cols.begin, out, rank, rows.size(),
                                   cols.size(), 1.0f);
    };
    parallel_tiles(q.threads, m, out, tile);
}

namespace {

// dx[rows, cols) = (f dy[rows]) W[:, cols) for per-feature factors f (out,), dy's columns kc at a time: each
// chunk scaled into buf (rows x kc), then multiplied with W's rows of that chunk. With g, also g[g_rows] =
// (chunk of those rows) B[chunk] summed over the chunks: (c dy) B for f = c, with no scaled copy of B.
void scaled_dy_w(const DoraProblem& p, const float* f, const float* dy, int64_t ld_dy, Range rows, Range cols,
                 int64_t kc, float* buf, float* dx, float* g, Range g_rows) {
    const Matrix& w = p.lora.weight;
    const int64_t out = w.rows, in = w.cols, rank = p.lora.rank;
    for (int64_t k0 = 0; k0 < out; k0 += kc) {
        const int64_t n = std::min(kc, out - k0);
        for (int64_t i = 0; i < rows.size(); ++i) {
            const float* d = dy + (rows.begin + i) * ld_dy + k0;
            float* scaled = buf + i * n;
            for (int64_t k = 0; k < n; ++k) scaled[k] = f[k0 + k] * d[k];
        }
        const Matrix chunk{w.data + k0 * w.row_stride, n, in, w.row_stride, w.col_stride};
        gemm_dy_w(buf, n, rows.size(), chunk, cols.begin, cols.size(), dx + rows.begin * in + cols.begin, in,
                  k0 == 0 ? 0.0f : 1.0f, p.gemm);
        if (g && g_rows.size() > 0)
            openblas_gemm(false, false, to_int(g_rows.size()), to_int(rank), to_int(n), 1.0f,
                          buf + (g_rows.begin - rows.begin) * n, ld(n), p.lora.lora_B + k0 * rank, ld(rank),
                          k0 == 0 ? 0.0f : 1.0f, g + g_rows.begin * rank, ld(rank));
    }
}

}  // namespace

void dora_backward(const DoraProblem& p, const float* factor, const float* norm, const float* dy, int64_t ld_dy,
                   const float* y, const float* u, float* dx, float* dA, float* dB, float* dm) {
    const LoraProblem& q = p.lora;
    const int64_t m = q.x.rows, out = q.weight.rows, in = q.x.cols, rank = q.rank;
    const bool dropout = q.dropout_p > 0.0f;
    const std::vector<uint32_t> col_keys = column_keys(q);
    // dx's product first: (c dy) W, or with dropout ((c - 1) / (1 - p) dy) W (masked with the rank-R term below,
    // then + dy W). Without dropout its chunks of c dy also give g = (c dy) B for dA and dx's rank-R term.
    Buffer g;
    if (dx && m > 0) {
        std::vector<float> f(factor, factor + out);
        if (dropout)
            for (float& v : f) v = static_cast<float>((double{v} - 1.0) / (1.0 - double{q.dropout_p}));
        else
            g = buffer(m * rank);
        const bool by_rows = split_rows(q.threads, m, in);
        const int n = by_rows ? share(q.threads, m, kRowsPerThread) : share(q.threads, in, kColsPerThread);
        parallel_run(n, [&](int t) {
            const Range rows = by_rows ? part(m, n, t, 1) : Range{0, m};
            const Range cols = by_rows ? Range{0, in} : part(in, n, t, kColAlign);
            const int64_t kc = std::clamp<int64_t>(kScaledFloats / std::max<int64_t>(rows.size(), 1) / 16 * 16, 16,
                                                   out);
            const Buffer buf = buffer(rows.size() * kc);
            scaled_dy_w(p, f.data(), dy, ld_dy, rows, cols, kc, buf.get(), dx, g.get(), by_rows ? rows : part(m, n, t, 1));
        });
    }
    // The thin pass: LoRA's with c B for B (g = dy (c B) unless made above), dB without its factor (applied
    // below), the rank-R term added onto dx's product and masked with it, dm's column dots.
    LoraProblem thin = q;
    std::vector<float> scaled_B;
    if ((dA || dx) && !g) {
        scaled_B.resize(static_cast<size_t>(out * rank));
        for (int64_t i = 0; i < out; ++i)
            for (int64_t r = 0; r < rank; ++r) scaled_B[i * rank + r] = factor[i] * q.lora_B[i * rank + r];
        thin.lora_B = scaled_B.data();
    }
    const DoraThin dora{dm ? (u ? u : y) : nullptr, u ? nullptr : q.bias, g.get(), true};
    std::vector<float> sums(static_cast<size_t>(dm ? out : 0), 0.0f);
    backward_thin_all(thin, col_keys.data(), dy, ld_dy, dx, dA, dB, &dora, sums.data());
    if (dB)
        for (int64_t i = 0; i < out; ++i)
            for (int64_t r = 0; r < rank; ++r) dB[i * rank + r] *= factor[i];
    if (dm)  // dm_i = sum dy_i u_i / n_i, or with y: sum dy_i (y_i - b_i) / m_i
        for (int64_t i = 0; i < out; ++i) {
            int64_t k;
            if (magnitude_index(p, i, &k)) dm[k] = sums[static_cast<size_t>(i)] / (u ? norm[i] : p.magnitude[k]);
        }
    if (!dx || !dropout || m == 0) return;
    parallel_tiles(q.threads, m, in, [&](Range rows, Range cols) {  // + dy W, the undropped base path's
        gemm_dy_w(dy + rows.begin * ld_dy, ld_dy, rows.size(), q.weight, cols.begin, cols.size(),
                  dx + rows.begin * in + cols.begin, in, 1.0f, p.gemm);
    });
}

}  // namespace fastlora
