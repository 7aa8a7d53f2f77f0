// pybind11 bindings of fastlora._C: every argument is checked here, so a malformed call raises
// a Python exception instead of reaching the kernels.
//
// The module is built against the installed torch (torch.utils.cpp_extension) and reads each
// torch.Tensor argument natively (THPVariable_Unpack: its dtype, device, sizes, strides, storage and
// data pointer in a few nanoseconds), and makes its outputs with at::empty. It never takes numpy
// views of the tensors (Tensor.numpy() marks a storage non-resizable for good, and FSDP frees the
// parameters it gathered by resizing their storage to zero). The caller's references keep the
// tensors alive.
//
// One op call is one call here, which does all of its per-call work: the checks (formatting a
// message only on failure), a contiguous copy of an argument whose layout the kernels do not take,
// the outputs, the dropout threshold, and whether the extension computes the base product; the
// Python side adds PyTorch's GEMM only when it does not.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <cblas.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

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

// str(t.<name>) as Python spells it, for a message (say "torch.float64" for a dtype, "torch.Size([6])" for a shape).
std::string attribute_string(const at::Tensor& t, const char* name) {
    const py::object obj = py::reinterpret_steal<py::object>(THPVariable_Wrap(t));
    return py::str(obj.attr(name));
}

// A CPU tensor of one or two dims: its data pointer, shape and element strides.
struct Tensor {
    const void* data;
    int ndim;
    int64_t shape[2];
    int64_t strides[2];

    int64_t numel() const { return ndim == 1 ? shape[0] : shape[0] * shape[1]; }
};

std::string shape_of(const Tensor& t) {
    std::string s = "(";
    for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
    return s + (t.ndim == 1 ? ",)" : ")");
}

// The at::Tensor of the torch.Tensor obj (a TypeError for anything else).
const at::Tensor& unpack(py::handle obj, const char* name) {
    if (!THPVariable_Check(obj.ptr()))
        throw py::type_error(std::string(name) + " must be a torch.Tensor, got " + Py_TYPE(obj.ptr())->tp_name);
    return THPVariable_Unpack(obj.ptr());
}

// The torch.Tensor obj as a Tensor of ndim dims, checked: float32 (int64 if integer), dense, on the
// CPU, not a negated view, sizes and strides in 32-bit BLAS range, every element it addresses inside
// its storage (FSDP frees a gathered parameter by resizing its storage to zero), a non-null aligned
// data pointer.
Tensor tensor(const at::Tensor& t, const char* name, int ndim, bool integer = false) {
    CHECK_ARG(t.scalar_type() == (integer ? at::kLong : at::kFloat),
              std::string(name) + (integer ? " must be int64, got " : " must be float32, got ") +
                  attribute_string(t, "dtype"));
    CHECK_ARG(t.is_cpu(), std::string(name) + " must be on the CPU, got " + attribute_string(t, "device"));
    CHECK_ARG(t.layout() == at::kStrided, std::string(name) + " must be a dense (strided) tensor, got layout " +
                                              attribute_string(t, "layout"));
    CHECK_ARG(!t.is_neg(), std::string(name) + " is a negated view (negative bit set): pass t.resolve_neg()");
    CHECK_ARG(t.dim() == ndim, std::string(name) + " must have " + std::to_string(ndim) + " dims, got shape " +
                                   attribute_string(t, "shape"));
    Tensor view{nullptr, ndim, {0, 0}, {0, 0}};
    int64_t last = 0;  // the offset of the last element, in elements from the first
    for (int d = 0; d < ndim; ++d) {
        view.shape[d] = t.size(d);
        view.strides[d] = t.stride(d);
        CHECK_ARG(view.shape[d] < INT_MAX, std::string(name) + " is too large for 32-bit BLAS: " + shape_of(view));
        CHECK_ARG(view.strides[d] >= 0, std::string(name) + " has unsupported (negative) strides");
        if (view.shape[d] > 0) last += (view.shape[d] - 1) * view.strides[d];
    }
    if (view.numel() == 0) return view;
    CHECK_ARG(t.has_storage(), std::string(name) +
                                   " has no storage: a wrapper tensor subclass, or a torch.func transform (vmap, "
                                   "jvp, grad), which fastlora's op does not support (its gradients come from "
                                   "torch.autograd)");
    const size_t element = integer ? sizeof(int64_t) : sizeof(float);
    const size_t needed = static_cast<size_t>(t.storage_offset() + last + 1) * element;
    CHECK_ARG(t.storage().nbytes() >= needed,
              std::string(name) + " addresses " + std::to_string(needed) + " bytes of a storage of " +
                  std::to_string(t.storage().nbytes()) + " (freed or resized?)");
    view.data = t.const_data_ptr();
    CHECK_ARG(view.data != nullptr, std::string(name) + " has a null data pointer");
    CHECK_ARG(reinterpret_cast<uintptr_t>(view.data) % element == 0,
              std::string(name) + "'s data pointer is not aligned to its elements");
    return view;
}

Tensor tensor(py::handle obj, const char* name, int ndim, bool integer = false) {
    return tensor(unpack(obj, name), name, ndim, integer);
}

// A 2-D tensor as a Matrix: row-major (unit column stride) or, if column_major_ok, column-major;
// the stride of a size-1 dim (or of an empty tensor) does not matter. Any other layout is an error
// without copy, else the tensor's contiguous copy is taken, held in *copy: the caller keeps it
// alive while it uses the Matrix.
Matrix matrix(const at::Tensor& t, const char* name, bool column_major_ok, at::Tensor* copy = nullptr) {
    const Tensor a = tensor(t, name, 2);
    const int64_t rows = a.shape[0], cols = a.shape[1];
    int64_t rs = a.strides[0], cs = a.strides[1];
    if (rows <= 1 || cols == 0) rs = std::max<int64_t>(cols, 1);  // an empty or one-row tensor: any strides
    if (cols <= 1 || rows == 0) cs = 1;
    const bool row_major = cs == 1 && rs >= cols;
    if (!row_major && cols <= 1 && rows > 1) cs = std::max<int64_t>(rows, 1);  // one column: also column-major
    const bool col_major = rs == 1 && cs >= rows;
    const bool ok = (row_major || (column_major_ok && col_major)) && rs < INT_MAX && cs < INT_MAX;
    if (!ok && copy != nullptr && !copy->defined()) {
        *copy = t.contiguous();
        return matrix(*copy, name, column_major_ok, copy);
    }
    CHECK_ARG(row_major || (column_major_ok && col_major),
          std::string(name) + " must be " + (column_major_ok ? "row- or column-major" : "row-major with unit column stride") +
              ", got shape " + shape_of(a) + " with element strides (" + std::to_string(rs) + ", " +
              std::to_string(cs) + ")");
    CHECK_ARG(rs < INT_MAX && cs < INT_MAX, std::string(name) + " has strides too large for 32-bit BLAS");
    const float* data = static_cast<const float*>(a.data);
    if (row_major) return {data, rows, cols, rs, 1};
    return {data, rows, cols, 1, cs};
}

Matrix matrix(py::handle obj, const char* name, bool column_major_ok, at::Tensor* copy = nullptr) {
    return matrix(unpack(obj, name), name, column_major_ok, copy);
}
bool c_contiguous(const Tensor& t) {
    if (t.numel() == 0) return true;
    int64_t expected = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
        if (t.shape[d] != 1 && t.strides[d] != expected) return false;
        expected *= t.shape[d];
    }
    return true;
}

// "(2, 3)" or "(7,)": a shape for a message.
std::string shape_string(std::initializer_list<int64_t> shape) {
    std::string s = "(";
    for (int64_t d : shape) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
    return s + (shape.size() == 1 ? ",)" : ")");
}

// The data of the tensor t (read as a), which must have exactly this shape; C-contiguous, or else
// its contiguous copy is taken into *copy (the caller keeps it alive), or without copy it is an error.
const float* contiguous(const at::Tensor& t, const Tensor& a, const char* name, std::initializer_list<int64_t> shape,
                        at::Tensor* copy) {
    CHECK_ARG(std::equal(shape.begin(), shape.end(), a.shape),
              std::string(name) + " must have shape " + shape_string(shape) + ", got " + shape_of(a));
    if (!c_contiguous(a) && copy != nullptr && !copy->defined()) {
        *copy = t.contiguous();
        return contiguous(*copy, tensor(*copy, name, a.ndim), name, shape, copy);
    }
    CHECK_ARG(c_contiguous(a), std::string(name) + " must be C-contiguous");
    return static_cast<const float*>(a.data);
}

const float* contiguous(py::handle obj, const char* name, std::initializer_list<int64_t> shape,
                        at::Tensor* copy = nullptr) {
    const at::Tensor& t = unpack(obj, name);
    return contiguous(t, tensor(t, name, static_cast<int>(shape.size())), name, shape, copy);
}

// A new float32 (rows, cols) CPU tensor, made here for an output, and its data. The device is explicit:
// neither a default device nor a `with torch.device(...)` block moves it off the CPU.
py::object new_tensor(int64_t rows, int64_t cols, float** data) {
    at::Tensor t = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
    *data = t.mutable_data_ptr<float>();
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t)));
}

// reference.dropout_threshold: an element is kept iff its signed hash >= int(p * 2**32) - 2**31.
int32_t dropout_threshold(double dropout_p) {
    return static_cast<int32_t>(static_cast<int64_t>(dropout_p * 4294967296.0) - (int64_t{1} << 31));
}

// Whether the extension computes the base product: when the caller asks (its OpenBLAS GEMM), and
// always where its streaming kernel beats any GEMM (a few rows, a row-major weight).
bool base_in_extension(bool asked, const Matrix& x, const Matrix& weight) {
    return asked || (x.rows <= fastlora::kStreamedRows && weight.col_stride == 1);
}

// The copies a call makes of arguments in layouts the kernels do not take, alive until it returns.
struct Copies {
    at::Tensor x, weight, bias, lora_A, lora_B, grad_out, magnitude, norm, output, dropped;
};

fastlora::LoraProblem problem(py::handle x, py::handle weight, py::handle bias, py::handle lora_A,
                              py::handle lora_B, double scale, double dropout_p, int64_t seed, int threads,
                              bool base_product, Copies& copies) {
    const Matrix xm = matrix(x, "x", false, &copies.x);
    const Matrix wm = matrix(weight, "weight", true, &copies.weight);
    const int64_t in = xm.cols, out = wm.rows;
    CHECK_ARG(wm.cols == in, "weight must be (out, " + std::to_string(in) + ") to match x (" +
                             std::to_string(xm.rows) + ", " + std::to_string(in) + "), got (" +
                             std::to_string(wm.rows) + ", " + std::to_string(wm.cols) + ")");
    const at::Tensor& a_tensor = unpack(lora_A, "lora_A");
    const Tensor a_view = tensor(a_tensor, "lora_A", 2);
    const int64_t rank = a_view.shape[0];
    CHECK_ARG(rank >= 1, "lora_A must have at least one row (rank >= 1)");
    const float* a = contiguous(a_tensor, a_view, "lora_A", {rank, in}, &copies.lora_A);
    const float* b = contiguous(lora_B, "lora_B", {out, rank}, &copies.lora_B);
    const float* bias_data = bias.is_none() ? nullptr : contiguous(bias, "bias", {out}, &copies.bias);
    CHECK_ARG(std::isfinite(scale), "scale must be finite");
    CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got " + std::to_string(dropout_p));
    CHECK_ARG(threads >= 1, "threads must be >= 1");
    return {xm,
            wm,
            bias_data,
            a,
            b,
            rank,
            static_cast<float>(scale),
            static_cast<float>(dropout_p),
            dropout_threshold(dropout_p),
            static_cast<uint64_t>(seed),
            std::min(threads, 256),
            base_in_extension(base_product, xm, wm)};
}

py::tuple forward(py::handle x, py::handle weight, py::handle bias, py::handle lora_A, py::handle lora_B,
                  double scale, double dropout_p, int64_t seed, int threads, bool base_product) {
    Copies copies;
    const fastlora::LoraProblem p = problem(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, threads,
                                            base_product, copies);
    float* y;
    py::object out = new_tensor(p.x.rows, p.weight.rows, &y);
    {
        py::gil_scoped_release release;
        fastlora::lora_forward(p, y);
    }
    return py::make_tuple(out, py::bool_(p.base_product));
}

py::tuple backward(py::handle grad_out, py::handle x, py::handle weight, py::handle lora_A, py::handle lora_B,
                   double scale, double dropout_p, int64_t seed, bool need_dx, bool need_dA, bool need_dB,
                   int threads, bool base_product) {
    Copies copies;
    fastlora::LoraProblem p = problem(x, weight, py::none(), lora_A, lora_B, scale, dropout_p, seed, threads,
                                      base_product, copies);
    p.base_product = base_product;
    const Matrix dy = matrix(grad_out, "grad_out", false, &copies.grad_out);
    CHECK_ARG(dy.rows == p.x.rows && dy.cols == p.weight.rows,
          "grad_out must be (" + std::to_string(p.x.rows) + ", " + std::to_string(p.weight.rows) + "), got (" +
              std::to_string(dy.rows) + ", " + std::to_string(dy.cols) + ")");
    float *dx_data = nullptr, *dA_data = nullptr, *dB_data = nullptr;
    py::object dx = need_dx ? new_tensor(p.x.rows, p.x.cols, &dx_data) : py::none();
    py::object dA = need_dA ? new_tensor(p.rank, p.x.cols, &dA_data) : py::none();
    py::object dB = need_dB ? new_tensor(p.weight.rows, p.rank, &dB_data) : py::none();
    {
        py::gil_scoped_release release;
        fastlora::lora_backward(p, dy.data, dy.row_stride, dx_data, dA_data, dB_data);
    }
    return py::make_tuple(dx, dA, dB);
}

// The items of obj, a list or tuple, as a tuple (a list is copied, so that the tensors outlive the
// call whatever happens to the list); n >= 0 requires that many items, one per adapter.
py::tuple items(py::handle obj, const char* name, Py_ssize_t n) {
    if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr()))
        throw py::type_error(std::string(name) + " must be a list or tuple, got " + Py_TYPE(obj.ptr())->tp_name);
    PyObject* tuple = PySequence_Tuple(obj.ptr());
    if (tuple == nullptr) throw py::error_already_set();
    py::tuple t = py::reinterpret_steal<py::tuple>(tuple);
    CHECK_ARG(n < 0 || PyTuple_GET_SIZE(tuple) == n, std::string(name) + " must have one item per adapter (" +
                                                         std::to_string(n) + ", as lora_As), got " +
                                                         std::to_string(PyTuple_GET_SIZE(tuple)));
    return t;
}

// name[i] ("lora_As[3]"), made once and kept in names: the checks take the name of every tensor
// they check, and a deque does not move its strings as it grows (the GIL guards it).
const char* item_name(std::deque<std::string>& names, const char* name, Py_ssize_t i) {
    while (static_cast<Py_ssize_t>(names.size()) <= i)
        names.push_back(std::string(name) + "[" + std::to_string(names.size()) + "]");
    return names[static_cast<size_t>(i)].c_str();
}

double number(py::handle obj, const char* name, Py_ssize_t i) {
    const double value = PyFloat_AsDouble(obj.ptr());
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw py::type_error(std::string(name) + "[" + std::to_string(i) + "] must be a number, got " +
                             Py_TYPE(obj.ptr())->tp_name);
    }
    return value;
}

std::string shape_of(const Matrix& m) { return "(" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + ")"; }

// A mixed batch's arguments, checked, and the tuples that hold its adapters' tensors.
struct MixedArgs {
    fastlora::MixedProblem problem;
    py::tuple As, Bs;
    Copies copies;
};

MixedArgs mixed_args(py::handle x, py::handle weight, py::handle bias, py::handle lora_As, py::handle lora_Bs,
                     py::handle scales, py::handle dropout_ps, py::handle adapter_ids, int64_t seed, int threads,
                     bool base_product) {
    MixedArgs args;
    fastlora::MixedProblem& p = args.problem;
    p.x = matrix(x, "x", false, &args.copies.x);
    p.weight = matrix(weight, "weight", true, &args.copies.weight);
    const int64_t m = p.x.rows, in = p.x.cols, out = p.weight.rows;
    CHECK_ARG(p.weight.cols == in, "weight must be (out, " + std::to_string(in) + ") to match x " + shape_of(p.x) +
                                       ", got " + shape_of(p.weight));
    p.bias = bias.is_none() ? nullptr : contiguous(bias, "bias", {out}, &args.copies.bias);
    args.As = items(lora_As, "lora_As", -1);
    const Py_ssize_t n = PyTuple_GET_SIZE(args.As.ptr());
    args.Bs = items(lora_Bs, "lora_Bs", n);
    const py::tuple scale_items = items(scales, "scales", n), p_items = items(dropout_ps, "dropout_ps", n);
    static std::deque<std::string> a_names, b_names;
    p.adapters.reserve(static_cast<size_t>(n));
    for (Py_ssize_t a = 0; a < n; ++a) {
        const char* a_name = item_name(a_names, "lora_As", a);
        const char* b_name = item_name(b_names, "lora_Bs", a);
        const Matrix A = matrix(PyTuple_GET_ITEM(args.As.ptr(), a), a_name, true);
        CHECK_ARG(A.cols == in && A.rows >= 1, std::string(a_name) + " must be (rank, " + std::to_string(in) +
                                                   ") with rank >= 1 to match x " + shape_of(p.x) + ", got " +
                                                   shape_of(A));
        const Matrix B = matrix(PyTuple_GET_ITEM(args.Bs.ptr(), a), b_name, true);
        CHECK_ARG(B.rows == out && B.cols == A.rows,
                  std::string(b_name) + " must be (" + std::to_string(out) + ", " + std::to_string(A.rows) +
                      ") to match weight " + shape_of(p.weight) + " and " + a_name + " " + shape_of(A) + ", got " +
                      shape_of(B));
        const double scale = number(PyTuple_GET_ITEM(scale_items.ptr(), a), "scales", a);
        const double dropout_p = number(PyTuple_GET_ITEM(p_items.ptr(), a), "dropout_ps", a);
        CHECK_ARG(std::isfinite(scale), "scales[" + std::to_string(a) + "] must be finite");
        CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0,
                  "dropout_ps[" + std::to_string(a) + "] must be in [0, 1), got " + std::to_string(dropout_p));
        // As the single-adapter op: the scale in float, 1 / (1 - p) folded in through double, and
        // reference.dropout_threshold's int(p * 2**32) - 2**31.
        const float scale_f = static_cast<float>(scale), p_f = static_cast<float>(dropout_p);
        const int64_t threshold = static_cast<int64_t>(dropout_p * 4294967296.0) - (int64_t{1} << 31);
        p.adapters.push_back({A, B, static_cast<float>(double{scale_f} / (1.0 - double{p_f})), p_f,
                              static_cast<int32_t>(threshold)});
    }
    const Tensor ids = tensor(adapter_ids, "adapter_ids", 1, true);
    CHECK_ARG(ids.shape[0] == m, "adapter_ids must have shape (" + std::to_string(m) + ",), one per row of x, got " +
                                     shape_of(ids));
    const int64_t* id = static_cast<const int64_t*>(ids.data);
    const int64_t stride = ids.strides[0];
    for (int64_t i = 0; i < m; ++i)
        CHECK_ARG(id[i * stride] >= -1 && id[i * stride] < n,
                  "adapter_ids[" + std::to_string(i) + "] = " + std::to_string(id[i * stride]) +
                      " is out of range [-1, " + std::to_string(n) + ") for " + std::to_string(n) +
                      " adapters (-1: no adapter)");
    CHECK_ARG(threads >= 1, "threads must be >= 1");
    p.seed = static_cast<uint64_t>(seed);
    p.threads = std::min(threads, 256);
    p.base_product = base_in_extension(base_product, p.x, p.weight);
    fastlora::group_rows(p, id, stride);
    return args;
}

// DoRA. The base products run through the GEMM the caller names: OpenBLAS, or PyTorch's own (torch_gemm), which
// the kernels call on views of their buffers from inside the extension's threads, where it runs single-threaded
// as OpenBLAS does there (the caller cannot add a product that the factor scales after it).

// PyTorch's sgemm (MKL where torch has it) with cblas_sgemm's row-major arguments.
void torch_gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                int ldb, float beta, float* c, int ldc) {
    const at::AutoDispatchBelowADInplaceOrView no_autograd;
    const auto options = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
    auto view = [&](const float* data, int rows, int cols, int ld_, bool trans) {  // op(t) as a (rows, cols) view
        return at::from_blob(const_cast<float*>(data), {rows, cols},
                             trans ? at::IntArrayRef{1, ld_} : at::IntArrayRef{ld_, 1}, options);
    };
    at::Tensor out = view(c, m, n, ldc, false);
    at::addmm_out(out, out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

// A new float32 (n,) CPU tensor and its data.
py::object new_vector(int64_t n, float** data) {
    at::Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
    *data = t.mutable_data_ptr<float>();
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t)));
}

// Each output group's index among the enabled ones, or -1; one enabled group for slices None.
std::vector<int64_t> slots_of(py::handle slices, int64_t out) {
    if (slices.is_none()) return {0};
    const py::tuple groups = items(slices, "slices", -1);
    std::vector<int64_t> slots;
    int64_t enabled = 0;
    for (py::handle g : groups) {
        const int on = PyObject_IsTrue(g.ptr());
        if (on < 0) throw py::error_already_set();
        slots.push_back(on ? enabled++ : -1);
    }
    const int64_t n = static_cast<int64_t>(slots.size());
    CHECK_ARG(n >= 1 && enabled >= 1, "slices must enable at least one group");
    CHECK_ARG(out % n == 0, "slices: " + std::to_string(n) + " groups do not divide the " + std::to_string(out) +
                                " output features");
    return slots;
}

// The magnitude's length: the features of the enabled groups.
int64_t enabled_features(const std::vector<int64_t>& slots, int64_t out) {
    const int64_t groups = static_cast<int64_t>(slots.size());
    return out / groups * (groups - std::count(slots.begin(), slots.end(), int64_t{-1}));
}

fastlora::DoraProblem dora_problem(py::handle x, py::handle weight, py::handle bias, py::handle lora_A,
                                   py::handle lora_B, py::handle magnitude, py::handle slices, double scale,
                                   double dropout_p, int64_t seed, int threads, bool use_torch_gemm, Copies& copies) {
    fastlora::DoraProblem p;
    p.lora = problem(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, threads, true, copies);
    const int64_t out = p.lora.weight.rows;
    p.slots = slots_of(slices, out);
    p.magnitude = contiguous(magnitude, "magnitude", {enabled_features(p.slots, out)}, &copies.magnitude);
    p.gemm = use_torch_gemm ? torch_gemm : fastlora::openblas_gemm;
    return p;
}

// An (M, out) tensor that the forward made, or null for None.
const float* saved_rows(py::handle obj, const char* name, int64_t m, int64_t out, at::Tensor* copy) {
    return obj.is_none() ? nullptr : contiguous(obj, name, {m, out}, copy);
}

py::tuple dora_forward(py::handle x, py::handle weight, py::handle bias, py::handle lora_A, py::handle lora_B,
                       py::handle magnitude, py::handle slices, double scale, double dropout_p, int64_t seed,
                       int threads, bool use_torch_gemm, bool want_dropped) {
    Copies copies;
    const fastlora::DoraProblem p = dora_problem(x, weight, bias, lora_A, lora_B, magnitude, slices, scale, dropout_p,
                                                 seed, threads, use_torch_gemm, copies);
    const int64_t m = p.lora.x.rows, out = p.lora.weight.rows;
    float *y, *norm, *u = nullptr;
    py::object y_obj = new_tensor(m, out, &y), norm_obj = new_vector(out, &norm), u_obj = py::none();
    std::vector<float> factor(static_cast<size_t>(out));
    bool fine;
    {
        py::gil_scoped_release release;
        fastlora::dora_norm(p, norm);
        fine = fastlora::dora_factors(p, norm, factor.data());
    }
    // u: the dropped path's own output, or (without dropout) when y cannot give it back (a factor 0 or not finite).
    if (p.lora.dropout_p > 0.0f || (want_dropped && !fine)) u_obj = new_tensor(m, out, &u);
    {
        py::gil_scoped_release release;
        fastlora::dora_forward(p, factor.data(), y, u);
    }
    return py::make_tuple(y_obj, norm_obj, want_dropped ? u_obj : py::none());
}

py::tuple dora_backward(py::handle grad_out, py::handle x, py::handle weight, py::handle lora_A, py::handle lora_B,
                        py::handle magnitude, py::handle slices, py::handle norm, py::handle output, py::handle bias,
                        py::handle dropped, double scale, double dropout_p, int64_t seed, bool need_dx, bool need_dA,
                        bool need_dB, bool need_dm, int threads, bool use_torch_gemm) {
    Copies copies;
    const fastlora::DoraProblem p = dora_problem(x, weight, bias, lora_A, lora_B, magnitude, slices, scale, dropout_p,
                                                 seed, threads, use_torch_gemm, copies);
    const int64_t m = p.lora.x.rows, in = p.lora.x.cols, out = p.lora.weight.rows, rank = p.lora.rank;
    const Matrix dy = matrix(grad_out, "grad_out", false, &copies.grad_out);
    CHECK_ARG(dy.rows == m && dy.cols == out, "grad_out must be (" + std::to_string(m) + ", " + std::to_string(out) +
                                                  "), got " + shape_of(dy));
    const float* norm_data = contiguous(norm, "norm", {out}, &copies.norm);
    const float* y = saved_rows(output, "output", m, out, &copies.output);
    const float* u = saved_rows(dropped, "dropped", m, out, &copies.dropped);
    CHECK_ARG(!need_dm || y || u, "dm needs the forward's output or dropped (both are None)");
    CHECK_ARG(!need_dm || u || p.lora.dropout_p == 0.0f, "dm with dropout needs the forward's dropped");
    std::vector<float> factor(static_cast<size_t>(out));
    float *dx_data = nullptr, *dA_data = nullptr, *dB_data = nullptr, *dm_data = nullptr;
    py::object dx = need_dx ? new_tensor(m, in, &dx_data) : py::none();
    py::object dA = need_dA ? new_tensor(rank, in, &dA_data) : py::none();
    py::object dB = need_dB ? new_tensor(out, rank, &dB_data) : py::none();
    py::object dm = need_dm ? new_vector(enabled_features(p.slots, out), &dm_data) : py::none();
    {
        py::gil_scoped_release release;
        fastlora::dora_factors(p, norm_data, factor.data());
        fastlora::dora_backward(p, factor.data(), norm_data, dy.data, dy.row_stride, y, u, dx_data, dA_data, dB_data,
                                dm_data);
    }
    return py::make_tuple(dx, dA, dB, dm);
}

py::tuple forward_mixed(py::handle x, py::handle weight, py::handle bias, py::handle lora_As, py::handle lora_Bs,
                        py::handle scales, py::handle dropout_ps, py::handle adapter_ids, int64_t seed, int threads,
                        bool base_product) {
    const MixedArgs args = mixed_args(x, weight, bias, lora_As, lora_Bs, scales, dropout_ps, adapter_ids, seed,
                                      threads, base_product);
    float* y;
    py::object out = new_tensor(args.problem.x.rows, args.problem.weight.rows, &y);
    {
        py::gil_scoped_release release;
        fastlora::lora_forward_mixed(args.problem, y);
    }
    return py::make_tuple(out, py::bool_(args.problem.base_product));
}

py::tuple backward_mixed(py::handle grad_out, py::handle x, py::handle weight, py::handle lora_As, py::handle lora_Bs,
                         py::handle scales, py::handle dropout_ps, py::handle adapter_ids, int64_t seed, bool need_dx,
                         py::handle need_lora, int threads, bool base_product) {
    MixedArgs args = mixed_args(x, weight, py::none(), lora_As, lora_Bs, scales, dropout_ps, adapter_ids, seed,
                                threads, base_product);
    fastlora::MixedProblem& p = args.problem;
    p.base_product = base_product;
    const int64_t m = p.x.rows, in = p.x.cols, out = p.weight.rows;
    const Matrix dy = matrix(grad_out, "grad_out", false, &args.copies.grad_out);
    CHECK_ARG(dy.rows == m && dy.cols == out, "grad_out must be (" + std::to_string(m) + ", " + std::to_string(out) +
                                                  "), got " + shape_of(dy));
    const Py_ssize_t n = static_cast<Py_ssize_t>(p.adapters.size());
    const py::tuple needs = items(need_lora, "need_lora", n);
    float* dx_data = nullptr;
    py::object dx = need_dx ? new_tensor(m, in, &dx_data) : py::none();
    py::list dAs, dBs;
    std::vector<float*> dA(static_cast<size_t>(n), nullptr), dB(static_cast<size_t>(n), nullptr);
    for (Py_ssize_t a = 0; a < n; ++a) {
        const int need = PyObject_IsTrue(PyTuple_GET_ITEM(needs.ptr(), a));
        if (need < 0) throw py::error_already_set();
        if (!need || p.starts[a + 2] == p.starts[a + 1]) {  // not wanted, or no row names the adapter
            dAs.append(py::none());
            dBs.append(py::none());
            continue;
        }
        const int64_t rank = p.adapters[static_cast<size_t>(a)].A.rows;
        dAs.append(new_tensor(rank, in, &dA[static_cast<size_t>(a)]));
        dBs.append(new_tensor(out, rank, &dB[static_cast<size_t>(a)]));
    }
    {
        py::gil_scoped_release release;
        fastlora::lora_backward_mixed(p, dy.data, dy.row_stride, dx_data, dA, dB);
    }
    return py::make_tuple(dx, dAs, dBs);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastlora's fused fp32 LoRA kernels for CPUs (OpenBLAS base product, fused rank-R update); "
              "the arrays are float32 CPU torch.Tensors";
    scipy_openblas_set_num_threads(1);  // parallelism comes from parallel_run, sized by the caller
    m.def("forward", &forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"),
          py::arg("lora_B"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("threads"),
          py::arg("base_product") = true,
          "Returns (out, base_done): out = x weight^T + bias + scale (dropout(x) lora_A^T) lora_B^T, without "
          "x weight^T when base_done is False (base_product False asks the caller to add it, which it need not "
          "where the extension's streaming kernel is faster). Arguments in other layouts are copied.");
    m.def("backward", &backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("lora_A"),
          py::arg("lora_B"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("need_dx"),
          py::arg("need_dA"), py::arg("need_dB"), py::arg("threads"), py::arg("base_product") = true,
          "Returns (dx, dA, dB) of the forward with the same arguments, each None unless needed; dx without "
          "grad_out weight if base_product is False.");
    m.def("dora_forward", &dora_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"),
          py::arg("lora_B"), py::arg("magnitude"), py::arg("slices"), py::arg("scale"), py::arg("dropout_p"),
          py::arg("seed"), py::arg("threads"), py::arg("torch_gemm"), py::arg("want_dropped"),
          "DoRA, returns (out, norm, dropped): out = x weight^T + bias + (c - 1) (x_d weight^T) + c scale (x_d "
          "lora_A^T) lora_B^T with x_d = dropout(x), c = magnitude / norm per output feature (1 for a disabled "
          "group's), norm = |weight_i + scale lora_B_i lora_A|; lora_B dense (out, rank), magnitude one per feature "
          "of the groups that slices (None: one group) enables. dropped (only if want_dropped, and then None when out "
          "gives it back) is x_d weight^T + scale (x_d lora_A^T) lora_B^T. torch_gemm: PyTorch's GEMM, else "
          "OpenBLAS.");
    m.def("dora_backward", &dora_backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("lora_A"),
          py::arg("lora_B"), py::arg("magnitude"), py::arg("slices"), py::arg("norm"), py::arg("output"),
          py::arg("bias"), py::arg("dropped"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"),
          py::arg("need_dx"), py::arg("need_dA"), py::arg("need_dB"), py::arg("need_dm"), py::arg("threads"),
          py::arg("torch_gemm"),
          "Returns (dx, dA, dB, dm) of dora_forward, each None unless needed: norm from dora_forward, and for dm "
          "its dropped, or its output with the bias it was called with.");
    m.def("forward_mixed", &forward_mixed, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_As"),
          py::arg("lora_Bs"), py::arg("scales"), py::arg("dropout_ps"), py::arg("adapter_ids"), py::arg("seed"),
          py::arg("threads"), py::arg("base_product") = true,
          "A mixed batch, returns (out, base_done): out[i] = x[i] weight^T + bias + scales[a] (dropout(x[i]) "
          "lora_As[a]^T) lora_Bs[a]^T with a = adapter_ids[i] (int64; -1: none), dropout_ps[a] per adapter; "
          "without x weight^T when base_done is False (as forward).");
    m.def("backward_mixed", &backward_mixed, py::arg("grad_out"), py::arg("x"), py::arg("weight"),
          py::arg("lora_As"), py::arg("lora_Bs"), py::arg("scales"), py::arg("dropout_ps"), py::arg("adapter_ids"),
          py::arg("seed"), py::arg("need_dx"), py::arg("need_lora"), py::arg("threads"),
          py::arg("base_product") = true,
          "Returns (dx, dAs, dBs) of forward_mixed with the same arguments: dx (None unless need_dx) and each "
          "adapter's gradients from its own rows, None where need_lora[a] is false or no row names it; dx without "
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
