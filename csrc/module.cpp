// pybind11 bindings of fastlora._C: every argument is checked here, so a malformed call raises
// a Python exception instead of reaching the kernels.
#include <cblas.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#include "lora.h"

namespace py = pybind11;
using fastlora::Matrix;

namespace {

[[noreturn]] void fail(const std::string& message) { throw py::value_error(message); }

// Builds the message only on failure: the checks run on every call.
#define CHECK_ARG(condition, message) \
    do {                              \
        if (!(condition)) fail(message); \
    } while (0)

std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A float32 array with the given dims; strides converted to elements and non-negative.
void check_array(const py::array& a, const char* name, py::ssize_t ndim) {
    CHECK_ARG(a.dtype().is(py::dtype::of<float>()), std::string(name) + " must be float32, got " +
                                                    std::string(py::str(a.dtype())));
    CHECK_ARG(a.ndim() == ndim, std::string(name) + " must have " + std::to_string(ndim) + " dims, got shape " +
                                shape_of(a));
    for (py::ssize_t d = 0; d < ndim; ++d) {
        CHECK_ARG(a.shape(d) < INT_MAX, std::string(name) + " is too large for 32-bit BLAS: " + shape_of(a));
        CHECK_ARG(a.strides(d) >= 0 && a.strides(d) % static_cast<py::ssize_t>(sizeof(float)) == 0,
              std::string(name) + " has unsupported strides");
    }
    CHECK_ARG(a.size() == 0 || a.data() != nullptr, std::string(name) + " has a null data pointer");
}

// A 2-D array as a Matrix, requiring it row-major (unit column stride) or, if column_major_ok,
// column-major; the stride of a size-1 dim (or of an empty array) does not matter.
Matrix matrix(const py::array& a, const char* name, bool column_major_ok) {
    check_array(a, name, 2);
    const int64_t rows = a.shape(0), cols = a.shape(1);
    int64_t rs = a.strides(0) / static_cast<int64_t>(sizeof(float));
    int64_t cs = a.strides(1) / static_cast<int64_t>(sizeof(float));
    if (rows <= 1 || cols == 0) rs = std::max<int64_t>(cols, 1);  // an empty or one-row array: any strides
    if (cols <= 1 || rows == 0) cs = 1;
    const bool row_major = cs == 1 && rs >= cols;
    if (!row_major && cols <= 1 && rows > 1) cs = std::max<int64_t>(rows, 1);  // one column: also column-major
    const bool col_major = rs == 1 && cs >= rows;
    CHECK_ARG(row_major || (column_major_ok && col_major),
          std::string(name) + " must be " + (column_major_ok ? "row- or column-major" : "row-major with unit column stride") +
              ", got shape " + shape_of(a) + " with element strides (" + std::to_string(rs) + ", " +
              std::to_string(cs) + ")");
    CHECK_ARG(rs < INT_MAX && cs < INT_MAX, std::string(name) + " has strides too large for 32-bit BLAS");
    if (row_major) return {static_cast<const float*>(a.data()), rows, cols, rs, 1};
    return {static_cast<const float*>(a.data()), rows, cols, 1, cs};
}

// A contiguous C-order float32 array of exactly this shape.
const float* contiguous(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
    check_array(a, name, static_cast<py::ssize_t>(shape.size()));
    std::string want = "(";
    bool same = true;
    py::ssize_t d = 0;
    for (int64_t s : shape) {
        want += (d ? ", " : "") + std::to_string(s);
        same = same && a.shape(d) == s;
        ++d;
    }
    want += shape.size() == 1 ? ",)" : ")";
    CHECK_ARG(same, std::string(name) + " must have shape " + want + ", got " + shape_of(a));
    CHECK_ARG(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
    return static_cast<const float*>(a.data());
}

float* writable(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
    const float* data = contiguous(a, name, shape);
    CHECK_ARG(a.writeable(), std::string(name) + " must be writable");
    return const_cast<float*>(data);
}

fastlora::LoraProblem problem(const py::array& x, const py::array& weight, const std::optional<py::array>& bias,
                              const py::array& lora_A, const py::array& lora_B, double scale, double dropout_p,
                              int64_t threshold, int64_t seed, int threads, bool base_product) {
    const Matrix xm = matrix(x, "x", false);
    const Matrix wm = matrix(weight, "weight", true);
    const int64_t in = xm.cols, out = wm.rows;
    CHECK_ARG(wm.cols == in, "weight must be (out, " + std::to_string(in) + ") to match x " + shape_of(x) + ", got " +
                             shape_of(weight));
    CHECK_ARG(lora_A.ndim() == 2, "lora_A must be 2-D (rank, in), got shape " + shape_of(lora_A));
    const int64_t rank = lora_A.shape(0);
    CHECK_ARG(rank >= 1, "lora_A must have at least one row (rank >= 1)");
    const float* a = contiguous(lora_A, "lora_A", {rank, in});
    const float* b = contiguous(lora_B, "lora_B", {out, rank});
    const float* bias_data = bias ? contiguous(*bias, "bias", {out}) : nullptr;
    CHECK_ARG(std::isfinite(scale), "scale must be finite");
    CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got " + std::to_string(dropout_p));
    CHECK_ARG(threshold >= INT32_MIN && threshold <= INT32_MAX, "threshold must be an int32");
    CHECK_ARG(threads >= 1, "threads must be >= 1");
    return {xm,
            wm,
            bias_data,
            a,
            b,
            rank,
            static_cast<float>(scale),
            static_cast<float>(dropout_p),
            static_cast<int32_t>(threshold),
            static_cast<uint64_t>(seed),
            std::min(threads, 256),
            base_product};
}

void forward(const py::array& out, const py::array& x, const py::array& weight, const std::optional<py::array>& bias,
             const py::array& lora_A, const py::array& lora_B, double scale, double dropout_p, int64_t threshold,
             int64_t seed, int threads, bool base_product) {
    const fastlora::LoraProblem p = problem(x, weight, bias, lora_A, lora_B, scale, dropout_p, threshold, seed, threads,
                                            base_product);
    float* y = writable(out, "out", {p.x.rows, p.weight.rows});
    py::gil_scoped_release release;
    fastlora::lora_forward(p, y);
}

void backward(const std::optional<py::array>& dx, const std::optional<py::array>& dA,
              const std::optional<py::array>& dB, const py::array& grad_out, const py::array& x,
              const py::array& weight, const py::array& lora_A, const py::array& lora_B, double scale,
              double dropout_p, int64_t threshold, int64_t seed, int threads, bool base_product) {
    const fastlora::LoraProblem p = problem(x, weight, std::nullopt, lora_A, lora_B, scale, dropout_p, threshold,
                                            seed, threads, base_product);
    const Matrix dy = matrix(grad_out, "grad_out", false);
    CHECK_ARG(dy.rows == p.x.rows && dy.cols == p.weight.rows,
          "grad_out must be (" + std::to_string(p.x.rows) + ", " + std::to_string(p.weight.rows) + "), got " +
              shape_of(grad_out));
    float* dx_data = dx ? writable(*dx, "dx", {p.x.rows, p.x.cols}) : nullptr;
    float* dA_data = dA ? writable(*dA, "dA", {p.rank, p.x.cols}) : nullptr;
    float* dB_data = dB ? writable(*dB, "dB", {p.weight.rows, p.rank}) : nullptr;
    py::gil_scoped_release release;
    fastlora::lora_backward(p, dy.data, dy.row_stride, dx_data, dA_data, dB_data);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastlora's fused fp32 LoRA kernels for CPUs (OpenBLAS base product, fused rank-R update)";
    scipy_openblas_set_num_threads(1);  // parallelism comes from parallel_run, sized by the caller
    m.def("forward", &forward, py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"),
          py::arg("lora_B"), py::arg("scale"), py::arg("dropout_p"), py::arg("threshold"), py::arg("seed"),
          py::arg("threads"), py::arg("base_product") = true,
          "out[:] = x weight^T + bias + scale (dropout(x) lora_A^T) lora_B^T, dropout keeping elements whose "
          "signed hash >= threshold; without x weight^T if base_product is False.");
    m.def("backward", &backward, py::arg("dx"), py::arg("dA"), py::arg("dB"), py::arg("grad_out"), py::arg("x"),
          py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scale"), py::arg("dropout_p"),
          py::arg("threshold"), py::arg("seed"), py::arg("threads"), py::arg("base_product") = true,
          "Writes dx, dA, dB (each skipped when None) of the forward with the same arguments; dx without "
          "grad_out weight if base_product is False.");
    m.def("supported_isas", &fastlora::supported_isas, "Instruction sets usable on this CPU, narrowest first.");
    m.def("isa", [] { return std::string(fastlora::active_kernels().name); }, "The instruction set in use.");
    m.def("set_isa", [](const std::string& name) {
        try {
            fastlora::set_isa(name);
        } catch (const std::invalid_argument& e) {
            throw py::value_error(e.what());
        }
    }, py::arg("name"), "Use this instruction set's kernels (one of supported_isas()).");
    m.def("cpu_vendor", &fastlora::cpu_vendor, "The CPU's vendor: intel, amd or other.");
    m.def("blas_core", [] { return std::string(scipy_openblas_get_corename()); }, "OpenBLAS's kernel family here.");
}
