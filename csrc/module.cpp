// pybind11 bindings of fastlora._C: every argument is checked here, so a malformed call raises
// a Python exception instead of reaching the kernels.
//
// Tensors arrive as torch.Tensor objects and are read through their Python attributes (dtype,
// device, shape, stride(), data_ptr(), ...): the module does not link libtorch. That costs less than
// the numpy views it once took (Tensor.numpy(), ~0.55 us a tensor) and leaves the tensors as they
// are, where .numpy() marks a storage non-resizable for good, and FSDP frees the parameters it
// gathered by resizing their storage to zero. The caller's references keep the tensors alive.
#include <cblas.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cmath>
#include <cstdint>
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

// What the checks compare against and the attributes they read, looked up once at import; the
// references are held for the life of the process.
struct TorchApi {
    PyTypeObject* tensor_type;
    PyObject* float32;
    PyObject *dtype, *device, *is_cpu, *is_neg, *shape, *stride, *data_ptr;  // interned attribute names
};
const TorchApi* torch_api = nullptr;

PyObject* interned(const char* name) {
    PyObject* s = PyUnicode_InternFromString(name);
    if (s == nullptr) throw py::error_already_set();
    return s;
}

void load_torch_api() {
    const py::module_ torch = py::module_::import("torch");
    py::object tensor = torch.attr("Tensor");
    CHECK_ARG(PyType_Check(tensor.ptr()), "torch.Tensor is not a type");
    torch_api = new TorchApi{reinterpret_cast<PyTypeObject*>(tensor.release().ptr()),
                             py::object(torch.attr("float32")).release().ptr(),
                             interned("dtype"), interned("device"), interned("is_cpu"), interned("is_neg"),
                             interned("shape"), interned("stride"), interned("data_ptr")};
}

// obj.<name>, or obj.<name>() when call is true; a failure (say a tensor without storage, or a
// sparse one without strides) becomes a ValueError that names the argument.
py::object attribute(py::handle obj, PyObject* name, bool call, const char* arg) {
    PyObject* value = call ? PyObject_CallMethodNoArgs(obj.ptr(), name) : PyObject_GetAttr(obj.ptr(), name);
    if (value == nullptr) {
        const py::error_already_set error;
        fail(std::string(arg) + ": " + error.what());
    }
    return py::reinterpret_steal<py::object>(value);
}

// A CPU float32 tensor of one or two dims: its data pointer, shape and element strides.
struct Tensor {
    const float* data;
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

// A tuple's items as int64 (a torch.Size or a stride tuple); false if obj is no such tuple.
bool int64_items(const py::object& obj, int64_t* items, Py_ssize_t n) {
    if (!PyTuple_Check(obj.ptr()) || PyTuple_GET_SIZE(obj.ptr()) != n) return false;
    for (Py_ssize_t i = 0; i < n; ++i) {
        items[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(obj.ptr(), i));
        if (items[i] == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return false;
        }
    }
    return true;
}

// The torch.Tensor obj as a Tensor of ndim dims, checked: float32, dense, on the CPU, not a
// negated view, sizes and strides in 32-bit BLAS range, a non-null aligned data pointer.
Tensor tensor(py::handle obj, const char* name, int ndim) {
    const TorchApi& api = *torch_api;
    if (!PyObject_TypeCheck(obj.ptr(), api.tensor_type))
        throw py::type_error(std::string(name) + " must be a torch.Tensor, got " + Py_TYPE(obj.ptr())->tp_name);
    const py::object dtype = attribute(obj, api.dtype, false, name);
    CHECK_ARG(dtype.ptr() == api.float32, std::string(name) + " must be float32, got " + std::string(py::str(dtype)));
    CHECK_ARG(attribute(obj, api.is_cpu, false, name).ptr() == Py_True,
              std::string(name) + " must be on the CPU, got " +
                  std::string(py::str(attribute(obj, api.device, false, name))));
    CHECK_ARG(attribute(obj, api.is_neg, true, name).ptr() == Py_False,
              std::string(name) + " is a negated view (negative bit set): pass t.resolve_neg()");
    const py::object shape = attribute(obj, api.shape, false, name);
    Tensor t{nullptr, ndim, {0, 0}, {0, 0}};
    if (!int64_items(shape, t.shape, ndim)) {
        const Py_ssize_t dims = PyTuple_Check(shape.ptr()) ? PyTuple_GET_SIZE(shape.ptr()) : -1;
        fail(std::string(name) + " must have " + std::to_string(ndim) + " dims, got shape " +
             std::string(py::str(shape)) + (dims == ndim ? " (not integers)" : ""));
    }
    CHECK_ARG(int64_items(attribute(obj, api.stride, true, name), t.strides, ndim),
              std::string(name) + " has no integer strides");
    for (int d = 0; d < ndim; ++d) {
        CHECK_ARG(t.shape[d] >= 0 && t.shape[d] < INT_MAX,
                  std::string(name) + " is too large for 32-bit BLAS: " + shape_of(t));
        CHECK_ARG(t.strides[d] >= 0, std::string(name) + " has unsupported (negative) strides");
    }
    const unsigned long long address = PyLong_AsUnsignedLongLong(attribute(obj, api.data_ptr, true, name).ptr());
    if (address == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        const py::error_already_set error;
        fail(std::string(name) + ": data_ptr() is not an address: " + error.what());
    }
    CHECK_ARG(t.numel() == 0 || address != 0, std::string(name) + " has a null data pointer");
    CHECK_ARG(address % alignof(float) == 0, std::string(name) + "'s data pointer is not float-aligned");
    t.data = reinterpret_cast<const float*>(static_cast<uintptr_t>(address));
    return t;
}

// A 2-D tensor as a Matrix, requiring it row-major (unit column stride) or, if column_major_ok,
// column-major; the stride of a size-1 dim (or of an empty tensor) does not matter.
Matrix matrix(py::handle obj, const char* name, bool column_major_ok) {
    const Tensor a = tensor(obj, name, 2);
    const int64_t rows = a.shape[0], cols = a.shape[1];
    int64_t rs = a.strides[0], cs = a.strides[1];
    if (rows <= 1 || cols == 0) rs = std::max<int64_t>(cols, 1);  // an empty or one-row tensor: any strides
    if (cols <= 1 || rows == 0) cs = 1;
    const bool row_major = cs == 1 && rs >= cols;
    if (!row_major && cols <= 1 && rows > 1) cs = std::max<int64_t>(rows, 1);  // one column: also column-major
    const bool col_major = rs == 1 && cs >= rows;
    CHECK_ARG(row_major || (column_major_ok && col_major),
          std::string(name) + " must be " + (column_major_ok ? "row- or column-major" : "row-major with unit column stride") +
              ", got shape " + shape_of(a) + " with element strides (" + std::to_string(rs) + ", " +
              std::to_string(cs) + ")");
    CHECK_ARG(rs < INT_MAX && cs < INT_MAX, std::string(name) + " has strides too large for 32-bit BLAS");
    if (row_major) return {a.data, rows, cols, rs, 1};
    return {a.data, rows, cols, 1, cs};
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

// The data of a, which must be C-contiguous and of exactly this shape.
const float* contiguous(const Tensor& a, const char* name, std::initializer_list<int64_t> shape) {
    std::string want = "(";
    bool same = true;
    int d = 0;
    for (int64_t s : shape) {
        want += (d ? ", " : "") + std::to_string(s);
        same = same && a.shape[d] == s;
        ++d;
    }
    want += shape.size() == 1 ? ",)" : ")";
    CHECK_ARG(same, std::string(name) + " must have shape " + want + ", got " + shape_of(a));
    CHECK_ARG(c_contiguous(a), std::string(name) + " must be C-contiguous");
    return a.data;
}

const float* contiguous(py::handle obj, const char* name, std::initializer_list<int64_t> shape) {
    return contiguous(tensor(obj, name, static_cast<int>(shape.size())), name, shape);
}

// An output: C-contiguous, so no two of its elements share memory (torch has no read-only flag).
float* output(py::handle obj, const char* name, std::initializer_list<int64_t> shape) {
    return const_cast<float*>(contiguous(obj, name, shape));
}

fastlora::LoraProblem problem(py::handle x, py::handle weight, py::handle bias, py::handle lora_A,
                              py::handle lora_B, double scale, double dropout_p, int64_t threshold, int64_t seed,
                              int threads, bool base_product) {
    const Matrix xm = matrix(x, "x", false);
    const Matrix wm = matrix(weight, "weight", true);
    const int64_t in = xm.cols, out = wm.rows;
    CHECK_ARG(wm.cols == in, "weight must be (out, " + std::to_string(in) + ") to match x (" +
                             std::to_string(xm.rows) + ", " + std::to_string(in) + "), got (" +
                             std::to_string(wm.rows) + ", " + std::to_string(wm.cols) + ")");
    const Tensor a_tensor = tensor(lora_A, "lora_A", 2);
    const int64_t rank = a_tensor.shape[0];
    CHECK_ARG(rank >= 1, "lora_A must have at least one row (rank >= 1)");
    const float* a = contiguous(a_tensor, "lora_A", {rank, in});
    const float* b = contiguous(lora_B, "lora_B", {out, rank});
    const float* bias_data = bias.is_none() ? nullptr : contiguous(bias, "bias", {out});
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

void forward(py::handle out, py::handle x, py::handle weight, py::handle bias, py::handle lora_A, py::handle lora_B,
             double scale, double dropout_p, int64_t threshold, int64_t seed, int threads, bool base_product) {
    const fastlora::LoraProblem p = problem(x, weight, bias, lora_A, lora_B, scale, dropout_p, threshold, seed, threads,
                                            base_product);
    float* y = output(out, "out", {p.x.rows, p.weight.rows});
    py::gil_scoped_release release;
    fastlora::lora_forward(p, y);
}

void backward(py::handle dx, py::handle dA, py::handle dB, py::handle grad_out, py::handle x, py::handle weight,
              py::handle lora_A, py::handle lora_B, double scale, double dropout_p, int64_t threshold, int64_t seed,
              int threads, bool base_product) {
    const fastlora::LoraProblem p = problem(x, weight, py::none(), lora_A, lora_B, scale, dropout_p, threshold, seed,
                                            threads, base_product);
    const Matrix dy = matrix(grad_out, "grad_out", false);
    CHECK_ARG(dy.rows == p.x.rows && dy.cols == p.weight.rows,
          "grad_out must be (" + std::to_string(p.x.rows) + ", " + std::to_string(p.weight.rows) + "), got (" +
              std::to_string(dy.rows) + ", " + std::to_string(dy.cols) + ")");
    float* dx_data = dx.is_none() ? nullptr : output(dx, "dx", {p.x.rows, p.x.cols});
    float* dA_data = dA.is_none() ? nullptr : output(dA, "dA", {p.rank, p.x.cols});
    float* dB_data = dB.is_none() ? nullptr : output(dB, "dB", {p.weight.rows, p.rank});
    py::gil_scoped_release release;
    fastlora::lora_backward(p, dy.data, dy.row_stride, dx_data, dA_data, dB_data);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastlora's fused fp32 LoRA kernels for CPUs (OpenBLAS base product, fused rank-R update); "
              "the arrays are float32 CPU torch.Tensors";
    scipy_openblas_set_num_threads(1);  // parallelism comes from parallel_run, sized by the caller
    load_torch_api();
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
