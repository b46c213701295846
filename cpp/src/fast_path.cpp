// fast_path.cpp — one call for the common case of a loss on plain, contiguous, CPU
// float32/float64 torch.Tensors: the checks, the output allocation and the kernels.
//
// Why: a GAN loss on a batch of 256 logits costs the kernel well under a microsecond,
// and the Python glue that turns tensors into pointers, checks them and allocates the
// outputs (python/genloss/native/_compose.py) cost ~20 us: more than torch eager
// spends on the whole loss. At 1M elements (a diffusion batch) the same glue, run with
// cold caches as in a training step, cost ~0.3 ms against a 0.5 ms kernel. This file
// does the same work with a handful of C-API calls. It decides nothing the Python path
// does not: whenever anything is unusual (another array type, a subclass, CUDA,
// strides, an empty batch, a bad reduction or need_grad, a value out of its domain) it
// returns None and the caller runs the Python path, which raises the error or handles
// the case. So every error message keeps one home, in Python.
//
// Entries (each mirrors one Python composition, named at its definition):
//   fast_populations  _compose.one_population / two_population
//   fast_table_rows   diffusion.diffusion_mse_with_table, vlb_with_table (per-step table)
#include <Python.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_config.h"
#include "genloss/engine.h"

namespace py = pybind11;

namespace genloss {

py::capsule cached_empty(const std::vector<int64_t>& shape, int dtype);  // host_cache.cpp

using cpu::kHostCacheMinBytes;  // outputs from the output cache from this size on

namespace {

struct Torch {
  PyObject* tensor_type = nullptr;  // torch.Tensor (exact type only: no subclasses)
  PyObject* f32 = nullptr;          // torch.float32
  PyObject* f64 = nullptr;          // torch.float64
  PyObject* i64 = nullptr;          // torch.int64
  PyObject* i32 = nullptr;          // torch.int32
  PyObject* empty_like = nullptr;   // torch.empty_like
  PyObject* from_dlpack = nullptr;  // torch._C._from_dlpack
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
  PyObject* c = PyObject_GetAttrString(torch, "_C");
  t.tensor_type = PyObject_GetAttrString(torch, "Tensor");
  t.f32 = PyObject_GetAttrString(torch, "float32");
  t.f64 = PyObject_GetAttrString(torch, "float64");
  t.i64 = PyObject_GetAttrString(torch, "int64");
  t.i32 = PyObject_GetAttrString(torch, "int32");
  t.empty_like = PyObject_GetAttrString(torch, "empty_like");
  t.from_dlpack = c ? PyObject_GetAttrString(c, "_from_dlpack") : nullptr;
  Py_XDECREF(c);
  if (!t.tensor_type || !t.f32 || !t.f64 || !t.i64 || !t.i32 || !t.empty_like || !t.from_dlpack) {
    PyErr_Clear();
    return nullptr;
  }
  ready = true;  // kept for the life of the process (torch is never unloaded)
  return &t;
}

struct Input {
  PyObject* obj = nullptr;
  void* ptr = nullptr;
  int code = -1;  // float: 0 float32, 1 float64; integer: 0 int64, 1 int32 (engine codes)
  std::vector<int64_t> shape;
  int64_t rows = 0, cols = 0, numel = 0;
};

bool call_bool(PyObject* o, PyObject* method, bool& out) {
  PyObject* r = PyObject_CallMethodNoArgs(o, method);
  if (r == nullptr) return PyErr_Clear(), false;
  out = r == Py_True;
  Py_DECREF(r);
  return true;
}

// Fills `in` if `o` is a plain, contiguous, non-negated CPU torch.Tensor of a float dtype
// (or, with `integer`, int64/int32) with at least one dimension and one element. Returns
// false for anything else (the caller falls back; no Python error is left set).
bool read_input(const Torch& t, PyObject* o, Input& in, bool integer = false) {
  if (reinterpret_cast<PyObject*>(Py_TYPE(o)) != t.tensor_type) return false;
  Names& n = names();
  PyObject* dt = PyObject_GetAttr(o, n.dtype);
  if (dt == nullptr) return PyErr_Clear(), false;
  const int code = integer ? (dt == t.i64 ? 0 : dt == t.i32 ? 1 : -1) : (dt == t.f32 ? 0 : dt == t.f64 ? 1 : -1);
  Py_DECREF(dt);
  if (code < 0) return false;
  PyObject* cpu = PyObject_GetAttr(o, n.is_cpu);
  if (cpu == nullptr) return PyErr_Clear(), false;
  const bool on_cpu = cpu == Py_True;
  Py_DECREF(cpu);
  bool contiguous = false, negated = true;  // is_neg: a lazily negated view (torch._neg_view)
  if (!on_cpu || !call_bool(o, n.is_contiguous, contiguous) || !contiguous) return false;
  if (!call_bool(o, n.is_neg, negated) || negated) return false;
  PyObject* shape = PyObject_GetAttr(o, n.shape);  // torch.Size, a tuple
  if (shape == nullptr) return PyErr_Clear(), false;
  const Py_ssize_t nd = PyTuple_Check(shape) ? PyTuple_GET_SIZE(shape) : 0;
  in.shape.resize(static_cast<size_t>(nd));
  int64_t numel = 1;
  for (Py_ssize_t d = 0; d < nd; ++d) {
    in.shape[static_cast<size_t>(d)] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
    numel *= in.shape[static_cast<size_t>(d)];
  }
  Py_DECREF(shape);
  if (PyErr_Occurred()) return PyErr_Clear(), false;
  // 0-d or empty: the Python path names the argument in its error.
  if (nd == 0 || numel <= 0 || in.shape[0] <= 0) return false;
  PyObject* p = PyObject_CallMethodNoArgs(o, n.data_ptr);
  if (p == nullptr) return PyErr_Clear(), false;
  in.ptr = PyLong_AsVoidPtr(p);
  Py_DECREF(p);
  if (PyErr_Occurred()) return PyErr_Clear(), false;
  // A view not aligned to its element size would reach the kernels' typed loads (undefined
  // behaviour): the Python path copies it to an aligned array.
  const size_t itemsize = integer ? (code == 0 ? 8 : 4) : (code == 0 ? 4 : 8);
  if (reinterpret_cast<uintptr_t>(in.ptr) % itemsize != 0) return false;
  in.obj = o;
  in.code = code;
  in.rows = in.shape[0];
  in.numel = numel;
  in.cols = numel / in.rows;
  return true;
}

// A new CPU tensor of `like`'s dtype: `shape` (empty: 0-d); outputs of 4 MiB or more from
// the output cache, as _engine.empty (so a gradient block is reused step after step).
// Sets *ptr. Throws on a Python error (allocation failure).
py::object alloc(const Torch& t, const Input& like, const std::vector<int64_t>& shape, void** ptr) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  PyObject* out = nullptr;
  if (cpu::huge_pages() && n * (like.code == 0 ? 4 : 8) >= kHostCacheMinBytes) {  // as _engine.empty
    py::capsule cap = cached_empty(shape, like.code);
    out = PyObject_CallOneArg(t.from_dlpack, cap.ptr());
  } else if (shape == like.shape) {
    out = PyObject_CallOneArg(t.empty_like, like.obj);
  } else {
    PyObject* sh = PyTuple_New(static_cast<Py_ssize_t>(shape.size()));
    if (sh == nullptr) throw py::error_already_set();
    for (size_t d = 0; d < shape.size(); ++d)
      PyTuple_SET_ITEM(sh, static_cast<Py_ssize_t>(d), PyLong_FromLongLong(shape[d]));
    out = PyObject_CallMethodOneArg(like.obj, names().new_empty, sh);
    Py_DECREF(sh);
  }
  if (out == nullptr) throw py::error_already_set();
  py::object o = py::reinterpret_steal<py::object>(out);
  PyObject* p = PyObject_CallMethodNoArgs(out, names().data_ptr);
  if (p == nullptr) throw py::error_already_set();
  *ptr = PyLong_AsVoidPtr(p);
  Py_DECREF(p);
  if (PyErr_Occurred()) throw py::error_already_set();
  return o;
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

bool sequence(PyObject* o) {
  return PyTuple_Check(o) || PyList_Check(o);
}

// The kernels of one call: the GIL is released only when they take long enough to matter.
void run_all(const std::vector<MapReduceArgs>& calls, int64_t work) {
  std::unique_ptr<py::gil_scoped_release> nogil;
  if (work >= (int64_t(1) << 16)) nogil = std::make_unique<py::gil_scoped_release>();
  for (const MapReduceArgs& a : calls) cpu::map_reduce(a);
}

// The value output (0-d for mean/sum, (rows,) for none) and one gradient per flagged input.
struct Outputs {
  py::object value;
  void* value_ptr = nullptr;
  py::tuple grads;
  std::vector<void*> gptr;
};

Outputs outputs(const Torch& t, const Input* in, size_t n_grad, const std::vector<char>& need, int red) {
  Outputs o;
  o.value = alloc(t, in[0], red == 2 ? std::vector<int64_t>{in[0].rows} : std::vector<int64_t>{}, &o.value_ptr);
  bool any = false;
  for (char f : need) any = any || f;
  o.grads = py::tuple(any ? n_grad : 0);
  o.gptr.assign(n_grad, nullptr);
  for (size_t i = 0; any && i < n_grad; ++i) {
    if (need[i])
      o.grads[i] = alloc(t, in[i], in[i].shape, &o.gptr[i]);
    else
      o.grads[i] = py::none();
  }
  return o;
}

// _compose.one_population / two_population: term i runs functor (name, coef, params,
// mode) over input i with scale coef / batch ('mean'), into one scalar (or the
// per-sample rows for 'none'), writing input i's gradient. Returns (value, grads) or
// None to fall back.
py::object populations(py::handle arrays, py::handle terms, py::handle reduction, py::handle need_grad,
                       bool allow_none) {
  const Torch* t = torch_objects();
  if (t == nullptr) return py::none();
  PyObject* arr = arrays.ptr();
  PyObject* trm = terms.ptr();
  if (!sequence(arr) || !sequence(trm)) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(arr);
  if (n < 1 || n > 8 || PySequence_Fast_GET_SIZE(trm) != n) return py::none();
  const int red = read_reduction(reduction.ptr());
  if (red < 0 || (red == 2 && !allow_none)) return py::none();
  std::vector<char> need;
  if (!read_need(need_grad.ptr(), n, need)) return py::none();
  Input in[8];
  TermSpec spec[8];
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!read_input(*t, PySequence_Fast_GET_ITEM(arr, i), in[i])) return py::none();
    if (in[i].code != in[0].code) return py::none();
    if (!read_term(PySequence_Fast_GET_ITEM(trm, i), spec[i])) return PyErr_Clear(), py::none();
    if (red == 2 && in[i].rows != in[0].rows) return py::none();
  }
  Outputs o = outputs(*t, in, static_cast<size_t>(n), need, red);
  std::vector<MapReduceArgs> calls(static_cast<size_t>(n));
  int64_t work = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const double s = spec[i].coef / (red == 0 ? static_cast<double>(in[i].rows) : 1.0);
    MapReduceArgs& a = calls[static_cast<size_t>(i)];
    a.functor = spec[i].functor;
    a.pa = spec[i].p[0];
    a.pb = spec[i].p[1];
    a.pc = spec[i].p[2];
    a.mode = spec[i].mode;
    a.dtype = in[0].code;
    a.in[0] = in[i].ptr;
    a.grad[0] = o.gptr[static_cast<size_t>(i)];
    a.rows = in[i].rows;
    a.cols = in[i].cols;
    a.value_scale = s;
    a.grad_scale = s;
    a.accumulate = i > 0;
    (red == 2 ? a.out_rows : a.out_value) = o.value_ptr;
    work += in[i].numel;
  }
  run_all(calls, work);
  return py::make_tuple(o.value, o.grads);
}

// Scans a (rows,) int64/int32 index for [0, limit).
template <class I>
bool indices_in_range(const void* p, int64_t n, int64_t limit) {
  const I* v = static_cast<const I*>(p);
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0 || static_cast<int64_t>(v[i]) >= limit) return false;
  return true;
}

// Scans a (rows,) weight vector: finite and >= 0.
template <class T>
bool weights_ok(const void* p, int64_t n) {
  const T* v = static_cast<const T*>(p);
  for (int64_t i = 0; i < n; ++i)
    if (!(std::isfinite(v[i]) && v[i] >= T(0))) return false;
  return true;
}

// Row t[r] of the (T, stride) table is finite for every sample (else the Python path
// names the step that divides by zero).
bool rows_finite(const Input& tab, const Input& tb) {
  const double* table = static_cast<const double*>(tab.ptr);
  for (int64_t r = 0; r < tb.rows; ++r) {
    const int64_t i = tb.code == 1 ? static_cast<const int32_t*>(tb.ptr)[r] : static_cast<const int64_t*>(tb.ptr)[r];
    for (int64_t j = 0; j < tab.cols; ++j)
      if (!std::isfinite(table[i * tab.cols + j])) return false;
  }
  return true;
}

template <class T>
bool any_nan(const void* p, int64_t n) {
  const T* v = static_cast<const T*>(p);
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(v[i])) return true;
  return false;
}

// diffusion.diffusion_mse_with_table and vlb_with_table: functor `name` (params pa, pb, pc)
// over `arrays` (same shape; the gradient of input grad_of[k] is output k), row r reading
// row t[r] of the float64 (T, stride) table (t in [0, T), the rows used finite), weighted
// by weights[r] (None: 1, else finite and >= 0), each sample's sum divided by its element
// count when per_sample_mean, then the reduction. A NaN value falls back too (the
// functors mark an input outside its domain that way; the Python path names it).
// Returns (value, grads) or None to fall back.
py::object table_rows(py::handle arrays, py::handle name, py::handle grad_of, py::handle params, py::handle table,
                      int stride, py::handle steps, py::handle weights, py::handle reduction, py::handle need_grad,
                      bool per_sample_mean) {
  const Torch* t = torch_objects();
  if (t == nullptr) return py::none();
  PyObject* arr = arrays.ptr();
  PyObject* gof = grad_of.ptr();
  PyObject* prm = params.ptr();
  if (!sequence(arr) || !PyTuple_Check(gof) || !PyTuple_Check(prm) || PyTuple_GET_SIZE(prm) != 3) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(arr);
  const Py_ssize_t n_grad = PyTuple_GET_SIZE(gof);
  if (n < 1 || n > kMaxArity || n_grad < 1 || n_grad > n) return py::none();
  const int functor = functor_id(name.ptr());
  const int red = read_reduction(reduction.ptr());
  std::vector<char> need;
  if (functor < 0 || red < 0 || !read_need(need_grad.ptr(), n_grad, need)) return py::none();
  int slot[kMaxArity];
  for (Py_ssize_t k = 0; k < n_grad; ++k) {
    slot[k] = static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(gof, k)));
    if (PyErr_Occurred() || slot[k] < 0 || slot[k] >= n) return PyErr_Clear(), py::none();
  }
  double p[3];
  for (int q = 0; q < 3; ++q) p[q] = PyFloat_AsDouble(PyTuple_GET_ITEM(prm, q));
  if (PyErr_Occurred()) return PyErr_Clear(), py::none();
  Input in[kMaxArity];
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!read_input(*t, PySequence_Fast_GET_ITEM(arr, i), in[i])) return py::none();
    if (in[i].code != in[0].code || in[i].shape != in[0].shape) return py::none();
  }
  const std::vector<int64_t> batch{in[0].rows};
  Input tab, tb, w;
  if (!read_input(*t, table.ptr(), tab) || tab.code != 1 || tab.shape.size() != 2 || tab.cols != stride)
    return py::none();
  if (!read_input(*t, steps.ptr(), tb, /*integer=*/true) || tb.shape != batch) return py::none();
  const bool in_range = tb.code == 1 ? indices_in_range<int32_t>(tb.ptr, tb.rows, tab.rows)
                                     : indices_in_range<int64_t>(tb.ptr, tb.rows, tab.rows);
  if (!in_range || !rows_finite(tab, tb)) return py::none();
  const bool weighted = !weights.is_none();
  if (weighted) {
    if (!read_input(*t, weights.ptr(), w) || w.code != in[0].code || w.shape != batch) return py::none();
    const bool ok = w.code == 0 ? weights_ok<float>(w.ptr, w.rows) : weights_ok<double>(w.ptr, w.rows);
    if (!ok) return py::none();
  }
  Input grad_like[kMaxArity];
  for (Py_ssize_t k = 0; k < n_grad; ++k) grad_like[k] = in[slot[k]];
  Outputs o = outputs(*t, grad_like, static_cast<size_t>(n_grad), need, red);
  MapReduceArgs a{};
  a.functor = functor;
  a.pa = p[0];
  a.pb = p[1];
  a.pc = p[2];
  a.dtype = in[0].code;
  for (Py_ssize_t i = 0; i < n; ++i) a.in[i] = in[i].ptr;
  for (Py_ssize_t k = 0; k < n_grad; ++k) a.grad[slot[k]] = o.gptr[static_cast<size_t>(k)];
  a.rows = in[0].rows;
  a.cols = in[0].cols;
  const double s = (per_sample_mean ? 1.0 / static_cast<double>(in[0].cols) : 1.0) /
                   (red == 0 ? static_cast<double>(in[0].rows) : 1.0);
  a.value_scale = s;
  a.grad_scale = s;
  (red == 2 ? a.out_rows : a.out_value) = o.value_ptr;
  a.table = tab.ptr;
  a.table_rows = tab.rows;
  a.table_stride = stride;
  a.index = tb.ptr;
  a.index_type = tb.code;
  a.row_weight = weighted ? w.ptr : nullptr;
  run_all({a}, in[0].numel * n);
  const int64_t nv = red == 2 ? in[0].rows : 1;
  if (in[0].code == 0 ? any_nan<float>(o.value_ptr, nv) : any_nan<double>(o.value_ptr, nv)) return py::none();
  return py::make_tuple(o.value, o.grads);
}

}  // namespace
}  // namespace genloss

void bind_fast_path(py::module_& m) {
  using namespace genloss;
  m.def("fast_populations", &populations, py::arg("arrays"), py::arg("terms"), py::arg("reduction"),
        py::arg("need_grad"), py::arg("allow_none"),
        "A population loss on plain CPU torch tensors in one call; None: use the Python path.");
  m.def("fast_table_rows", &table_rows, py::arg("arrays"), py::arg("functor"), py::arg("grad_of"), py::arg("params"),
        py::arg("table"), py::arg("stride"), py::arg("t"), py::arg("weights"), py::arg("reduction"),
        py::arg("need_grad"), py::arg("per_sample_mean"),
        "A per-step-table loss on plain CPU torch tensors in one call; None: use the Python path.");
  m.attr("HOST_CACHE_MIN_BYTES") = kHostCacheMinBytes;
}
