// plan.cpp — the one way Python runs the map_reduce engine, and the small-call fast path.
//
// 1. ``Call`` (genloss._C.Call): one typed engine call with named fields. Functor
//    parameters go by the names the functor declares (ParamNames in ops/*.h,
//    exported as _C.FUNCTOR_PARAMS); a wrong or missing name is a TypeError naming
//    the functor and its parameters. ``run(call or calls)`` is the one entry point:
//    it runs them on their device with the GIL released; ``run_call(**fields)`` is
//    Call + run in one vectorcall (the compositions' hot path: no dict, no pybind11
//    dispatch). The native compositions (python/genloss/native/) reach the engine
//    only that way (_engine.map_reduce, _compose.run_terms).
//
// 2. ``PlanCache``: cached plans. Why: a GAN loss on a batch of 256 logits costs the
//    kernel well under a microsecond, and the Python glue that turns tensors into
//    pointers, checks them and allocates the outputs (_compose.py) costs ~20 us: more
//    than torch eager spends on the whole loss. The first time a composition runs on
//    plain CPU torch tensors for a given key (its op, hyperparameters, reduction,
//    need_grad), the Python path runs and records its Calls; ``add`` turns their
//    pointers into SLOTS (input k, output k) for these input shapes and dtype. Later
//    calls with the same key, dtype and shapes bind the new tensors in C++ and run
//    the same calls (same functors, scales and order: the same bits), without
//    re-running the Python composition. Whenever anything is unusual (another array
//    type, a subclass, CUDA, strides, an empty batch, an unknown key, anything the
//    plan cannot replay) ``run`` returns None and the caller runs the Python path,
//    which raises the error or handles the case: every error message keeps one home,
//    in Python. The shapes are part of the key, so every shape check the Python path
//    made when it recorded holds for every call the plan serves.
//
// 3. ``fast_table_rows``: diffusion.diffusion_mse_with_table and vlb_with_table on
//    plain CPU tensors, checks included (their Python path reads the data: timestep
//    range, weights' sign, the table rows used), so no recorded plan can replay it.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
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
bool read_input(const Torch& t, PyObject* o, Input& in, bool integer = false, bool allow_scalar = false) {
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
  // 0-d (unless allowed: a result) or empty: the Python path names the argument in its error.
  if (numel <= 0 || (nd == 0 ? !allow_scalar : in.shape[0] <= 0)) return false;
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
  in.rows = nd == 0 ? 1 : in.shape[0];
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

// ---- functors by name: arity and parameter names (engine.h, ops/*.h) ---------------

struct FunctorInfo {
  const char* name;
  int arity;
  ParamNames params;
};

const FunctorInfo kFunctors[] = {
#define GENLOSS_INFO(id, type) {#id + 1, type::arity, param_names<type>()},
    GENLOSS_FUNCTORS(GENLOSS_INFO)
#undef GENLOSS_INFO
};

// -1: not a functor name.
int functor_id(PyObject* name) {
  const char* s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : nullptr;
  if (s == nullptr) return PyErr_Clear(), -1;
  for (int i = 0; i < kNumFunctors; ++i)
    if (std::strcmp(s, kFunctors[i].name) == 0) return i;
  return -1;
}

// Slot q of Params: 0 a, 1 b, 2 c, 3 mode.
const char* slot_name(const ParamNames& p, int q) {
  return q == 0 ? p.a : q == 1 ? p.b : q == 2 ? p.c : p.mode;
}

py::tuple param_tuple(const FunctorInfo& f) {
  py::list names;
  for (int q = 0; q < 4; ++q)
    if (const char* n = slot_name(f.params, q)) names.append(n);
  return py::tuple(names);
}

std::string param_list(const FunctorInfo& f) {
  std::string s;
  for (int q = 0; q < 4; ++q)
    if (const char* n = slot_name(f.params, q)) s += (s.empty() ? "" : ", ") + std::string(n);
  return s.empty() ? "it has none" : "its parameters: " + s;
}

// The parameter names of every functor as interned Python strings (slot order; nullptr:
// unused), made once: a call looks its parameters up without building strings.
PyObject* param_key(int functor, int q) {
  static PyObject* keys[kNumFunctors][4];
  static bool ready = false;
  if (!ready) {
    for (int i = 0; i < kNumFunctors; ++i)
      for (int j = 0; j < 4; ++j) {
        const char* n = slot_name(kFunctors[i].params, j);
        keys[i][j] = n ? PyUnicode_InternFromString(n) : nullptr;
      }
    ready = true;
  }
  return keys[functor][q];
}

[[noreturn]] void param_error(const FunctorInfo& f, const std::string& what) {
  throw py::type_error(std::string("functor ") + f.name + ": " + what + " (" + param_list(f) + ")");
}

// Fills a's parameter slots from `params`, a dict {name: value} (None: no parameters) by
// the names functor `id` declares: every name given, no other. A TypeError names the functor.
void set_params(int id, PyObject* params, MapReduceArgs& a) {
  const FunctorInfo& f = kFunctors[id];
  if (params != Py_None && !PyDict_Check(params))
    param_error(f, std::string("params must be a dict {name: value}, got ") + Py_TYPE(params)->tp_name);
  double real[3] = {0.0, 0.0, 0.0};
  int mode = 0;
  Py_ssize_t used = 0;
  for (int q = 0; q < 4; ++q) {
    PyObject* key = param_key(id, q);
    if (key == nullptr) continue;
    PyObject* v = params == Py_None ? nullptr : PyDict_GetItemWithError(params, key);  // borrowed
    if (v == nullptr) {
      PyErr_Clear();
      continue;  // missing: reported below, after a misspelt name (the likelier mistake)
    }
    ++used;
    if (q == 3) {  // an integer: a flag or an enum
      const long m = PyFloat_Check(v) ? -1 : PyLong_AsLong(v);
      if (PyFloat_Check(v) || (m == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        param_error(f, std::string("parameter '") + slot_name(f.params, q) + "' must be an int or a bool");
      }
      mode = static_cast<int>(m);
    } else {
      const double d = PyFloat_AsDouble(v);
      if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        param_error(f, std::string("parameter '") + slot_name(f.params, q) + "' must be a real number, got " +
                           Py_TYPE(v)->tp_name);
      }
      real[q] = d;
    }
  }
  const Py_ssize_t given = params == Py_None ? 0 : PyDict_Size(params);
  if (given != used) {  // a name the functor does not declare
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(params, &pos, &k, &v)) {
      bool known = false;
      for (int q = 0; q < 4; ++q) {
        PyObject* key = param_key(id, q);
        known = known || (key != nullptr && PyUnicode_Check(k) && PyUnicode_Compare(k, key) == 0);
      }
      if (!known) param_error(f, "unknown parameter " + std::string(py::repr(k)));
    }
  }
  int declared = 0;
  for (int q = 0; q < 4; ++q) declared += param_key(id, q) != nullptr;
  for (int q = 0; q < 4 && used != declared; ++q) {
    PyObject* key = param_key(id, q);
    if (key != nullptr && (params == Py_None || PyDict_GetItemWithError(params, key) == nullptr)) {
      PyErr_Clear();
      param_error(f, std::string("missing parameter '") + slot_name(f.params, q) + "'");
    }
  }
  a.pa = real[0];
  a.pb = real[1];
  a.pc = real[2];
  a.mode = mode;
}

// ---- Call: one typed engine call, and run(), the one entry point --------------------

struct Call {
  MapReduceArgs a{};  // a.totals is set only while it runs
  int device = 0;     // 0 CPU, 1 CUDA
  int device_id = 0;
  std::uintptr_t stream = 0;
  bool want_totals = false;
  double totals[2] = {0.0, 0.0};
};

std::uintptr_t as_ptr(PyObject* v, const char* field) {
  if (v == Py_None) return 0;
  const unsigned long long p = PyLong_AsUnsignedLongLong(v);
  if (p == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(std::string("Call: ") + field + " must be an address (an int >= 0) or None");
  }
  return static_cast<std::uintptr_t>(p);
}

int64_t as_int(PyObject* v, const char* field) {
  const long long i = PyLong_AsLongLong(v);
  if (i == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(std::string("Call: ") + field + " must be an int");
  }
  return i;
}

double as_real(PyObject* v, const char* field) {
  const double d = PyFloat_AsDouble(v);
  if (d == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(std::string("Call: ") + field + " must be a real number");
  }
  return d;
}

// A list/tuple of up to kMaxArity addresses into out[] (0 or None: absent); returns the count.
int as_ptrs(PyObject* v, const char* field, const void** out) {
  if (!PyTuple_Check(v) && !PyList_Check(v))
    throw py::type_error(std::string("Call: ") + field + " must be a list of addresses");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
  if (n > kMaxArity) throw py::value_error(std::string("Call: more than 4 ") + field);
  for (Py_ssize_t q = 0; q < n; ++q)
    out[q] = reinterpret_cast<const void*>(as_ptr(PySequence_Fast_GET_ITEM(v, q), field));
  return static_cast<int>(n);
}

enum Field {
  kFunctor,
  kParams,
  kIns,
  kGrads,
  kDtype,
  kDevice,
  kDeviceId,
  kStream,
  kRows,
  kCols,
  kValueScale,
  kGradScale,
  kGradOffset,
  kOutValue,
  kOutRows,
  kOutElems,
  kOutRowsRaw,
  kAccumulate,
  kTotals,
  kTable,
  kTableRows,
  kTableStride,
  kIndex,
  kIndexType,
  kRowWeight,
  kNumFields
};
const char* const kFieldNames[kNumFields] = {"functor",     "params",       "ins",         "grads",      "dtype",
                                             "device",      "device_id",    "stream",      "rows",       "cols",
                                             "value_scale", "grad_scale",   "grad_offset", "out_value",  "out_rows",
                                             "out_elems",   "out_rows_raw", "accumulate",  "totals",     "table",
                                             "table_rows",  "table_stride", "index",       "index_type", "row_weight"};

// The field a keyword names (interned: keywords written in Python source compare by
// identity), or -1.
int field_of(PyObject* k) {
  static PyObject* names[kNumFields];
  static bool ready = false;
  if (!ready) {
    for (int i = 0; i < kNumFields; ++i) names[i] = PyUnicode_InternFromString(kFieldNames[i]);
    ready = true;
  }
  for (int i = 0; i < kNumFields; ++i)
    if (names[i] == k) return i;
  for (int i = 0; i < kNumFields; ++i)
    if (PyUnicode_Check(k) && PyUnicode_Compare(k, names[i]) == 0) return i;
  PyErr_Clear();
  return -1;
}

// Call(functor=..., params={...}, dtype=..., ins=[...], rows=..., cols=..., ...): every field by
// name (engine.h MapReduceArgs says what each one does); an unknown field is a TypeError.
// The fields come as (keyword, value) pairs: from a dict (Call(**fields)) or from a
// vectorcall's kwnames (run_call(**fields), which builds no dict).
struct Fields {
  PyObject* dict = nullptr;  // either this,
  PyObject* const* args = nullptr;
  PyObject* kwnames = nullptr;  // or these
  Py_ssize_t pos = 0;
  bool next(PyObject** k, PyObject** v) {
    if (dict != nullptr) return PyDict_Next(dict, &pos, k, v) != 0;
    if (kwnames == nullptr || pos >= PyTuple_GET_SIZE(kwnames)) return false;
    *k = PyTuple_GET_ITEM(kwnames, pos);
    *v = args[pos];
    ++pos;
    return true;
  }
};

Call make_call(Fields fields) {
  Call c;
  MapReduceArgs& a = c.a;
  a.value_scale = 1.0;
  a.grad_scale = 1.0;
  a.functor = -1;
  PyObject* params = Py_None;
  PyObject* ins = nullptr;
  bool have_rows = false, have_cols = false;
  int n_grads = 0;
  PyObject *k, *v;
  while (fields.next(&k, &v)) {
    switch (field_of(k)) {
      case kFunctor:
        a.functor = functor_id(v);
        if (a.functor < 0) throw py::value_error("Call: unknown functor " + std::string(py::repr(v)));
        break;
      case kParams:
        params = v;
        break;
      case kIns:
        ins = v;
        break;
      case kGrads: {
        const void* g[kMaxArity] = {};
        const int count = as_ptrs(v, "grads", g);
        for (int q = 0; q < count; ++q) a.grad[q] = const_cast<void*>(g[q]);
        n_grads = count;  // checked against the arity below
        break;
      }
      case kDtype:
        a.dtype = static_cast<int>(as_int(v, "dtype"));
        break;
      case kDevice:
        c.device = static_cast<int>(as_int(v, "device"));
        break;
      case kDeviceId:
        c.device_id = static_cast<int>(as_int(v, "device_id"));
        break;
      case kStream:
        c.stream = as_ptr(v, "stream");
        break;
      case kRows:
        a.rows = as_int(v, "rows");
        have_rows = true;
        break;
      case kCols:
        a.cols = as_int(v, "cols");
        have_cols = true;
        break;
      case kValueScale:
        a.value_scale = as_real(v, "value_scale");
        break;
      case kGradScale:
        a.grad_scale = as_real(v, "grad_scale");
        break;
      case kGradOffset:
        a.grad_offset = as_real(v, "grad_offset");
        break;
      case kOutValue:
        a.out_value = reinterpret_cast<void*>(as_ptr(v, "out_value"));
        break;
      case kOutRows:
        a.out_rows = reinterpret_cast<void*>(as_ptr(v, "out_rows"));
        break;
      case kOutElems:
        a.out_elems = reinterpret_cast<void*>(as_ptr(v, "out_elems"));
        break;
      case kOutRowsRaw:
        a.out_rows_raw = reinterpret_cast<void*>(as_ptr(v, "out_rows_raw"));
        break;
      case kAccumulate:
        a.accumulate = PyObject_IsTrue(v);
        break;
      case kTotals:
        c.want_totals = PyObject_IsTrue(v) == 1;
        break;
      case kTable:
        a.table = reinterpret_cast<const void*>(as_ptr(v, "table"));
        break;
      case kTableRows:
        a.table_rows = as_int(v, "table_rows");
        break;
      case kTableStride:
        a.table_stride = static_cast<int>(as_int(v, "table_stride"));
        break;
      case kIndex:
        a.index = reinterpret_cast<const void*>(as_ptr(v, "index"));
        break;
      case kIndexType:
        a.index_type = static_cast<int>(as_int(v, "index_type"));
        break;
      case kRowWeight:
        a.row_weight = reinterpret_cast<const void*>(as_ptr(v, "row_weight"));
        break;
      default:
        throw py::type_error("Call: unknown field " + std::string(py::repr(k)));
    }
  }
  if (a.functor < 0) throw py::type_error("Call: functor is required");
  const FunctorInfo& f = kFunctors[a.functor];
  if (ins == nullptr || !have_rows || !have_cols) throw py::type_error("Call: ins, rows and cols are required");
  const void* in[kMaxArity] = {};
  const int count = as_ptrs(ins, "ins", in);
  if (count != f.arity)
    throw py::value_error(std::string("Call: functor ") + f.name + " takes " + std::to_string(f.arity) +
                          " inputs, got " + std::to_string(count));
  if (n_grads > f.arity)
    throw py::value_error(std::string("Call: functor ") + f.name + " has " + std::to_string(f.arity) + " inputs, got " +
                          std::to_string(n_grads) + " gradients");
  for (int q = 0; q < count; ++q) a.in[q] = in[q];
  set_params(a.functor, params, a);
  if (a.rows < 0 || a.cols < 0) throw py::value_error("Call: rows and cols must be >= 0");
  if (c.device != 0 && c.device != 1) throw py::value_error("Call: device must be 0 (CPU) or 1 (CUDA)");
  return c;
}

void run_one(Call& c) {
  MapReduceArgs a = c.a;
  a.totals = c.want_totals ? c.totals : nullptr;
  if (c.device == 0) {
    cpu::map_reduce(a);
  } else {
    const cuda::DeviceGuard guard(c.device_id);
    cuda::map_reduce(a, reinterpret_cast<void*>(c.stream));
  }
}

// THE entry point: a Call or a sequence of Calls, in order, with the GIL released.
void run_calls(const py::object& calls) {
  std::vector<Call*> v;
  if (py::isinstance<Call>(calls)) {
    v.push_back(&calls.cast<Call&>());
  } else {
    for (py::handle c : calls) v.push_back(&c.cast<Call&>());
  }
  py::gil_scoped_release nogil;
  for (Call* c : v) run_one(*c);
}

// run_call(**fields): builds a Call from keywords (no dict), runs it as run() does and
// returns it (for its totals, and for a recording composition). A raw vectorcall
// function: the hot path of the compositions that no plan serves pays no pybind11
// argument dispatch.
PyObject* run_call(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  try {
    if (nargs != 0) throw py::type_error("run_call: every field by keyword");
    Fields f;
    f.args = args;
    f.kwnames = kwnames;
    Call c = make_call(f);
    {
      py::gil_scoped_release nogil;
      run_one(c);
    }
    return py::cast(std::move(c), py::return_value_policy::move).release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef kRunCallDef = {"run_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&run_call)),
                           METH_FASTCALL | METH_KEYWORDS,
                           "run_call(**fields) -> Call: Call(**fields), run (the GIL released) and returned."};

py::dict call_params(const Call& c) {
  const FunctorInfo& f = kFunctors[c.a.functor];
  py::dict d;
  const double real[3] = {c.a.pa, c.a.pb, c.a.pc};
  for (int q = 0; q < 3; ++q)
    if (const char* n = slot_name(f.params, q)) d[n] = real[q];
  if (f.params.mode) d[f.params.mode] = c.a.mode;
  return d;
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

// ---- PlanCache: recorded compositions replayed on new tensors --------------------------

// Where a recorded pointer comes from: nothing, input k or output k (0 the value,
// 1 + j gradient j of the composition's result).
struct Ref {
  int8_t kind = 0;  // 0 none, 1 input, 2 output
  int8_t index = 0;
};

struct Step {
  MapReduceArgs a;  // pointers cleared: bound from the refs on each run
  Ref in[kMaxArity], grad[kMaxArity];
  Ref out_value, out_rows, out_elems, out_rows_raw, table, index, row_weight;
};

struct Plan {
  uint64_t hash;
  py::object key;
  int dtype;
  std::vector<std::vector<int64_t>> in_shapes;
  std::vector<std::vector<int64_t>> out_shapes;  // [0] the value, [1 + j] gradient j
  std::vector<int> out_like;                     // the input an output has the shape of (-1: none)
  std::vector<char> out_present;                 // gradient j returned (else None)
  bool grads_empty;                              // the result's gradients are ()
  std::vector<Step> steps;
  int64_t work;
};

inline void mix(uint64_t& h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
}

// A hash of a key made of str, int, float, bool, None, tuples, lists and dicts (a dict's
// items in order); false for anything else (no plan for that call).
bool hash_key(PyObject* o, uint64_t& h) {
  if (PyUnicode_Check(o) || PyLong_Check(o) || PyFloat_Check(o) || o == Py_None) {
    const Py_hash_t x = PyObject_Hash(o);
    if (x == -1) return PyErr_Clear(), false;
    mix(h, static_cast<uint64_t>(x));
    return true;
  }
  if (PyTuple_Check(o) || PyList_Check(o)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    mix(h, static_cast<uint64_t>(n) ^ (PyList_Check(o) ? 0x5bd1e995ULL : 0));
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!hash_key(PySequence_Fast_GET_ITEM(o, i), h)) return false;
    return true;
  }
  if (PyDict_Check(o)) {
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    mix(h, 0x27d4eb2dULL + static_cast<uint64_t>(PyDict_Size(o)));
    while (PyDict_Next(o, &pos, &k, &v))
      if (!hash_key(k, h) || !hash_key(v, h)) return false;
    return true;
  }
  return false;
}

// The inputs of a call: 1-8 plain CPU float tensors of one dtype (read_input), and the
// hash of (key, dtype, shapes). False: no plan can serve or record this call.
bool read_call(const Torch& t, py::handle key, py::handle arrays, std::vector<Input>& in, uint64_t& h) {
  PyObject* arr = arrays.ptr();
  if (!sequence(arr)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(arr);
  if (n < 1 || n > 8) return false;
  in.resize(static_cast<size_t>(n));
  h = 0;
  if (!hash_key(key.ptr(), h)) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    Input& x = in[static_cast<size_t>(i)];
    if (!read_input(t, PySequence_Fast_GET_ITEM(arr, i), x)) return false;
    if (x.code != in[0].code) return false;
    mix(h, static_cast<uint64_t>(x.shape.size()));
    for (int64_t s : x.shape) mix(h, static_cast<uint64_t>(s));
  }
  mix(h, static_cast<uint64_t>(in[0].code));
  return true;
}

class PlanCache {
 public:
  static constexpr size_t kMaxPlans = 1024;  // then start afresh (keys with NaN never match)

  // The cached plan's result (value, grads) for these arrays, or None: run the Python path.
  py::object run(py::handle key, py::handle arrays) {
    const Torch* t = torch_objects();
    if (t == nullptr) return py::none();
    std::vector<Input> in;
    uint64_t h;
    if (!read_call(*t, key, arrays, in, h)) return py::none();
    const Plan* plan = find(h, key, in);
    if (plan == nullptr) return py::none();
    // Outputs, then the calls with their pointers bound (local copies: the GIL is released
    // while they run, and another thread may add plans meanwhile).
    const size_t n_out = plan->out_shapes.size();
    std::vector<void*> optr(n_out, nullptr);
    py::object value =
        alloc(*t, in[static_cast<size_t>(std::max(plan->out_like[0], 0))], plan->out_shapes[0], &optr[0]);
    py::tuple grads(plan->grads_empty ? 0 : n_out - 1);
    for (size_t j = 1; j < n_out && !plan->grads_empty; ++j) {
      if (plan->out_present[j]) {
        const int like = plan->out_like[j];
        grads[j - 1] = alloc(*t, in[static_cast<size_t>(like < 0 ? 0 : like)], plan->out_shapes[j], &optr[j]);
      } else {
        grads[j - 1] = py::none();
      }
    }
    std::vector<MapReduceArgs> calls;
    calls.reserve(plan->steps.size());
    const auto bind = [&](const Ref& r) -> void* {
      if (r.kind == 1) return in[static_cast<size_t>(r.index)].ptr;
      if (r.kind == 2) return optr[static_cast<size_t>(r.index)];
      return nullptr;
    };
    for (const Step& s : plan->steps) {
      MapReduceArgs a = s.a;
      for (int q = 0; q < kMaxArity; ++q) {
        a.in[q] = bind(s.in[q]);
        a.grad[q] = bind(s.grad[q]);
      }
      a.out_value = bind(s.out_value);
      a.out_rows = bind(s.out_rows);
      a.out_elems = bind(s.out_elems);
      a.out_rows_raw = bind(s.out_rows_raw);
      a.table = bind(s.table);
      a.index = bind(s.index);
      a.row_weight = bind(s.row_weight);
      calls.push_back(a);
    }
    run_all(calls, plan->work);
    return py::make_tuple(value, grads);
  }

  // Records the plan of a composition that just ran on `arrays` and returned `result`
  // ((value, grads)) by running `calls` (the Calls it ran, in order). Refuses (returns
  // false) whatever it could not replay exactly: inputs that are not plain CPU tensors
  // of one dtype, aliased buffers, a call on CUDA or asking for totals (the Python path
  // used the data), a pointer that is neither an input nor an output (a scratch or a
  // derived array).
  bool add(py::handle key, py::handle arrays, py::handle calls, py::handle result) {
    const Torch* t = torch_objects();
    if (t == nullptr) return false;
    Plan p;
    std::vector<Input> in;
    if (!read_call(*t, key, arrays, in, p.hash)) return false;
    if (find(p.hash, key, in) != nullptr) return true;
    PyObject* res = result.ptr();
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2) return false;
    PyObject* gs = PyTuple_GET_ITEM(res, 1);
    if (!PyTuple_Check(gs)) return false;
    const Py_ssize_t n_grads = PyTuple_GET_SIZE(gs);
    std::vector<Input> out(static_cast<size_t>(n_grads + 1));
    p.out_present.assign(out.size(), 1);
    if (!read_input(*t, PyTuple_GET_ITEM(res, 0), out[0], false, true)) return false;
    for (Py_ssize_t j = 0; j < n_grads; ++j) {
      PyObject* g = PyTuple_GET_ITEM(gs, j);
      if (g == Py_None) {
        p.out_present[static_cast<size_t>(j + 1)] = 0;
      } else if (!read_input(*t, g, out[static_cast<size_t>(j + 1)], false, true)) {
        return false;
      }
    }
    std::vector<void*> seen;
    for (const Input& x : in) seen.push_back(x.ptr);
    for (size_t j = 0; j < out.size(); ++j) {
      if (!p.out_present[j]) continue;
      if (out[j].code != in[0].code) return false;
      seen.push_back(out[j].ptr);
    }
    for (size_t i = 0; i < seen.size(); ++i)
      for (size_t j = i + 1; j < seen.size(); ++j)
        if (seen[i] == seen[j]) return false;  // aliased: a slot would be ambiguous
    const auto ref = [&](const void* ptr, Ref& r) -> bool {
      r = Ref{};
      if (ptr == nullptr) return true;
      for (size_t i = 0; i < in.size(); ++i)
        if (in[i].ptr == ptr) return r = Ref{1, static_cast<int8_t>(i)}, true;
      for (size_t j = 0; j < out.size(); ++j)
        if (p.out_present[j] && out[j].ptr == ptr) return r = Ref{2, static_cast<int8_t>(j)}, true;
      return false;
    };
    p.work = 0;
    for (py::handle h : calls) {
      if (!py::isinstance<Call>(h)) return false;
      const Call& c = h.cast<const Call&>();
      if (c.device != 0 || c.want_totals) return false;
      Step s{};
      s.a = c.a;
      bool ok = true;
      for (int q = 0; q < kMaxArity; ++q) ok = ok && ref(c.a.in[q], s.in[q]) && ref(c.a.grad[q], s.grad[q]);
      ok = ok && ref(c.a.out_value, s.out_value) && ref(c.a.out_rows, s.out_rows) && ref(c.a.out_elems, s.out_elems) &&
           ref(c.a.out_rows_raw, s.out_rows_raw) && ref(c.a.table, s.table) && ref(c.a.index, s.index) &&
           ref(c.a.row_weight, s.row_weight);
      if (!ok) return false;
      for (int q = 0; q < kMaxArity; ++q) s.a.in[q] = s.a.grad[q] = nullptr;
      s.a.out_value = s.a.out_rows = s.a.out_elems = s.a.out_rows_raw = nullptr;
      s.a.table = s.a.index = s.a.row_weight = nullptr;
      s.a.totals = nullptr;
      p.work += c.a.rows * c.a.cols * kFunctors[c.a.functor].arity;
      p.steps.push_back(s);
    }
    if (p.steps.empty()) return false;
    p.key = py::reinterpret_borrow<py::object>(key);
    p.dtype = in[0].code;
    for (const Input& x : in) p.in_shapes.push_back(x.shape);
    p.grads_empty = n_grads == 0;
    for (size_t j = 0; j < out.size(); ++j) {
      p.out_shapes.push_back(p.out_present[j] ? out[j].shape : std::vector<int64_t>{});
      int like = -1;
      for (size_t i = 0; i < in.size() && like < 0; ++i)
        if (in[i].shape == out[j].shape) like = static_cast<int>(i);
      p.out_like.push_back(like);
    }
    if (count_ >= kMaxPlans) clear();
    plans_[p.hash].push_back(std::move(p));
    ++count_;
    return true;
  }

  void clear() {
    plans_.clear();
    count_ = 0;
  }
  size_t size() const { return count_; }

 private:
  const Plan* find(uint64_t h, py::handle key, const std::vector<Input>& in) const {
    auto it = plans_.find(h);
    if (it == plans_.end()) return nullptr;
    for (const Plan& p : it->second) {
      if (p.dtype != in[0].code || p.in_shapes.size() != in.size()) continue;
      bool same = true;
      for (size_t i = 0; i < in.size() && same; ++i) same = p.in_shapes[i] == in[i].shape;
      if (!same) continue;
      const int eq = PyObject_RichCompareBool(p.key.ptr(), key.ptr(), Py_EQ);
      if (eq < 0) PyErr_Clear();
      if (eq == 1) return &p;
    }
    return nullptr;
  }

  std::unordered_map<uint64_t, std::vector<Plan>> plans_;
  size_t count_ = 0;
};

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
  if (!sequence(arr) || !PyTuple_Check(gof)) return py::none();
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
  MapReduceArgs a{};
  try {
    set_params(functor, params.ptr(), a);  // by name, as a Call
  } catch (const py::type_error&) {
    return py::none();  // the Python path raises it
  }
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
  a.functor = functor;
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

void bind_plan(py::module_& m) {
  using namespace genloss;
  py::class_<Call>(m, "Call", "One map_reduce engine call; every field by name (engine.h MapReduceArgs).")
      .def(py::init([](const py::kwargs& kw) {
        Fields f;
        f.dict = kw.ptr();
        return make_call(f);
      }))
      .def_property_readonly("functor", [](const Call& c) { return std::string(kFunctors[c.a.functor].name); })
      .def_property_readonly("params", &call_params)
      .def_property_readonly("rows", [](const Call& c) { return c.a.rows; })
      .def_property_readonly("cols", [](const Call& c) { return c.a.cols; })
      .def_property_readonly("value_scale", [](const Call& c) { return c.a.value_scale; })
      .def_property_readonly("grad_scale", [](const Call& c) { return c.a.grad_scale; })
      .def_property_readonly("totals", [](const Call& c) -> py::object {
        if (!c.want_totals) return py::none();
        return py::make_tuple(c.totals[0], c.totals[1]);
      });
  m.add_object("run_call", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&kRunCallDef, nullptr, nullptr)));
  m.def("run", &run_calls, py::arg("calls"),
        "Run a Call or a sequence of Calls in order, with the GIL released (the one entry point of map_reduce).");
  py::dict params;
  for (int i = 0; i < kNumFunctors; ++i) params[kFunctors[i].name] = param_tuple(kFunctors[i]);
  m.attr("FUNCTOR_PARAMS") = params;
  py::dict slots;  // (a, b, c, mode) -> name or None: the positional form of older callers
  for (int i = 0; i < kNumFunctors; ++i) {
    py::list names;
    for (int q = 0; q < 4; ++q) {
      const char* n = slot_name(kFunctors[i].params, q);
      names.append(n ? py::object(py::str(n)) : py::object(py::none()));
    }
    slots[kFunctors[i].name] = py::tuple(names);
  }
  m.attr("FUNCTOR_SLOTS") = slots;
  py::class_<PlanCache>(m, "PlanCache", "Recorded compositions, replayed on new plain CPU torch tensors.")
      .def(py::init<>())
      .def("run", &PlanCache::run, py::arg("key"), py::arg("arrays"),
           "(value, grads) from the cached plan of (key, dtype, shapes), or None: run the Python path.")
      .def("add", &PlanCache::add, py::arg("key"), py::arg("arrays"), py::arg("calls"), py::arg("result"),
           "Record the Calls a composition ran on arrays as a plan; False: not replayable.")
      .def("clear", &PlanCache::clear)
      .def("__len__", &PlanCache::size);
  m.def("fast_table_rows", &table_rows, py::arg("arrays"), py::arg("functor"), py::arg("grad_of"), py::arg("params"),
        py::arg("table"), py::arg("stride"), py::arg("t"), py::arg("weights"), py::arg("reduction"),
        py::arg("need_grad"), py::arg("per_sample_mean"),
        "A per-step-table loss on plain CPU torch tensors in one call; None: use the Python path.");
  m.attr("HOST_CACHE_MIN_BYTES") = kHostCacheMinBytes;
}
