// fast_path.cpp — one call for the common small case of a population loss: every input
// a plain, contiguous, CPU float32/float64 torch.Tensor of less than 4 MiB.
//
// Why: a GAN loss on a batch of 256 logits costs the kernel well under a microsecond,
// and the Python glue that turns tensors into pointers, checks them and allocates the
// outputs (python/genloss/native/_compose.py) cost ~20 us: more than torch eager
// spends on the whole loss. This file does the same work with a handful of C-API
// calls. It decides nothing the Python path does not: whenever anything is unusual
// (another array type, a subclass, CUDA, strides, an empty batch, a bad reduction or
// need_grad, a large input that the output cache of host_cache.cpp should serve) it
// returns None and the caller runs the Python path, which raises the error or
// handles the case. So every error message keeps one home, in Python.
//
// The kernels are the same engine calls as _compose.run_terms: term i runs functor
// (name, coef, params, mode) over input i, with scale coef / batch for 'mean', into
// one scalar (or the per-sample rows for 'none'), writing input i's gradient.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "genloss/engine.h"

namespace py = pybind11;

namespace genloss {

// Outputs of at least this many bytes come from the output cache (Python path).
constexpr int64_t kHostCacheMinBytes = int64_t(4) << 20;

namespace {

struct Torch {
  PyObject* tensor_type = nullptr;  // torch.Tensor (exact type only: no subclasses)
  PyObject* f32 = nullptr;          // torch.float32
  PyObject* f64 = nullptr;          // torch.float64
  PyObject* empty_like = nullptr;   // torch.empty_like
};

// Interned attribute names, created once.
struct Names {
  PyObject *dtype, *is_cpu, *is_contiguous, *is_neg, *shape, *data_ptr, *new_empty;
};

Names& names() {
  static Names n{PyUnicode_InternFromString("dtype"),         PyUnicode_InternFromString("is_cpu"),
                 PyUnicode_InternFromString("is_contiguous"), PyUnicode_InternFromString("is_neg"),
                 PyUnicode_InternFromString("shape"),         PyUnicode_InternFromString("data_ptr"),
                 PyUnicode_InternFromString("new_empty")};
  return n;
}

// torch's objects, looked up once torch has been imported by the caller (genloss.native
// never imports torch itself: without it in sys.modules nothing can be a torch.Tensor).
const Torch* torch_objects() {
  static Torch t;
  static bool ready = false;
  if (ready) return &t;
  PyObject* mods = PyImport_GetModuleDict();  // borrowed
  PyObject* torch = PyDict_GetItemString(mods, "torch");
  if (torch == nullptr) return nullptr;
  t.tensor_type = PyObject_GetAttrString(torch, "Tensor");
  t.f32 = PyObject_GetAttrString(torch, "float32");
  t.f64 = PyObject_GetAttrString(torch, "float64");
  t.empty_like = PyObject_GetAttrString(torch, "empty_like");
  if (!t.tensor_type || !t.f32 || !t.f64 || !t.empty_like) {
    PyErr_Clear();
    return nullptr;
  }
  ready = true;  // kept for the life of the process (torch is never unloaded)
  return &t;
}

struct Input {
  PyObject* obj;
  void* ptr;
  int64_t rows, cols;
};

// Fills `in` if `o` is a plain contiguous CPU float tensor; dtype code into *dtype.
// Returns false for anything else (the caller falls back; no Python error is left set).
bool read_input(const Torch& t, PyObject* o, Input& in, int& dtype) {
  if (reinterpret_cast<PyObject*>(Py_TYPE(o)) != t.tensor_type) return false;
  Names& n = names();
  PyObject* dt = PyObject_GetAttr(o, n.dtype);
  if (dt == nullptr) return PyErr_Clear(), false;
  const int code = dt == t.f32 ? 0 : dt == t.f64 ? 1 : -1;
  Py_DECREF(dt);
  if (code < 0) return false;
  PyObject* cpu = PyObject_GetAttr(o, n.is_cpu);
  if (cpu == nullptr) return PyErr_Clear(), false;
  const bool on_cpu = cpu == Py_True;
  Py_DECREF(cpu);
  if (!on_cpu) return false;
  PyObject* contig = PyObject_CallMethodNoArgs(o, n.is_contiguous);
  if (contig == nullptr) return PyErr_Clear(), false;
  const bool c = contig == Py_True;
  Py_DECREF(contig);
  if (!c) return false;
  PyObject* neg = PyObject_CallMethodNoArgs(o, n.is_neg);  // a lazily negated view (torch._neg_view)
  if (neg == nullptr) return PyErr_Clear(), false;
  const bool negated = neg != Py_False;
  Py_DECREF(neg);
  if (negated) return false;
  PyObject* shape = PyObject_GetAttr(o, n.shape);  // torch.Size, a tuple
  if (shape == nullptr) return PyErr_Clear(), false;
  const Py_ssize_t nd = PyTuple_Check(shape) ? PyTuple_GET_SIZE(shape) : 0;
  int64_t rows = 0, numel = 1;
  for (Py_ssize_t d = 0; d < nd; ++d) {
    const int64_t k = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
    if (d == 0) rows = k;
    numel *= k;
  }
  Py_DECREF(shape);
  if (PyErr_Occurred()) return PyErr_Clear(), false;
  // 0-d or empty: the Python path names the argument in its error.
  if (nd == 0 || numel <= 0 || rows <= 0) return false;
  if (numel * (code == 0 ? 4 : 8) >= kHostCacheMinBytes) return false;
  PyObject* p = PyObject_CallMethodNoArgs(o, n.data_ptr);
  if (p == nullptr) return PyErr_Clear(), false;
  in.ptr = PyLong_AsVoidPtr(p);
  Py_DECREF(p);
  if (PyErr_Occurred()) return PyErr_Clear(), false;
  in.obj = o;
  in.rows = rows;
  in.cols = numel / rows;
  dtype = code;
  return true;
}

int functor_id(PyObject* name) {
  static const char* const kNames[] = {
#define GENLOSS_NAME(id, type) #id + 1,
      GENLOSS_FUNCTORS(GENLOSS_NAME)
#undef GENLOSS_NAME
  };
  const char* s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : nullptr;
  if (s == nullptr) return PyErr_Clear(), -1;
  for (int i = 0; i < kNumFunctors; ++i)
    if (std::strcmp(s, kNames[i]) == 0) return i;
  return -1;
}

struct TermSpec {
  int functor, mode;
  double coef, p[3];
};

// (name, coef, (pa, pb, pc), mode) as _compose.two_population takes it.
bool read_term(PyObject* spec, TermSpec& t) {
  if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) return false;
  t.functor = functor_id(PyTuple_GET_ITEM(spec, 0));
  if (t.functor < 0) return false;
  t.coef = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 1));
  PyObject* params = PyTuple_GET_ITEM(spec, 2);
  if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != 3) return false;
  for (int q = 0; q < 3; ++q) t.p[q] = PyFloat_AsDouble(PyTuple_GET_ITEM(params, q));
  PyObject* mode = PyTuple_GET_ITEM(spec, 3);
  if (PyBool_Check(mode) || !PyLong_Check(mode)) return false;
  t.mode = static_cast<int>(PyLong_AsLong(mode));
  if (PyErr_Occurred()) return PyErr_Clear(), false;
  return true;
}

// need_grad: a bool for all inputs, or a tuple/list of n bools.
bool read_need(PyObject* need, Py_ssize_t n, std::vector<char>& out) {
  out.assign(static_cast<size_t>(n), 0);
  if (PyBool_Check(need)) {
    for (auto& f : out) f = need == Py_True;
    return true;
  }
  if (!PyTuple_Check(need) && !PyList_Check(need)) return false;
  if (PySequence_Fast_GET_SIZE(need) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* f = PySequence_Fast_GET_ITEM(need, i);
    if (!PyBool_Check(f)) return false;
    out[static_cast<size_t>(i)] = f == Py_True;
  }
  return true;
}

// 0 mean, 1 sum, 2 none; -1 anything else.
int read_reduction(PyObject* r) {
  if (!PyUnicode_Check(r)) return -1;
  if (PyUnicode_CompareWithASCIIString(r, "mean") == 0) return 0;
  if (PyUnicode_CompareWithASCIIString(r, "sum") == 0) return 1;
  if (PyUnicode_CompareWithASCIIString(r, "none") == 0) return 2;
  return -1;
}

PyObject* new_empty(PyObject* like, int64_t n, bool scalar) {
  PyObject* shape = scalar ? PyTuple_New(0) : Py_BuildValue("(L)", static_cast<long long>(n));
  if (shape == nullptr) return nullptr;
  PyObject* out = PyObject_CallMethodOneArg(like, names().new_empty, shape);
  Py_DECREF(shape);
  return out;
}

void* data_ptr(PyObject* t) {
  PyObject* p = PyObject_CallMethodNoArgs(t, names().data_ptr);
  if (p == nullptr) return nullptr;
  void* v = PyLong_AsVoidPtr(p);
  Py_DECREF(p);
  return v;
}

// Returns (value, grads) as _compose.run_terms does, or None to fall back.
py::object populations(py::handle arrays, py::handle terms, py::handle reduction, py::handle need_grad,
                       bool allow_none) {
  const Torch* t = torch_objects();
  if (t == nullptr) return py::none();
  PyObject* arr = arrays.ptr();
  PyObject* trm = terms.ptr();
  if (!(PyTuple_Check(arr) || PyList_Check(arr)) || !(PyTuple_Check(trm) || PyList_Check(trm))) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(arr);
  if (n < 1 || n > 8 || PySequence_Fast_GET_SIZE(trm) != n) return py::none();
  const int red = read_reduction(reduction.ptr());
  if (red < 0 || (red == 2 && !allow_none)) return py::none();
  std::vector<char> need;
  if (!read_need(need_grad.ptr(), n, need)) return py::none();
  Input in[8];
  TermSpec spec[8];
  int dtype = -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    int code = -1;
    if (!read_input(*t, PySequence_Fast_GET_ITEM(arr, i), in[i], code)) return py::none();
    if (dtype >= 0 && code != dtype) return py::none();
    dtype = code;
    if (!read_term(PySequence_Fast_GET_ITEM(trm, i), spec[i])) return PyErr_Clear(), py::none();
    if (red == 2 && in[i].rows != in[0].rows) return py::none();
  }
  // Outputs: they are new tensors of the inputs' dtype on the CPU.
  py::object value = py::reinterpret_steal<py::object>(new_empty(in[0].obj, in[0].rows, red != 2));
  if (!value) throw py::error_already_set();
  void* value_ptr = data_ptr(value.ptr());
  if (value_ptr == nullptr && PyErr_Occurred()) throw py::error_already_set();
  bool any = false;
  for (Py_ssize_t i = 0; i < n; ++i) any = any || need[static_cast<size_t>(i)];
  py::tuple grads(any ? n : 0);
  void* gptr[8] = {};
  for (Py_ssize_t i = 0; any && i < n; ++i) {
    if (!need[static_cast<size_t>(i)]) {
      grads[static_cast<size_t>(i)] = py::none();
      continue;
    }
    PyObject* g = PyObject_CallOneArg(t->empty_like, in[i].obj);
    if (g == nullptr) throw py::error_already_set();
    grads[static_cast<size_t>(i)] = py::reinterpret_steal<py::object>(g);
    gptr[i] = data_ptr(g);
    if (gptr[i] == nullptr && PyErr_Occurred()) throw py::error_already_set();
  }
  int64_t total = 0;
  for (Py_ssize_t i = 0; i < n; ++i) total += in[i].rows * in[i].cols;
  {
    // Small work: the GIL is released only when the kernels take long enough to matter.
    std::unique_ptr<py::gil_scoped_release> nogil;
    if (total >= (int64_t(1) << 16)) nogil = std::make_unique<py::gil_scoped_release>();
    for (Py_ssize_t i = 0; i < n; ++i) {
      const double s = spec[i].coef / (red == 0 ? static_cast<double>(in[i].rows) : 1.0);
      MapReduceArgs a{};
      a.functor = spec[i].functor;
      a.pa = spec[i].p[0];
      a.pb = spec[i].p[1];
      a.pc = spec[i].p[2];
      a.mode = spec[i].mode;
      a.dtype = dtype;
      a.in[0] = in[i].ptr;
      a.grad[0] = gptr[i];
      a.rows = in[i].rows;
      a.cols = in[i].cols;
      a.value_scale = s;
      a.grad_scale = s;
      a.accumulate = i > 0;
      if (red == 2)
        a.out_rows = value_ptr;
      else
        a.out_value = value_ptr;
      cpu::map_reduce(a);
    }
  }
  return py::make_tuple(value, grads);
}

}  // namespace
}  // namespace genloss

void bind_fast_path(py::module_& m) {
  using namespace genloss;
  m.def("fast_populations", &populations, py::arg("arrays"), py::arg("terms"), py::arg("reduction"),
        py::arg("need_grad"), py::arg("allow_none"),
        "One call for a population loss on small plain CPU torch tensors; None: use the Python path.");
  m.attr("HOST_CACHE_MIN_BYTES") = kHostCacheMinBytes;
}
