// plan.cpp — the one way Python runs the engine (map_reduce and its kernels), and the
// small-call fast path.
//
// 1. ``Call`` (genloss._C.Call): one typed engine call with named fields. Its ``kind`` is
//    map_reduce (the default) or one of the engine's kernels (row_scale, col_sum,
//    col_broadcast, row_lse, gmm, mmd), whose fields are their Args structs' (engine.h,
//    mmd.h) by name. Functor parameters go by the names the functor declares (ParamNames in
//    ops/*.h, exported as _C.FUNCTOR_PARAMS); a wrong or missing name is a TypeError
//    naming the functor and its parameters. ``run(call or calls)`` is the one entry point:
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
//    need_grad), the Python path runs and records its Calls and the arrays it allocates;
//    ``add`` turns their pointers into SLOTS (input k, output k, scratch k: an allocation
//    it does not return, allocated afresh on every run) for these input shapes and dtype. Later
//    calls with the same key, dtype and shapes bind the new tensors in C++ and run
//    the same calls (same functors, scales and order: the same bits), without
//    re-running the Python composition. Whenever anything is unusual (another array
//    type, a subclass, CUDA, strides, an empty batch, an unknown key, anything the
//    plan cannot replay) ``run`` returns None and the caller runs the Python path,
//    which raises the error or handles the case: every error message keeps one home,
//    in Python. The shapes are part of the key, so every shape check the Python path
//    made when it recorded holds for every call the plan serves.
//
// 3. Guards: a composition whose Python path reads the data (diffusion's timestep range,
//    the weights' sign, the table rows used, a NaN value that names an input) records
//    each such check with its plan (_engine.guard): ``run`` re-runs them on the new
//    tensors, before the calls (inputs) or after them (the value), and returns None
//    when one fails, so the Python path runs, raises and names the argument.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu_config.h"
#include "cpu_half.h"
#include "genloss/engine.h"
#include "genloss/mmd.h"
#include "genloss/ot.h"
#include "kinds.h"
#include "knn.h"
#include "quant_cpu.h"

namespace py = pybind11;

#ifdef GENLOSS_CUDA_EMULATOR
namespace genloss_emulated {  // cuda/emulator/bridge.cpp
void run_emulated(int kind, const void* a, const void* k, size_t a_bytes, size_t k_bytes);
}
namespace genloss_emulator {  // cuda/emulator/emulator.cpp
uint64_t launch_count();
}
#endif

namespace genloss {

py::capsule cached_empty(const std::vector<int64_t>& shape, int dtype);  // host_cache.cpp

#ifdef GENLOSS_CUDA_EMULATOR
// The host emulation of the CUDA engine (cuda/emulator/, a test build's option): while on,
// every CPU call runs on the CUDA engine's kernels instead, so the suite checks them.
std::atomic<bool> g_emulate{false};
#endif

using cpu::kHostCacheMinBytes;  // outputs from the output cache from this size on

namespace {

struct Torch {
  PyObject* tensor_type = nullptr;  // torch.Tensor (exact type only: no subclasses)
  PyObject* f32 = nullptr;          // torch.float32
  PyObject* f64 = nullptr;          // torch.float64
  PyObject* f16 = nullptr;          // torch.float16
  PyObject* bf16 = nullptr;         // torch.bfloat16
  PyObject* i64 = nullptr;          // torch.int64
  PyObject* i32 = nullptr;          // torch.int32
  PyObject* empty_like = nullptr;   // torch.empty_like
  PyObject* from_dlpack = nullptr;  // torch._C._from_dlpack
  PyObject* dtype_key = nullptr;    // "dtype" (new_empty's keyword)
  // 0-d float32 / float64 CPU tensors: empty_like of one is the cheapest new scalar result
  // (~0.4 us less than new_empty(()), whose size argument torch parses on every call)
  PyObject* scalar[2] = {nullptr, nullptr};
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
  t.f16 = PyObject_GetAttrString(torch, "float16");
  t.bf16 = PyObject_GetAttrString(torch, "bfloat16");
  t.dtype_key = PyUnicode_InternFromString("dtype");
  t.i64 = PyObject_GetAttrString(torch, "int64");
  t.i32 = PyObject_GetAttrString(torch, "int32");
  t.empty_like = PyObject_GetAttrString(torch, "empty_like");
  t.from_dlpack = c ? PyObject_GetAttrString(c, "_from_dlpack") : nullptr;
  Py_XDECREF(c);
  PyObject* empty = PyObject_GetAttrString(torch, "empty");
  for (int k = 0; k < 2 && empty != nullptr && t.f32 != nullptr && t.f64 != nullptr; ++k) {
    PyObject* args = Py_BuildValue("(())");
    PyObject* kw = Py_BuildValue("{s:O}", "dtype", k == 0 ? t.f32 : t.f64);
    if (args != nullptr && kw != nullptr) t.scalar[k] = PyObject_Call(empty, args, kw);
    Py_XDECREF(args);
    Py_XDECREF(kw);
  }
  Py_XDECREF(empty);
  if (!t.tensor_type || !t.f32 || !t.f64 || !t.f16 || !t.bf16 || !t.dtype_key || !t.i64 || !t.i32 || !t.empty_like ||
      !t.from_dlpack || !t.scalar[0] || !t.scalar[1]) {
    PyErr_Clear();
    return nullptr;
  }
  ready = true;  // kept for the life of the process (torch is never unloaded)
  return &t;
}

struct Input {
  PyObject* obj = nullptr;
  void* ptr = nullptr;
  int code = -1;  // float: the engine's DType (0 f32, 1 f64, 2 f16, 3 bf16); integer: 0 int64, 1 int32
  bool integer = false;
  std::vector<int64_t> shape;
  int64_t rows = 0, cols = 0, numel = 0;
};

size_t elem_bytes(int code, bool integer) {
  if (integer) return code == 0 ? 8 : 4;
  return code == kFloat64 ? 8 : code == kFloat32 ? 4 : 2;
}

PyObject* float_dtype(const Torch& t, int code) {
  PyObject* const by_code[] = {t.f32, t.f64, t.f16, t.bf16};
  return by_code[code];
}
size_t itemsize(const Input& x) {
  return elem_bytes(x.code, x.integer);
}

bool call_bool(PyObject* o, PyObject* method, bool& out) {
  PyObject* r = PyObject_CallMethodNoArgs(o, method);
  if (r == nullptr) return PyErr_Clear(), false;
  out = r == Py_True;
  Py_DECREF(r);
  return true;
}

// Fills `in` if `o` is a plain, contiguous, non-negated CPU torch.Tensor of a float dtype
// (want kFloat), int64/int32 (kInt) or either (kAny), with at least one dimension and one
// element. Returns false for anything else (the caller falls back; no Python error is left set).
enum Want { kFloat, kInt, kAny };

bool read_input(const Torch& t, PyObject* o, Input& in, Want want = kFloat, bool allow_scalar = false) {
  if (reinterpret_cast<PyObject*>(Py_TYPE(o)) != t.tensor_type) return false;
  Names& n = names();
  PyObject* dt = PyObject_GetAttr(o, n.dtype);
  if (dt == nullptr) return PyErr_Clear(), false;
  int code = -1;
  bool integer = false;
  if (want != kInt)
    for (int c = kFloat32; c <= kBFloat16 && code < 0; ++c)
      if (dt == float_dtype(t, c)) code = c;
  if (code < 0 && want != kFloat) {
    code = dt == t.i64 ? 0 : dt == t.i32 ? 1 : -1;
    integer = true;
  }
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
  if (reinterpret_cast<uintptr_t>(in.ptr) % elem_bytes(code, integer) != 0) return false;
  in.obj = o;
  in.code = code;
  in.integer = integer;
  in.rows = nd == 0 ? 1 : in.shape[0];
  in.numel = numel;
  in.cols = numel / in.rows;
  return true;
}

// A new CPU tensor of `like`'s dtype, or of float dtype `code` (-1: like's; a 16-bit call's
// float32 value): `shape` (empty: 0-d); float outputs of 4 MiB or more from the output cache,
// as _engine.empty (so a gradient block is reused step after step).
// Sets *ptr. Throws on a Python error (allocation failure).
py::object alloc(const Torch& t, const Input& like, const std::vector<int64_t>& shape, void** ptr, int code = -1) {
  const bool same = code < 0 || code == like.code;
  if (code < 0) code = like.code;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  PyObject* out = nullptr;
  if (!like.integer && cpu::huge_pages() &&
      n * static_cast<int64_t>(elem_bytes(code, false)) >= kHostCacheMinBytes) {  // as _engine.empty
    py::capsule cap = cached_empty(shape, code);
    out = PyObject_CallOneArg(t.from_dlpack, cap.ptr());
  } else if (same && shape == like.shape) {
    out = PyObject_CallOneArg(t.empty_like, like.obj);
  } else if (shape.empty() && !like.integer && code <= kFloat64) {
    out = PyObject_CallOneArg(t.empty_like, t.scalar[code]);
  } else {
    PyObject* sh = PyTuple_New(static_cast<Py_ssize_t>(shape.size()));
    if (sh == nullptr) throw py::error_already_set();
    for (size_t d = 0; d < shape.size(); ++d)
      PyTuple_SET_ITEM(sh, static_cast<Py_ssize_t>(d), PyLong_FromLongLong(shape[d]));
    if (same) {
      out = PyObject_CallMethodOneArg(like.obj, names().new_empty, sh);
    } else {  // like.new_empty(shape, dtype=...)
      PyObject* method = PyObject_GetAttr(like.obj, names().new_empty);
      PyObject* kw = method ? PyDict_New() : nullptr;
      PyObject* args = kw && PyDict_SetItem(kw, t.dtype_key, float_dtype(t, code)) == 0 ? PyTuple_Pack(1, sh) : nullptr;
      out = args ? PyObject_Call(method, args, kw) : nullptr;
      Py_XDECREF(args);
      Py_XDECREF(kw);
      Py_XDECREF(method);
    }
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

// The row functors of kind row_map (engine.h GENLOSS_ROW_FUNCTORS, ops/flow.h).
struct RowFunctorInfo {
  const char* name;
  int n_in, n_table, n_out;
  ParamNames params;
};

const RowFunctorInfo kRowFunctors[] = {
#define GENLOSS_INFO(id, type) {#id + 1, type::n_in, type::n_table, type::n_out, param_names<type>()},
    GENLOSS_ROW_FUNCTORS(GENLOSS_INFO)
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
//
// Besides map_reduce the engine has a few fixed-purpose kernels (engine.h RowScaleArgs,
// ColSumArgs, ColBroadcastArgs, RowLseArgs, GmmArgs; mmd.h MmdArgs). Each is a KIND of the one Call, built
// from named fields and run by the same entry points (run, run_call), so that a composition
// using them is recorded and replayed by the plan cache like any other. A kind's fields
// are its Args struct's, described once below (name, type, place, default): building a
// Call, reading its fields back and the plan's pointer slots all read that description.
// The kinds, the union of their Args and the CUDA dispatch are in kinds.h.

// kTSize: an int64 that must be >= 0; kTReals: a sequence of reals, kept by the Call
// (Call::reals) and pointed to when it runs (mmd's bandwidths, with their count).
enum FieldType : int { kTInt, kTSize, kTReal, kTAddr, kTFlag, kTReals };

struct KernelField {
  const char* name;
  FieldType type;
  size_t offset;  // in the kind's Args struct, so in KernelArgs
  bool required;
  double fallback;  // a real field's value when not given (every other type: 0)
};

#define GENLOSS_FIELD(S, member, type, required, fallback) \
  KernelField {                                            \
    #member, type, offsetof(S, member), required, fallback \
  }
const KernelField kRowScaleFields[] = {
    GENLOSS_FIELD(RowScaleArgs, dtype, kTInt, false, 0),  GENLOSS_FIELD(RowScaleArgs, x, kTAddr, false, 0),
    GENLOSS_FIELD(RowScaleArgs, coef, kTAddr, false, 0),  GENLOSS_FIELD(RowScaleArgs, out, kTAddr, true, 0),
    GENLOSS_FIELD(RowScaleArgs, rows, kTSize, true, 0),   GENLOSS_FIELD(RowScaleArgs, cols, kTSize, true, 0),
    GENLOSS_FIELD(RowScaleArgs, scale, kTReal, false, 1), GENLOSS_FIELD(RowScaleArgs, accumulate, kTFlag, false, 0)};
const KernelField kColSumFields[] = {
    GENLOSS_FIELD(ColSumArgs, dtype, kTInt, false, 0), GENLOSS_FIELD(ColSumArgs, x, kTAddr, true, 0),
    GENLOSS_FIELD(ColSumArgs, out, kTAddr, true, 0),   GENLOSS_FIELD(ColSumArgs, rows, kTSize, true, 0),
    GENLOSS_FIELD(ColSumArgs, cols, kTSize, true, 0),  GENLOSS_FIELD(ColSumArgs, scale, kTReal, false, 1)};
const KernelField kColBroadcastFields[] = {GENLOSS_FIELD(ColBroadcastArgs, dtype, kTInt, false, 0),
                                           GENLOSS_FIELD(ColBroadcastArgs, v, kTAddr, true, 0),
                                           GENLOSS_FIELD(ColBroadcastArgs, out, kTAddr, true, 0),
                                           GENLOSS_FIELD(ColBroadcastArgs, rows, kTSize, true, 0),
                                           GENLOSS_FIELD(ColBroadcastArgs, cols, kTSize, true, 0),
                                           GENLOSS_FIELD(ColBroadcastArgs, scale, kTReal, false, 1),
                                           GENLOSS_FIELD(ColBroadcastArgs, accumulate, kTFlag, false, 0)};
const KernelField kRowLseFields[] = {
    GENLOSS_FIELD(RowLseArgs, dtype, kTInt, false, 0),        GENLOSS_FIELD(RowLseArgs, logits, kTAddr, true, 0),
    GENLOSS_FIELD(RowLseArgs, labels, kTAddr, false, 0),      GENLOSS_FIELD(RowLseArgs, label_type, kTInt, false, 0),
    GENLOSS_FIELD(RowLseArgs, mode, kTInt, true, 0),          GENLOSS_FIELD(RowLseArgs, index, kTSize, false, 0),
    GENLOSS_FIELD(RowLseArgs, rows, kTSize, true, 0),         GENLOSS_FIELD(RowLseArgs, K, kTSize, true, 0),
    GENLOSS_FIELD(RowLseArgs, value_scale, kTReal, false, 1), GENLOSS_FIELD(RowLseArgs, out_value, kTAddr, false, 0),
    GENLOSS_FIELD(RowLseArgs, accumulate, kTFlag, false, 0),  GENLOSS_FIELD(RowLseArgs, out_rows, kTAddr, false, 0),
    GENLOSS_FIELD(RowLseArgs, grad_scale, kTReal, false, 1),  GENLOSS_FIELD(RowLseArgs, grad, kTAddr, false, 0)};
const KernelField kGmmFields[] = {GENLOSS_FIELD(GmmArgs, dtype, kTInt, false, 0),
                                  GENLOSS_FIELD(GmmArgs, x, kTAddr, true, 0),
                                  GENLOSS_FIELD(GmmArgs, logits, kTAddr, true, 0),
                                  GENLOSS_FIELD(GmmArgs, means, kTAddr, true, 0),
                                  GENLOSS_FIELD(GmmArgs, logvars, kTAddr, true, 0),
                                  GENLOSS_FIELD(GmmArgs, N, kTSize, true, 0),
                                  GENLOSS_FIELD(GmmArgs, K, kTSize, true, 0),
                                  GENLOSS_FIELD(GmmArgs, D, kTSize, true, 0),
                                  GENLOSS_FIELD(GmmArgs, value_scale, kTReal, false, 1),
                                  GENLOSS_FIELD(GmmArgs, out_value, kTAddr, false, 0),
                                  GENLOSS_FIELD(GmmArgs, out_rows, kTAddr, false, 0),
                                  GENLOSS_FIELD(GmmArgs, resp, kTAddr, false, 0),
                                  GENLOSS_FIELD(GmmArgs, row_weights, kTAddr, false, 0),
                                  GENLOSS_FIELD(GmmArgs, grad_scale, kTReal, false, 1),
                                  GENLOSS_FIELD(GmmArgs, grad_x, kTAddr, false, 0),
                                  GENLOSS_FIELD(GmmArgs, grad_logits, kTAddr, false, 0),
                                  GENLOSS_FIELD(GmmArgs, grad_means, kTAddr, false, 0),
                                  GENLOSS_FIELD(GmmArgs, grad_logvars, kTAddr, false, 0)};
const KernelField kMmdFields[] = {GENLOSS_FIELD(MmdArgs, dtype, kTInt, false, 0),
                                  GENLOSS_FIELD(MmdArgs, kernel, kTInt, true, 0),
                                  GENLOSS_FIELD(MmdArgs, estimator, kTInt, true, 0),
                                  GENLOSS_FIELD(MmdArgs, x, kTAddr, true, 0),
                                  GENLOSS_FIELD(MmdArgs, y, kTAddr, true, 0),
                                  GENLOSS_FIELD(MmdArgs, N, kTSize, true, 0),
                                  GENLOSS_FIELD(MmdArgs, M, kTSize, true, 0),
                                  GENLOSS_FIELD(MmdArgs, D, kTSize, true, 0),
                                  GENLOSS_FIELD(MmdArgs, bandwidths, kTReals, false, 0),
                                  GENLOSS_FIELD(MmdArgs, out_value, kTAddr, false, 0),
                                  GENLOSS_FIELD(MmdArgs, grad_scale, kTReal, false, 1),
                                  GENLOSS_FIELD(MmdArgs, grad_x, kTAddr, false, 0),
                                  GENLOSS_FIELD(MmdArgs, grad_y, kTAddr, false, 0)};
const KernelField kRowMapFields[] = {
    GENLOSS_FIELD(RowMapArgs, dtype, kTInt, false, 0),  GENLOSS_FIELD(RowMapArgs, functor, kTInt, true, 0),
    GENLOSS_FIELD(RowMapArgs, a, kTReal, false, 0),     GENLOSS_FIELD(RowMapArgs, b, kTReal, false, 0),
    GENLOSS_FIELD(RowMapArgs, c, kTReal, false, 0),     GENLOSS_FIELD(RowMapArgs, mode, kTInt, false, 0),
    GENLOSS_FIELD(RowMapArgs, x0, kTAddr, true, 0),     GENLOSS_FIELD(RowMapArgs, x1, kTAddr, false, 0),
    GENLOSS_FIELD(RowMapArgs, x2, kTAddr, false, 0),    GENLOSS_FIELD(RowMapArgs, x3, kTAddr, false, 0),
    GENLOSS_FIELD(RowMapArgs, wide, kTInt, false, 0),   GENLOSS_FIELD(RowMapArgs, rows, kTSize, true, 0),
    GENLOSS_FIELD(RowMapArgs, table, kTAddr, false, 0), GENLOSS_FIELD(RowMapArgs, out0, kTAddr, false, 0),
    GENLOSS_FIELD(RowMapArgs, out1, kTAddr, false, 0)};
const KernelField kVqFields[] = {GENLOSS_FIELD(cpu::VqArgs, dtype, kTInt, false, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, z, kTAddr, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, codebook, kTAddr, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, N, kTSize, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, K, kTSize, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, D, kTSize, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, beta, kTReal, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, z_q, kTAddr, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, indices, kTAddr, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, out_commitment, kTAddr, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, out_codebook, kTAddr, true, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, grad_z, kTAddr, false, 0),
                                 GENLOSS_FIELD(cpu::VqArgs, grad_codebook, kTAddr, false, 0)};
const KernelField kVqEmaFields[] = {GENLOSS_FIELD(cpu::VqEmaArgs, dtype, kTInt, false, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, index_dtype, kTInt, false, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, z, kTAddr, false, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, indices, kTAddr, false, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, N, kTSize, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, K, kTSize, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, D, kTSize, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, cluster_size, kTAddr, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, embed_sum, kTAddr, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, decay, kTReal, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, eps, kTReal, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, out_cluster_size, kTAddr, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, out_embed_sum, kTAddr, true, 0),
                                    GENLOSS_FIELD(cpu::VqEmaArgs, out_codebook, kTAddr, true, 0)};
const KernelField kLfqFields[] = {GENLOSS_FIELD(cpu::LfqArgs, dtype, kTInt, false, 0),
                                  GENLOSS_FIELD(cpu::LfqArgs, z, kTAddr, true, 0),
                                  GENLOSS_FIELD(cpu::LfqArgs, N, kTSize, true, 0),
                                  GENLOSS_FIELD(cpu::LfqArgs, d, kTSize, true, 0),
                                  GENLOSS_FIELD(cpu::LfqArgs, inv_temperature, kTReal, true, 0),
                                  GENLOSS_FIELD(cpu::LfqArgs, sample_weight, kTReal, false, 1),
                                  GENLOSS_FIELD(cpu::LfqArgs, codebook_weight, kTReal, false, 1),
                                  GENLOSS_FIELD(cpu::LfqArgs, out_value, kTAddr, true, 0),
                                  GENLOSS_FIELD(cpu::LfqArgs, terms, kTAddr, false, 0),
                                  GENLOSS_FIELD(cpu::LfqArgs, grad_z, kTAddr, false, 0)};
const KernelField kKnnFields[] = {
    GENLOSS_FIELD(KnnArgs, dtype, kTInt, false, 0),   GENLOSS_FIELD(KnnArgs, real, kTAddr, true, 0),
    GENLOSS_FIELD(KnnArgs, fake, kTAddr, true, 0),    GENLOSS_FIELD(KnnArgs, N, kTSize, true, 0),
    GENLOSS_FIELD(KnnArgs, M, kTSize, true, 0),       GENLOSS_FIELD(KnnArgs, D, kTSize, true, 0),
    GENLOSS_FIELD(KnnArgs, k, kTSize, true, 0),       GENLOSS_FIELD(KnnArgs, real_r2, kTAddr, true, 0),
    GENLOSS_FIELD(KnnArgs, fake_r2, kTAddr, true, 0), GENLOSS_FIELD(KnnArgs, counts, kTAddr, true, 0)};
const KernelField kSinkhornFields[] = {
    GENLOSS_FIELD(SinkhornArgs, dtype, kTInt, false, 0),   GENLOSS_FIELD(SinkhornArgs, x, kTAddr, true, 0),
    GENLOSS_FIELD(SinkhornArgs, y, kTAddr, true, 0),       GENLOSS_FIELD(SinkhornArgs, N, kTSize, true, 0),
    GENLOSS_FIELD(SinkhornArgs, M, kTSize, true, 0),       GENLOSS_FIELD(SinkhornArgs, D, kTSize, true, 0),
    GENLOSS_FIELD(SinkhornArgs, p, kTReal, true, 0),       GENLOSS_FIELD(SinkhornArgs, eps, kTReals, true, 0),
    GENLOSS_FIELD(SinkhornArgs, tol, kTReal, true, 0),     GENLOSS_FIELD(SinkhornArgs, max_iter, kTSize, true, 0),
    GENLOSS_FIELD(SinkhornArgs, debias, kTFlag, false, 0), GENLOSS_FIELD(SinkhornArgs, value, kTAddr, true, 0),
    GENLOSS_FIELD(SinkhornArgs, f, kTAddr, false, 0),      GENLOSS_FIELD(SinkhornArgs, g, kTAddr, false, 0),
    GENLOSS_FIELD(SinkhornArgs, grad_x, kTAddr, false, 0), GENLOSS_FIELD(SinkhornArgs, grad_y, kTAddr, false, 0),
    GENLOSS_FIELD(SinkhornArgs, rounds, kTAddr, false, 0), GENLOSS_FIELD(SinkhornArgs, change, kTAddr, false, 0)};
const KernelField kAssignFields[] = {
    GENLOSS_FIELD(AssignArgs, dtype, kTInt, false, 0), GENLOSS_FIELD(AssignArgs, x0, kTAddr, true, 0),
    GENLOSS_FIELD(AssignArgs, x1, kTAddr, true, 0),    GENLOSS_FIELD(AssignArgs, B, kTSize, true, 0),
    GENLOSS_FIELD(AssignArgs, D, kTSize, true, 0),     GENLOSS_FIELD(AssignArgs, perm, kTAddr, true, 0)};
#undef GENLOSS_FIELD

struct KindInfo {
  const KernelField* fields;
  int n;
};
template <size_t N>
constexpr KindInfo info(const KernelField (&f)[N]) {
  return {f, static_cast<int>(N)};
}
const KindInfo kKinds[kNumKinds] = {
    {nullptr, 0},     info(kRowScaleFields), info(kColSumFields),   info(kColBroadcastFields), info(kRowLseFields),
    info(kGmmFields), info(kMmdFields),      info(kRowMapFields),   info(kVqFields),           info(kVqEmaFields),
    info(kLfqFields), info(kKnnFields),      info(kSinkhornFields), info(kAssignFields)};
constexpr int kMaxKernelFields = 18;  // gmm's (row_map: 15)
constexpr int kMaxKernelAddrs = 12;   // gmm's address fields

struct Call {
  int kind = kMapReduce;
  MapReduceArgs a{};  // kind map_reduce; a.totals is set only while it runs
  KernelArgs k;       // any other kind
  int device = 0;     // 0 CPU, 1 CUDA
  int device_id = 0;
  std::uintptr_t stream = 0;
  bool want_totals = false;
  double totals[2] = {0.0, 0.0};
  std::vector<double> reals;  // a kTReals field's values (k points to them only while it runs)
  // workspace=: the caller's allocator of CUDA scratch, alloc(device_id, nbytes) ->
  // (address, owner) (_engine.py). Borrowed from run_call's arguments, so used and cleared
  // within run_call; a Call built by _C.Call has none (its scratch falls back).
  PyObject* alloc = nullptr;
  std::uintptr_t workspace = 0;  // the workspace's address and size, set only while it runs
  size_t workspace_bytes = 0;
  Call() { std::memset(&k, 0, sizeof k); }
};

// `k` with its kTReals field pointed at `reals` (a Call moves: the pointer is set per run).
KernelArgs with_reals(int kind, const KernelArgs& k, const std::vector<double>& reals) {
  KernelArgs r = k;
  if (kind == kMmd) {
    r.mmd.bandwidths = reals.data();
    r.mmd.nbw = static_cast<int>(reals.size());
  }
  if (kind == kSinkhorn) {
    r.sinkhorn.eps = reals.data();
    r.sinkhorn.n_eps = static_cast<int64_t>(reals.size());
  }
  return r;
}

char* field_at(KernelArgs& k, const KernelField& f) {
  return reinterpret_cast<char*>(&k) + f.offset;
}
const char* field_at(const KernelArgs& k, const KernelField& f) {
  return reinterpret_cast<const char*>(&k) + f.offset;
}

// An address field of a kernel kind (read or written through memcpy: the Args member is a
// `const void*` or a `void*`).
const void* addr_of(const KernelArgs& k, const KernelField& f) {
  const void* p;
  std::memcpy(&p, field_at(k, f), sizeof p);
  return p;
}
void set_addr(KernelArgs& k, const KernelField& f, const void* p) {
  std::memcpy(field_at(k, f), &p, sizeof p);
}

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
  kKind,
  kTotalsOut,
  kParamFrom,
  kParamScale,
  kOffsetFrom,
  kOffsetScale,
  kWorkspace,
  kValueF32,
  kNumFields
};
const char* const kFieldNames[kNumFields] = {
    "functor",      "params",      "ins",          "grads",       "dtype",      "device",      "device_id",
    "stream",       "rows",        "cols",         "value_scale", "grad_scale", "grad_offset", "out_value",
    "out_rows",     "out_elems",   "out_rows_raw", "accumulate",  "totals",     "table",       "table_rows",
    "table_stride", "index",       "index_type",   "row_weight",  "kind",       "totals_out",  "param_from",
    "param_scale",  "offset_from", "offset_scale", "workspace",   "value_f32"};

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

// The kind a Call's fields name (kind="..."; absent: map_reduce).
int kind_in(Fields f) {
  static PyObject* key = PyUnicode_InternFromString("kind");
  PyObject* v = nullptr;
  if (f.dict != nullptr) {
    v = PyDict_GetItemWithError(f.dict, key);  // borrowed
    if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
  } else if (f.kwnames != nullptr) {
    // Keywords written in Python source are interned: identity first; the comparison
    // only for a 4-character name (a map_reduce call, which names no kind, pays no more).
    const Py_ssize_t n = PyTuple_GET_SIZE(f.kwnames);
    for (Py_ssize_t i = 0; i < n && v == nullptr; ++i)
      if (PyTuple_GET_ITEM(f.kwnames, i) == key) v = f.args[i];
    for (Py_ssize_t i = 0; i < n && v == nullptr; ++i) {
      PyObject* k = PyTuple_GET_ITEM(f.kwnames, i);
      if (PyUnicode_GET_LENGTH(k) == 4 && PyUnicode_Compare(k, key) == 0) v = f.args[i];
    }
    PyErr_Clear();
  }
  if (v == nullptr) return kMapReduce;
  const char* s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : nullptr;
  if (s == nullptr) PyErr_Clear();
  for (int i = 0; i < kNumKinds && s != nullptr; ++i)
    if (std::strcmp(s, kKindNames[i]) == 0) return i;
  std::string kinds;
  for (int i = 0; i < kNumKinds; ++i) kinds += (i ? ", " : "") + std::string(kKindNames[i]);
  throw py::value_error("Call: unknown kind " + std::string(py::repr(v)) + " (kinds: " + kinds + ")");
}

// The field of kind `kind` a keyword names (interned names: identity first), or -1.
int kernel_field(int kind, PyObject* k) {
  static PyObject* names[kNumKinds][kMaxKernelFields];
  static bool ready = false;
  if (!ready) {
    for (int i = 1; i < kNumKinds; ++i)
      for (int j = 0; j < kKinds[i].n; ++j) names[i][j] = PyUnicode_InternFromString(kKinds[i].fields[j].name);
    ready = true;
  }
  const int n = kKinds[kind].n;
  for (int j = 0; j < n; ++j)
    if (names[kind][j] == k) return j;
  for (int j = 0; j < n; ++j)
    if (PyUnicode_Check(k) && PyUnicode_Compare(k, names[kind][j]) == 0) return j;
  PyErr_Clear();
  return -1;
}

std::string kernel_field_list(int kind) {
  std::string s;
  for (int j = 0; j < kKinds[kind].n; ++j) s += (j ? ", " : "") + std::string(kKinds[kind].fields[j].name);
  return s;
}

// The checks of the kinds from kVectorQuantize on (the sizes their kernels assume, on the CPU and
// CUDA alike; the ops' own checks, with the argument names users know, run first in python/genloss/native).
void check_kind(const std::string& who, const Call& c, int dtype) {
  const bool f64_only = c.kind == kSinkhorn || c.kind == kAssignment;
  if (f64_only ? dtype != kFloat64 : dtype != kFloat32 && dtype != kFloat64)
    throw py::type_error(who +
                         (f64_only ? ": dtype must be 1 (float64)" : ": dtype must be 0 or 1 (float32, float64)"));
  auto need = [&](bool ok, const char* what) {
    if (!ok) throw py::value_error(who + ": " + what);
  };
  switch (c.kind) {
    case kVectorQuantize: {
      const cpu::VqArgs& a = c.k.vector_quantize;
      return need(a.N >= 1 && a.K >= 1 && a.D >= 1, "N, K and D must be >= 1");
    }
    case kVqEmaUpdate: {
      const cpu::VqEmaArgs& a = c.k.vq_ema_update;
      need(a.K >= 1 && a.D >= 1, "K and D must be >= 1");
      need(a.index_dtype == 0 || a.index_dtype == 1, "index_dtype must be 0 (int64) or 1 (int32)");
      return need(a.N == 0 || (a.z != nullptr && a.indices != nullptr), "z and indices are needed when N >= 1");
    }
    case kLfqEntropy: {
      const cpu::LfqArgs& a = c.k.lfq_entropy;
      return need(a.N >= 1 && a.d >= 1 && a.d <= cpu::kLfqMaxBits, "N >= 1 and 1 <= d <= 20 (LFQ_MAX_BITS)");
    }
    case kKnnPrdc: {
      const KnnArgs& a = c.k.knn_prdc;
      return need(a.D >= 1 && a.k >= 1 && a.k < a.N && a.k < a.M, "need D >= 1 and 1 <= k < N, M");
    }
    case kSinkhorn: {
      const SinkhornArgs& a = c.k.sinkhorn;
      need(a.N >= 1 && a.M >= 1 && a.D >= 1, "N, M and D must be >= 1");
      need(!c.reals.empty(), "eps must hold at least one value");
      return need(a.max_iter >= 1, "max_iter must be >= 1");
    }
    default: {
      const AssignArgs& a = c.k.assignment;
      return need(a.B >= 1 && a.D >= 1, "B and D must be >= 1");
    }
  }
}

// Call(kind="row_lse", logits=..., ...): a kernel kind, every field of its Args struct by
// name (engine.h says what each does), plus kind, device, device_id and stream. An
// unknown or missing field is a TypeError, a bad value a ValueError, each naming the kind.
Call make_kernel_call(int kind, Fields fields) {
  Call c;
  c.kind = kind;
  const KindInfo& info = kKinds[kind];
  const std::string who = std::string("Call(kind='") + kKindNames[kind] + "')";
  if (kind == kSinkhorn || kind == kAssignment) {  // float64 only: dtype may be left out
    const int f64 = kFloat64;
    std::memcpy(&c.k, &f64, sizeof f64);
  }
  uint32_t given = 0;
  PyObject *k, *v;
  while (fields.next(&k, &v)) {
    const int common = field_of(k);
    if (common == kKind) continue;
    if (common == kDevice) {
      c.device = static_cast<int>(as_int(v, "device"));
      continue;
    }
    if (common == kDeviceId) {
      c.device_id = static_cast<int>(as_int(v, "device_id"));
      continue;
    }
    if (common == kStream) {
      c.stream = as_ptr(v, "stream");
      continue;
    }
    if (common == kWorkspace) {
      c.alloc = v;
      continue;
    }
    const int j = kernel_field(kind, k);
    if (j < 0)
      throw py::type_error(who + ": unknown field " + std::string(py::repr(k)) +
                           " (its fields: " + kernel_field_list(kind) + ", device, device_id, stream, workspace)");
    const KernelField& f = info.fields[j];
    given |= 1u << j;
    char* p = field_at(c.k, f);
    switch (f.type) {
      case kTInt: {
        const int i = static_cast<int>(as_int(v, f.name));
        std::memcpy(p, &i, sizeof i);
        break;
      }
      case kTSize: {
        const int64_t i = as_int(v, f.name);
        if (i < 0) throw py::value_error(who + ": " + f.name + " must be >= 0, got " + std::to_string(i));
        std::memcpy(p, &i, sizeof i);
        break;
      }
      case kTReal: {
        const double d = as_real(v, f.name);
        std::memcpy(p, &d, sizeof d);
        break;
      }
      case kTAddr:
        set_addr(c.k, f, reinterpret_cast<const void*>(as_ptr(v, f.name)));
        break;
      case kTFlag: {
        const int b = PyObject_IsTrue(v);
        if (b < 0) throw py::error_already_set();
        std::memcpy(p, &b, sizeof b);
        break;
      }
      case kTReals:
        if (!PyTuple_Check(v) && !PyList_Check(v))
          throw py::type_error(who + ": " + f.name + " must be a list of real numbers");
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(v); ++i)
          c.reals.push_back(as_real(PySequence_Fast_GET_ITEM(v, i), f.name));
        break;
    }
  }
  for (int j = 0; j < info.n; ++j) {
    const KernelField& f = info.fields[j];
    if (given & (1u << j)) {
      if (f.required && f.type == kTAddr && addr_of(c.k, f) == nullptr)
        throw py::value_error(who + ": " + f.name + " must be an address, got 0");
      continue;
    }
    if (f.required) throw py::type_error(who + ": missing field '" + f.name + "'");
    if (f.type == kTReal) std::memcpy(field_at(c.k, f), &f.fallback, sizeof(double));
  }
  int dtype;
  std::memcpy(&dtype, &c.k, sizeof dtype);  // every Args struct starts with its dtype
  if (dtype < 0 || dtype > 3)
    throw py::value_error(who + ": dtype must be 0-3 (engine.h), got " + std::to_string(dtype));
#ifdef GENLOSS_CUDA_EMULATOR
  const bool cpu_kernels = !g_emulate.load(std::memory_order_relaxed);  // the CUDA kernels take 16-bit data
#else
  const bool cpu_kernels = true;
#endif
  if (c.device == 0 && cpu_kernels && (dtype == kFloat16 || dtype == kBFloat16) && kind != kRowScale &&
      kind != kColSum && kind != kColBroadcast)
    throw py::type_error(std::string("float16/bfloat16 inputs on the CPU are computed by the elementwise kernels "
                                     "only (map_reduce, row_scale, col_sum, col_broadcast), and this op also runs ") +
                         kKindNames[kind] +
                         ": pass float32 or float64 (genloss.torch computes float16/bfloat16 CPU tensors in float32)");
  if (own_checks(kind)) check_kind(who, c, dtype);
  if (kind == kRowLse) {
    const RowLseArgs& a = c.k.row_lse;
    if (a.mode < ops::kLseLabel || a.mode > ops::kLseRealLabel)
      throw py::value_error(who + ": mode must be 0-4 (ops::RowLseMode), got " + std::to_string(a.mode));
    const bool labeled = a.mode == ops::kLseLabel || a.mode == ops::kLseRealLabel;
    if (labeled && a.labels == nullptr)
      throw py::value_error(who + ": mode " + std::to_string(a.mode) + " needs labels");
    if (labeled && a.label_type != 0 && a.label_type != 1)
      throw py::value_error(who + ": label_type must be 0 (int64) or 1 (int32)");
    if (a.mode == ops::kLseIndex && a.index >= a.K)
      throw py::value_error(who + ": index must be < K = " + std::to_string(a.K) + ", got " + std::to_string(a.index));
  }
  if (kind == kRowMap) {
    const RowMapArgs& a = c.k.row_map;
    if (dtype != kFloat32 && dtype != kFloat64) throw py::type_error(who + ": dtype must be 0 or 1 (float32, float64)");
    if (a.functor < 0 || a.functor >= kNumRowFunctors)
      throw py::value_error(who + ": functor must be 0-" + std::to_string(kNumRowFunctors - 1) +
                            " (_C.ROW_FUNCTORS), got " + std::to_string(a.functor));
    const RowFunctorInfo& f = kRowFunctors[a.functor];
    const void* const xs[kMaxArity] = {a.x0, a.x1, a.x2, a.x3};
    for (int q = f.n_in; q < kMaxArity; ++q)
      if (xs[q] != nullptr)
        throw py::value_error(who + ": row functor " + f.name + " takes " + std::to_string(f.n_in) + " inputs");
    if (a.table != nullptr && f.n_table == 0)
      throw py::value_error(who + ": row functor " + f.name + " writes no table");
    if (a.out0 != nullptr && f.n_out < 1) throw py::value_error(who + ": row functor " + f.name + " writes no output");
    if (a.out1 != nullptr && f.n_out < 2)
      throw py::value_error(who + ": row functor " + f.name + " writes one output (out0)");
  }
  if (kind == kMmd) {
    const MmdArgs& a = c.k.mmd;
    if (a.kernel < kMmdRbf || a.kernel > kMmdEnergy)
      throw py::value_error(who + ": kernel must be 0-3 (MmdKernel), got " + std::to_string(a.kernel));
    if (a.estimator < kMmdUnbiased || a.estimator > kMmdLinear)
      throw py::value_error(who + ": estimator must be 0-2 (MmdEstimator), got " + std::to_string(a.estimator));
    if (a.N < 1 || a.M < 1 || a.D < 1) throw py::value_error(who + ": N, M and D must be >= 1");
    if ((a.kernel == kMmdRbf || a.kernel == kMmdImq) && c.reals.empty())
      throw py::value_error(who + ": kernels 0 and 1 (rbf, imq) need bandwidths");
  }
  if (c.device != 0 && c.device != 1) throw py::value_error(who + ": device must be 0 (CPU) or 1 (CUDA)");
  return c;
}

Call make_call(Fields fields) {
  const int kind = kind_in(fields);
  if (kind != kMapReduce) return make_kernel_call(kind, fields);
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
      case kKind:
        break;  // map_reduce (kind_in)
      case kTotalsOut:
        a.totals_out = reinterpret_cast<double*>(as_ptr(v, "totals_out"));
        break;
      case kParamFrom:
        a.param_from = reinterpret_cast<const double*>(as_ptr(v, "param_from"));
        break;
      case kParamScale:
        a.param_scale = as_real(v, "param_scale");
        break;
      case kOffsetFrom:
        a.offset_from = reinterpret_cast<const double*>(as_ptr(v, "offset_from"));
        break;
      case kOffsetScale:
        a.offset_scale = as_real(v, "offset_scale");
        break;
      case kWorkspace:
        c.alloc = v;
        break;
      case kValueF32: {
        const int b = PyObject_IsTrue(v);
        if (b < 0) throw py::error_already_set();
        a.value_f32 = b;
        break;
      }
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
  if (a.param_from && param_key(a.functor, 0) == nullptr)  // it replaces the first parameter at run time
    throw py::type_error(std::string("Call: param_from: functor ") + f.name + " has no parameter");
  if (a.rows < 0 || a.cols < 0) throw py::value_error("Call: rows and cols must be >= 0");
  if (c.device != 0 && c.device != 1) throw py::value_error("Call: device must be 0 (CPU) or 1 (CUDA)");
  if (a.dtype < 0 || a.dtype > 3)
    throw py::value_error("Call: dtype must be 0-3 (engine.h), got " + std::to_string(a.dtype));
  if (a.value_f32 && a.dtype == kFloat64) throw py::value_error("Call: value_f32 needs a float32/16-bit dtype");
  return c;
}

// One kernel on the CPU, by its kind (on the emulated CUDA engine while _C.cuda_emulator is on).
void run_cpu(int kind, const MapReduceArgs& a, const KernelArgs& k) {
#ifdef GENLOSS_CUDA_EMULATOR
  if (g_emulate.load(std::memory_order_relaxed))
    return genloss_emulated::run_emulated(kind, &a, &k, sizeof(MapReduceArgs), sizeof(KernelArgs));
  int dtype;
  std::memcpy(&dtype, &k, sizeof dtype);  // a Call built while emulating, run after: make_kernel_call's check
  if (kind != kMapReduce && kind != kRowScale && kind != kColSum && kind != kColBroadcast &&
      (dtype == kFloat16 || dtype == kBFloat16))
    throw std::invalid_argument(std::string(kKindNames[kind]) + ": float16/bfloat16 data needs the CUDA emulator on");
#endif
  switch (kind) {
    case kMapReduce:
      return cpu::map_reduce(a);
    case kRowScale:
      return cpu::row_scale(k.row_scale);
    case kColSum:
      return cpu::col_sum(k.col_sum);
    case kColBroadcast:
      return cpu::col_broadcast(k.col_broadcast);
    case kRowLse:
      return cpu::row_lse(k.row_lse);
    case kGmm:
      return cpu::gmm(k.gmm);
    case kMmd:
      return cpu::mmd(k.mmd);
    case kRowMap:
      return cpu::row_map(k.row_map);
    case kVectorQuantize:
      return cpu::vector_quantize(k.vector_quantize);
    case kVqEmaUpdate:
      return cpu::vq_ema_update(k.vq_ema_update);
    case kLfqEntropy:
      return cpu::lfq_entropy(k.lfq_entropy);
    case kKnnPrdc:
      return cpu::knn_prdc(k.knn_prdc);
    case kSinkhorn:
      return cpu::sinkhorn(k.sinkhorn);
    default:
      return cpu::assignment(k.assignment);
  }
}

// The caller's allocator for the Scratches that a call's workspace cannot serve (engine.h,
// ScratchMore): alloc(device_id, nbytes) -> (address, owner) with the GIL taken for that
// moment; the owners live until the run_call that made this returns (stream order makes
// that safe, as for the workspace itself). Null on any failure: the Scratch then falls back.
struct MoreScratch {
  PyObject* alloc;  // borrowed from run_call's arguments
  int device_id;
  std::vector<py::object> owners;
};
// alloc(device_id, nbytes) -> (address, owner), GIL held: the pair, and the address in *addr;
// a Python error (alloc raised, or not such a pair) is raised as such.
py::object call_alloc(PyObject* alloc, int device_id, size_t bytes, std::uintptr_t* addr) {
  py::object r =
      py::reinterpret_steal<py::object>(PyObject_CallFunction(alloc, "in", device_id, static_cast<Py_ssize_t>(bytes)));
  if (!r) throw py::error_already_set();
  if (!PyTuple_Check(r.ptr()) || PyTuple_GET_SIZE(r.ptr()) != 2)
    throw py::type_error("Call: workspace(device_id, nbytes) must return (address, owner)");
  *addr = as_ptr(PyTuple_GET_ITEM(r.ptr(), 0), "workspace address");
  return r;
}

void* more_scratch(void* ctx, size_t bytes) {
  auto* m = static_cast<MoreScratch*>(ctx);
  py::gil_scoped_acquire gil;
  // A failure (e.g. torch's out-of-memory) is dropped here, GIL held: the Scratch falls back to
  // cudaMallocAsync, whose own error is the one raised if that fails too.
  try {
    std::uintptr_t p = 0;
    m->owners.push_back(call_alloc(m->alloc, m->device_id, bytes, &p));
    return reinterpret_cast<void*>(p);
  } catch (const std::exception&) {
    return nullptr;
  }
}

void run_one(Call& c, MoreScratch* more = nullptr) {
  MapReduceArgs a = c.a;
  a.totals = c.want_totals ? c.totals : nullptr;
  const KernelArgs k = with_reals(c.kind, c.k, c.reals);
  if (c.device == 0) {
    try {
      run_cpu(c.kind, a, k);
    } catch (const std::invalid_argument& e) {  // a kernel's own check of the data (vq_ema_update's indices)
      throw std::invalid_argument(std::string(kKindNames[c.kind]) + ": " + e.what());
    }
  } else {
    const cuda::DeviceGuard guard(c.device_id);
    const cuda::Workspace workspace(reinterpret_cast<void*>(c.workspace), c.workspace_bytes,
                                    more ? &more_scratch : nullptr, more);
    run_cuda(c.kind, a, k, reinterpret_cast<void*>(c.stream));
  }
}

// The scratch bytes a CUDA call takes from its workspace (engine.cu's size functions,
// next to the kernels); 0: none, or a kind whose Scratches depend on its launcher's path
// (mmd, quant, knn, ot): each of those asks the caller's allocator itself (more_scratch).
size_t cuda_scratch_bytes(const Call& c) {
  switch (c.kind) {
    case kMapReduce:
      return cuda::map_reduce_scratch(c.a);
    case kColSum:
      return cuda::col_sum_scratch(c.k.col_sum);
    case kRowLse:
      return cuda::row_lse_scratch(c.k.row_lse);
    case kGmm:
      return cuda::gmm_scratch(c.k.gmm);
    default:
      return 0;
  }
}

// A CUDA call's workspace from the caller's allocator (workspace=alloc: alloc(device_id,
// nbytes) -> (address, owner)), with the GIL held, before the launch. The owner (a torch
// or CuPy array) is returned to be dropped AFTER the launch: the caller's allocator then
// reuses the bytes only for work queued after ours on the same stream (torch's caching
// allocator and CuPy's pool are stream-ordered), so there is no sync; while a CUDA graph
// is captured, torch allocates from the graph's private pool, which replay keeps.
py::object take_workspace(Call& c, PyObject* alloc) {
  if (c.device != 1 || alloc == nullptr || alloc == Py_None) return py::object();
  const size_t n = cuda_scratch_bytes(c);
  if (n == 0) return py::object();
  py::object r = call_alloc(alloc, c.device_id, n, &c.workspace);
  c.workspace_bytes = c.workspace ? n : 0;
  return r;
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
    PyObject* alloc = c.alloc;
    c.alloc = nullptr;  // borrowed from the arguments: never kept past this run_call
    const bool has_alloc = c.device == 1 && alloc != nullptr && alloc != Py_None;
    // both released after the launch (GIL held again), on every path
    const py::object owner = take_workspace(c, alloc);
    MoreScratch more{alloc, c.device_id, {}};
    {
      py::gil_scoped_release nogil;
      run_one(c, has_alloc ? &more : nullptr);
    }
    c.workspace = 0;
    c.workspace_bytes = 0;
    return py::cast(std::move(c), py::return_value_policy::move).release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
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

// A kernel kind's fields by name (map_reduce: None; its fields have their own properties).
py::object call_fields(const Call& c) {
  if (c.kind == kMapReduce) return py::none();
  py::dict d;
  const KindInfo& info = kKinds[c.kind];
  for (int j = 0; j < info.n; ++j) {
    const KernelField& f = info.fields[j];
    const char* p = field_at(c.k, f);
    switch (f.type) {
      case kTInt:
      case kTFlag: {
        int i;
        std::memcpy(&i, p, sizeof i);
        d[f.name] = f.type == kTFlag ? py::object(py::bool_(i != 0)) : py::object(py::int_(i));
        break;
      }
      case kTSize: {
        int64_t i;
        std::memcpy(&i, p, sizeof i);
        d[f.name] = i;
        break;
      }
      case kTReal: {
        double x;
        std::memcpy(&x, p, sizeof x);
        d[f.name] = x;
        break;
      }
      case kTAddr:
        d[f.name] = reinterpret_cast<std::uintptr_t>(addr_of(c.k, f));
        break;
      case kTReals:
        d[f.name] = py::tuple(py::cast(c.reals));
        break;
    }
  }
  return std::move(d);
}

bool sequence(PyObject* o) {
  return PyTuple_Check(o) || PyList_Check(o);
}

// One call of a plan, its pointers bound.
struct Bound {
  int kind;
  MapReduceArgs a;
  KernelArgs k;
};

// The kernels of one call: the GIL is released only when they take long enough to matter.
void run_all(const std::vector<Bound>& calls, int64_t work) {
  std::unique_ptr<py::gil_scoped_release> nogil;
  if (work >= (int64_t(1) << 16)) nogil = std::make_unique<py::gil_scoped_release>();
  for (const Bound& b : calls) run_cpu(b.kind, b.a, b.k);
}

// The elements a call reads, for run_all's GIL decision.
int64_t work_of(const Call& c) {
  switch (c.kind) {
    case kMapReduce:
      return c.a.rows * c.a.cols * kFunctors[c.a.functor].arity;
    case kRowScale:
      return c.k.row_scale.rows * c.k.row_scale.cols;
    case kColSum:
      return c.k.col_sum.rows * c.k.col_sum.cols;
    case kColBroadcast:
      return c.k.col_broadcast.rows * c.k.col_broadcast.cols;
    case kRowLse:
      return c.k.row_lse.rows * c.k.row_lse.K;
    case kGmm:
      return c.k.gmm.N * c.k.gmm.K * c.k.gmm.D;
    case kMmd:
      return (c.k.mmd.N + c.k.mmd.M) * (c.k.mmd.N + c.k.mmd.M) * c.k.mmd.D;
    case kRowMap:
      return c.k.row_map.rows;
    default:  // the quant and metrics kinds: long enough to release the GIL whatever their size
      return int64_t(1) << 62;
  }
}

// ---- PlanCache: recorded compositions replayed on new tensors --------------------------

// Where a recorded pointer comes from: nothing, input k, output k (0 the value, 1 + j
// gradient j of the composition's result) or scratch k (an array the composition allocated
// itself, _engine.empty, and does not return: col_sum's means, a penalty's coefficients).
struct Ref {
  int8_t kind = 0;  // 0 none, 1 input, 2 output, 3 scratch
  int8_t index = 0;
  int32_t offset = 0;  // bytes into a scratch array: a float64 slot (totals_out, param_from, offset_from)
};

struct Step {
  int kind;         // Kind
  MapReduceArgs a;  // map_reduce; pointers cleared: bound from the refs on each run
  KernelArgs k;     // another kind; pointers cleared likewise
  Ref in[kMaxArity], grad[kMaxArity];
  Ref out_value, out_rows, out_elems, out_rows_raw, table, index, row_weight;
  Ref totals_out, param_from, offset_from;  // scalars one call leaves for the next (float64 scratch)
  Ref addr[kMaxKernelAddrs];                // another kind: its address fields, in the order kKinds lists them
  std::vector<double> reals;                // its kTReals field (Call::reals)
};

// A check of the data that the Python path made while it recorded (_engine.guard), re-run
// on every call the plan serves. Each passes exactly when the Python path's check passes.
enum GuardKind {
  kIndexRange,    // int input `x`: every value in [0, limit)              (diffusion._timesteps)
  kRowsFinite,    // float64 (T, k) input `x`: rows int input `y` finite    (diffusion._finite_rows)
  kFinite,        // float input `x`: finite, and >= 0 when `nonnegative`   (diffusion._row_vector)
  kNoNaN,         // output `x` (after the calls): no NaN                    (_engine.check_if_nan)
  kUnitInterval,  // float input `x`: in [bound, 1] (bound >= 0)              (flow._times)
  kPositive,      // float input `x`: in (0, bound]                             (flow.denoiser_loss's sigma)
  kOrdered,       // float inputs `x`, `y`: 0 <= x < y row by row               (flow, iCT's noise levels)
  kWithin,        // float input `x`: in [-bound, bound]                        (discretized data in [-1, 1])
  kBounded,       // float input `x`: in [0, bound]                             (scm_loss's angles)
  kRowsNormal,    // scratch `x` (after the calls): no entry inf or < bound     (flow._norm_rows: no rescaling)
};

struct Guard {
  GuardKind kind;
  Ref x, y;
  int64_t limit = 0;
  bool nonnegative = false;
  double bound = 0.0;
};

// The engine's float and integer codes of an Input, as one: 0 f32, 1 f64, 2 f16, 3 bf16, 4 i64, 5 i32.
int kind_of(const Input& x) {
  return x.code + (x.integer ? 4 : 0);
}

struct Plan {
  uint64_t hash;
  py::object key;
  std::vector<int> in_kinds;  // kind_of each input
  std::vector<std::vector<int64_t>> in_shapes;
  std::vector<std::vector<int64_t>> out_shapes;      // [0] the value, [1 + j] gradient j
  std::vector<int> out_like;                         // the input an output takes its device (and maybe shape) from
  std::vector<int> out_code;                         // each output's float dtype (engine DType)
  std::vector<char> out_present;                     // gradient j returned (else None)
  bool grads_empty;                                  // the result's gradients are ()
  std::vector<std::vector<int64_t>> scratch_shapes;  // allocated afresh on every run
  std::vector<int> scratch_like;                     // the input it is allocated like
  std::vector<int> scratch_code;                     // its float dtype when no input has it, else -1
  std::vector<Step> steps;
  std::vector<Guard> guards;
  int64_t work;
};

inline void mix(uint64_t& h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
}

uint64_t float_bits(PyObject* o) {
  const double d = PyFloat_AS_DOUBLE(o);
  uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
}

// A hash of a key made of str, int, bool, float, None, tuples, lists and dicts (a dict's
// items in order; subclasses too); false for anything else (no plan for that call). Keys
// compare by same_key: equal types all the way down, floats by their bits (0.0 and -0.0
// are two keys, as they can give two signs of a zero gradient; True, 1 and 1.0 are three;
// a NaN matches its own bits).
bool hash_key(PyObject* o, uint64_t& h) {
  if (PyFloat_Check(o)) {
    mix(h, float_bits(o) ^ 0xf1f1ULL);
    return true;
  }
  if (PyUnicode_Check(o) || PyLong_Check(o) || o == Py_None) {
    const Py_hash_t x = PyObject_Hash(o);
    if (x == -1) return PyErr_Clear(), false;
    mix(h, static_cast<uint64_t>(x) ^ (PyBool_Check(o) ? 0xb001ULL : 0));
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

// Keys that hash_key accepted: equal types all the way down, floats bit for bit.
bool same_key(PyObject* a, PyObject* b) {
  if (a == b) return true;
  if (Py_TYPE(a) != Py_TYPE(b)) return false;
  if (PyFloat_Check(a)) return float_bits(a) == float_bits(b);
  if (PyUnicode_Check(a) || PyLong_Check(a)) {
    const int eq = PyObject_RichCompareBool(a, b, Py_EQ);
    return eq < 0 ? (PyErr_Clear(), false) : eq == 1;
  }
  if (PyTuple_Check(a) || PyList_Check(a)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(a);
    if (n != PySequence_Fast_GET_SIZE(b)) return false;
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!same_key(PySequence_Fast_GET_ITEM(a, i), PySequence_Fast_GET_ITEM(b, i))) return false;
    return true;
  }
  if (PyDict_Check(a)) {
    if (PyDict_Size(a) != PyDict_Size(b)) return false;
    PyObject *ka, *va, *kb, *vb;
    Py_ssize_t pa = 0, pb = 0;
    while (PyDict_Next(a, &pa, &ka, &va)) {
      if (!PyDict_Next(b, &pb, &kb, &vb)) return false;
      if (!same_key(ka, kb) || !same_key(va, vb)) return false;
    }
    return true;
  }
  return false;  // None is a singleton (a == b above)
}

// The inputs of a call: 1-8 plain CPU tensors (float or integer; the kinds and shapes are
// part of the plan's identity), and the hash of (key, kinds, shapes). False: no plan can
// serve or record this call.
bool read_call(const Torch& t, PyObject* key, PyObject* arr, std::vector<Input>& in, uint64_t& h) {
  if (!sequence(arr)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(arr);
  if (n < 1 || n > 8) return false;
  in.resize(static_cast<size_t>(n));
  h = 0;
  if (!hash_key(key, h)) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    Input& x = in[static_cast<size_t>(i)];
    if (!read_input(t, PySequence_Fast_GET_ITEM(arr, i), x, kAny)) return false;
    mix(h, static_cast<uint64_t>(x.shape.size()) * 4 + static_cast<uint64_t>(kind_of(x)));
    for (int64_t s : x.shape) mix(h, static_cast<uint64_t>(s));
  }
  return true;
}

// Scans a (n,) int64/int32 index for [0, limit).
template <class I>
bool indices_in_range(const void* p, int64_t n, int64_t limit) {
  const I* v = static_cast<const I*>(p);
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0 || static_cast<int64_t>(v[i]) >= limit) return false;
  return true;
}

// The data checks, on an array of any float storage type S (cpu_half.h's load widens the
// 16-bit ones exactly, so a check means the same in every dtype).
template <class S>
bool all_finite(const S* v, int64_t n, bool nonnegative) {
  for (int64_t i = 0; i < n; ++i) {
    const auto x = cpu::load(v[i]);
    if (!std::isfinite(x) || (nonnegative && x < 0)) return false;
  }
  return true;
}

template <class S>
bool any_nan(const S* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(cpu::load(v[i]))) return true;
  return false;
}

// Every value in [lo, hi] (NaN fails), and not 0 when `open_zero`.
template <class S>
bool in_interval(const S* v, int64_t n, double lo, double hi, bool open_zero) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(cpu::load(v[i]));
    if (!(x >= lo && x <= hi) || (open_zero && x == 0)) return false;
  }
  return true;
}

// No entry +inf or below `lo` (NaN passes: the Python path does not rescale a NaN row either).
template <class S>
bool rows_normal(const S* v, int64_t n, double lo) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(cpu::load(v[i]));
    if (x == HUGE_VAL || x < lo) return false;
  }
  return true;
}

// 0 <= x[i] < y[i] for every i (NaN fails), both of storage type S.
template <class S>
bool ordered(const S* x, const S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(cpu::load(x[i])), b = static_cast<double>(cpu::load(y[i]));
    if (!(a >= 0 && a < b)) return false;
  }
  return true;
}

// check(v) with v the float array `p` of engine DType `code`, typed by its storage type.
template <class Check>
bool by_dtype(int code, const void* p, const Check& check) {
  switch (code) {
    case kFloat32:
      return check(static_cast<const float*>(p));
    case kFloat64:
      return check(static_cast<const double*>(p));
    case kFloat16:
      return check(static_cast<const cpu::F16*>(p));
    default:
      return check(static_cast<const cpu::BF16*>(p));
  }
}

template <class I>
bool rows_finite(const double* table, int64_t cols, const void* index, int64_t n) {
  const I* v = static_cast<const I*>(index);
  for (int64_t r = 0; r < n; ++r)
    if (!all_finite(table + static_cast<int64_t>(v[r]) * cols, cols, false)) return false;
  return true;
}

// Guard g on the inputs `in`: true when the Python path's check passes. (A rows_finite
// guard runs after the index_range guard recorded before it, so its rows exist.)
bool pass(const Guard& g, const std::vector<Input>& in) {
  if (g.kind == kNoNaN || g.kind == kRowsNormal) return true;  // after the calls (on an output, a scratch)
  const Input& x = in[static_cast<size_t>(g.x.index)];
  switch (g.kind) {
    case kIndexRange:
      return x.code == 0 ? indices_in_range<int64_t>(x.ptr, x.numel, g.limit)
                         : indices_in_range<int32_t>(x.ptr, x.numel, g.limit);
    case kRowsFinite: {
      const Input& y = in[static_cast<size_t>(g.y.index)];
      const double* tab = static_cast<const double*>(x.ptr);
      return y.code == 0 ? rows_finite<int64_t>(tab, x.cols, y.ptr, y.numel)
                         : rows_finite<int32_t>(tab, x.cols, y.ptr, y.numel);
    }
    case kFinite:
      return by_dtype(x.code, x.ptr, [&](auto v) { return all_finite(v, x.numel, g.nonnegative); });
    case kUnitInterval:
      return by_dtype(x.code, x.ptr, [&](auto v) { return in_interval(v, x.numel, g.bound, 1.0, false); });
    case kPositive:
      return by_dtype(x.code, x.ptr, [&](auto v) { return in_interval(v, x.numel, 0.0, g.bound, true); });
    case kWithin:
      return by_dtype(x.code, x.ptr, [&](auto v) { return in_interval(v, x.numel, -g.bound, g.bound, false); });
    case kBounded:
      return by_dtype(x.code, x.ptr, [&](auto v) { return in_interval(v, x.numel, 0.0, g.bound, false); });
    case kOrdered: {
      const Input& y = in[static_cast<size_t>(g.y.index)];
      return by_dtype(x.code, x.ptr, [&](auto v) { return ordered(v, static_cast<decltype(v)>(y.ptr), x.numel); });
    }
    default:
      return true;
  }
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

class PlanCache {
 public:
  static constexpr size_t kMaxPlans = 1024;  // then start afresh

  // The cached plan's result (value, grads) for these arrays, or None: run the Python path.
  py::object run(PyObject* key, PyObject* arrays) {
    const Torch* t = torch_objects();
    if (t == nullptr) return py::none();
    std::vector<Input> in;
    uint64_t h;
    if (!read_call(*t, key, arrays, in, h)) return py::none();
    // A shared owner for the whole call: torch's allocations and run_all release the GIL, and
    // another thread's add() may clear() the cache (or grow this plan's bucket) meanwhile.
    const std::shared_ptr<const Plan> plan = find(h, key, in);
    if (plan == nullptr) return py::none();
    for (const Guard& g : plan->guards)
      if (!pass(g, in)) return py::none();
    // Outputs, then the calls with their pointers bound (local copies: the GIL is released
    // while they run, and another thread may add plans meanwhile).
    const size_t n_out = plan->out_shapes.size();
    std::vector<void*> optr(n_out, nullptr);
    py::object value =
        alloc(*t, in[static_cast<size_t>(plan->out_like[0])], plan->out_shapes[0], &optr[0], plan->out_code[0]);
    py::tuple grads(plan->grads_empty ? 0 : n_out - 1);
    for (size_t j = 1; j < n_out && !plan->grads_empty; ++j) {
      if (plan->out_present[j]) {
        grads[j - 1] =
            alloc(*t, in[static_cast<size_t>(plan->out_like[j])], plan->out_shapes[j], &optr[j], plan->out_code[j]);
      } else {
        grads[j - 1] = py::none();
      }
    }
    // Scratch arrays: fresh ones on every run (a run may overlap another on another thread
    // while the GIL is released). Small ones are slices of one block this run owns (a torch
    // allocation through its Python API costs more instructions than a batch-256 kernel);
    // large ones come from the same allocator as the Python path's (the output cache).
    const size_t n_scratch = plan->scratch_shapes.size();
    std::vector<py::object> scratch(n_scratch);
    std::vector<void*> sptr(n_scratch, nullptr);
    std::vector<size_t> offset(n_scratch, SIZE_MAX);
    size_t block = 0;
    for (size_t j = 0; j < n_scratch; ++j) {
      const Input& like = in[static_cast<size_t>(plan->scratch_like[j])];
      const int code = plan->scratch_code[j];
      const size_t bytes = static_cast<size_t>(numel_of(plan->scratch_shapes[j])) *
                           (code < 0 ? itemsize(like) : elem_bytes(code, false));
      if (bytes >= static_cast<size_t>(kHostCacheMinBytes)) {
        scratch[j] = alloc(*t, like, plan->scratch_shapes[j], &sptr[j], code);
      } else {
        offset[j] = block;
        block += (bytes + 63) / 64 * 64;  // 64-byte aligned slices
      }
    }
    const std::unique_ptr<void, decltype(&std::free)> arena(block ? std::aligned_alloc(64, block) : nullptr,
                                                            &std::free);
    if (block && !arena) throw std::bad_alloc();
    for (size_t j = 0; j < n_scratch; ++j)
      if (offset[j] != SIZE_MAX) sptr[j] = static_cast<char*>(arena.get()) + offset[j];
    std::vector<Bound> calls;
    calls.reserve(plan->steps.size());
    const auto bind = [&](const Ref& r) -> void* {
      if (r.kind == 1) return in[static_cast<size_t>(r.index)].ptr;
      if (r.kind == 2) return optr[static_cast<size_t>(r.index)];
      if (r.kind == 3) return static_cast<char*>(sptr[static_cast<size_t>(r.index)]) + r.offset;
      return nullptr;
    };
    std::vector<std::vector<double>> reals;  // copies: no pointer into the plan while the GIL is released
    reals.reserve(plan->steps.size());
    for (const Step& s : plan->steps) {
      reals.push_back(s.reals);
      Bound b{s.kind, s.a, with_reals(s.kind, s.k, reals.back())};
      if (s.kind == kMapReduce) {
        MapReduceArgs& a = b.a;
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
        a.totals_out = static_cast<double*>(bind(s.totals_out));
        a.param_from = static_cast<const double*>(bind(s.param_from));
        a.offset_from = static_cast<const double*>(bind(s.offset_from));
      } else {
        const KindInfo& info = kKinds[s.kind];
        for (int j = 0, q = 0; j < info.n; ++j)
          if (info.fields[j].type == kTAddr) set_addr(b.k, info.fields[j], bind(s.addr[q++]));
      }
      calls.push_back(b);
    }
    run_all(calls, plan->work);
    for (const Guard& g : plan->guards) {
      const size_t j = static_cast<size_t>(g.x.index);
      if (g.kind == kNoNaN) {
        const int64_t n = numel_of(plan->out_shapes[j]);
        if (by_dtype(plan->out_code[j], optr[j], [n](auto v) { return any_nan(v, n); })) return py::none();
      } else if (g.kind == kRowsNormal) {  // the Python path would have rescaled a row: it runs instead
        const int64_t n = numel_of(plan->scratch_shapes[j]);
        const int code =
            plan->scratch_code[j] < 0 ? in[static_cast<size_t>(plan->scratch_like[j])].code : plan->scratch_code[j];
        const double lo = g.bound;
        if (by_dtype(code, sptr[j], [n, lo](auto v) { return !rows_normal(v, n, lo); })) return py::none();
      }
    }
    return py::make_tuple(value, grads);
  }

  // Records the plan of a composition that just ran on `arrays` and returned `result`
  // ((value, grads)) by running `calls` (the Calls it ran, in order) after the checks of
  // the data `guards` (_engine.guard's tuples (kind, addresses, arg)); `allocs` are the
  // arrays it allocated itself (_engine.empty: uninitialised, so nothing of the Python
  // path's is in them). Refuses (returns false) whatever it could not replay exactly:
  // inputs that are not plain CPU tensors, aliased buffers, a call on CUDA or asking for
  // totals (the Python path used the data), a returned array that it did not allocate
  // (a derived array), a pointer that is neither an input nor one of its allocations (a
  // copy or another derived array). An allocation that is not returned is scratch: the
  // plan allocates it afresh on every run. Scalars that one call leaves for the next
  // (map_reduce's totals_out, param_from, offset_from) are float64 slots of a scratch array.
  //
  // Addresses identify buffers only while those buffers are alive: a scratch freed
  // before the composition ends, and an output later allocated at its address, would
  // make a call on the scratch look like a call on the output. The Recording
  // (_engine.py) therefore holds every array the composition made (allocations, copies)
  // until this returns, so no two buffers seen here can share an address.
  bool add(py::handle key, py::handle arrays, py::handle calls, py::handle result, py::handle guards,
           py::handle allocs) {
#ifdef GENLOSS_CUDA_EMULATOR
    // Calls made while emulating may hold what only the CUDA kernels take (16-bit row_lse,
    // gmm, mmd): such a plan would hand them to the CPU engine once the emulator is off.
    if (g_emulate.load(std::memory_order_relaxed)) return false;
#endif
    const Torch* t = torch_objects();
    if (t == nullptr) return false;
    Plan p;
    std::vector<Input> in;
    if (!read_call(*t, key.ptr(), arrays.ptr(), in, p.hash)) return false;
    if (find(p.hash, key.ptr(), in) != nullptr) return true;
    PyObject* res = result.ptr();
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2) return false;
    PyObject* gs = PyTuple_GET_ITEM(res, 1);
    if (!PyTuple_Check(gs)) return false;
    const Py_ssize_t n_grads = PyTuple_GET_SIZE(gs);
    std::vector<Input> out(static_cast<size_t>(n_grads + 1));
    p.out_present.assign(out.size(), 1);
    if (!read_input(*t, PyTuple_GET_ITEM(res, 0), out[0], kFloat, true)) return false;
    for (Py_ssize_t j = 0; j < n_grads; ++j) {
      PyObject* g = PyTuple_GET_ITEM(gs, j);
      if (g == Py_None) {
        p.out_present[static_cast<size_t>(j + 1)] = 0;
      } else if (!read_input(*t, g, out[static_cast<size_t>(j + 1)], kFloat, true)) {
        return false;
      }
    }
    // The composition's own allocations (an unreadable one, e.g. empty, cannot be named by
    // any call below: a call that uses it is refused).
    std::vector<Input> made;
    if (!allocs.is_none()) {
      for (py::handle h : allocs) {
        Input a;
        if (read_input(*t, h.ptr(), a, kAny, true)) made.push_back(a);
      }
    }
    std::vector<void*> seen;
    for (const Input& x : in) seen.push_back(x.ptr);
    for (size_t j = 0; j < out.size(); ++j) {
      if (!p.out_present[j]) continue;
      seen.push_back(out[j].ptr);
      // Every returned array is one the composition allocated (its whole extent, its dtype):
      // the plan allocates it in its place and the calls alone fill it.
      bool fresh = false;
      for (const Input& a : made)
        fresh = fresh || (a.ptr == out[j].ptr && a.numel == out[j].numel && kind_of(a) == kind_of(out[j]));
      if (!fresh) return false;
    }
    std::vector<const Input*> scratch;  // the allocations not returned
    for (const Input& a : made) {
      bool returned = false;
      for (size_t j = 0; j < out.size(); ++j) returned = returned || (p.out_present[j] && out[j].ptr == a.ptr);
      if (!returned) {
        seen.push_back(a.ptr);
        scratch.push_back(&a);
      }
    }
    for (size_t i = 0; i < seen.size(); ++i)
      for (size_t j = i + 1; j < seen.size(); ++j)
        if (seen[i] == seen[j]) return false;           // aliased: a slot would be ambiguous
    std::vector<int> scratch_slot(scratch.size(), -1);  // its index in p.scratch_shapes, once used
    // `slot`: a float64 scalar inside a float64 scratch array (totals_out, param_from,
    // offset_from) rather than the start of an array.
    const auto ref = [&](const void* ptr, Ref& r, bool slot = false) -> bool {
      r = Ref{};
      if (ptr == nullptr) return true;
      for (size_t i = 0; i < in.size() && !slot; ++i)
        if (in[i].ptr == ptr) return r = Ref{1, static_cast<int8_t>(i)}, true;
      for (size_t j = 0; j < out.size() && !slot; ++j)
        if (p.out_present[j] && out[j].ptr == ptr) return r = Ref{2, static_cast<int8_t>(j)}, true;
      for (size_t j = 0; j < scratch.size(); ++j) {
        const Input& sc = *scratch[j];
        const auto at =
            static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(ptr) - reinterpret_cast<std::uintptr_t>(sc.ptr));
        if (slot ? sc.integer || sc.code != kFloat64 || at < 0 || at % 8 != 0 || at >= sc.numel * 8 : at != 0) continue;
        if (scratch_slot[j] < 0) {
          if (p.scratch_shapes.size() >= 64) return false;
          int like = -1, code = -1;  // an input of its dtype (alloc takes the dtype from one)
          for (size_t i = 0; i < in.size() && like < 0; ++i)
            if (kind_of(in[i]) == kind_of(*scratch[j])) like = static_cast<int>(i);
          for (size_t i = 0; i < in.size() && like < 0 && !scratch[j]->integer; ++i)
            if (!in[i].integer) like = static_cast<int>(i), code = scratch[j]->code;  // float64 coefficients
          if (like < 0) return false;
          scratch_slot[j] = static_cast<int>(p.scratch_shapes.size());
          p.scratch_shapes.push_back(scratch[j]->shape);
          p.scratch_like.push_back(like);
          p.scratch_code.push_back(code);
        }
        return r = Ref{3, static_cast<int8_t>(scratch_slot[j]), static_cast<int32_t>(at)}, true;
      }
      return false;
    };
    if (!guards.is_none()) {
      for (py::handle h : guards)
        if (!add_guard(h, ref, in, p)) return false;
    }
    p.work = 0;
    for (py::handle h : calls) {
      if (!py::isinstance<Call>(h)) return false;
      const Call& c = h.cast<const Call&>();
      // (totals read back to the host: not part of a plan; scalars passed between calls
      // through float64 scratch are)
      if (c.device != 0 || c.want_totals) return false;
      Step s{};
      s.kind = c.kind;
      s.a = c.a;
      s.k = c.k;
      s.reals = c.reals;
      bool ok = true;
      if (c.kind == kMapReduce) {
        for (int q = 0; q < kMaxArity; ++q) ok = ok && ref(c.a.in[q], s.in[q]) && ref(c.a.grad[q], s.grad[q]);
        ok = ok && ref(c.a.out_value, s.out_value) && ref(c.a.out_rows, s.out_rows) &&
             ref(c.a.out_elems, s.out_elems) && ref(c.a.out_rows_raw, s.out_rows_raw) && ref(c.a.table, s.table) &&
             ref(c.a.index, s.index) && ref(c.a.row_weight, s.row_weight) && ref(c.a.totals_out, s.totals_out, true) &&
             ref(c.a.param_from, s.param_from, true) && ref(c.a.offset_from, s.offset_from, true);
        for (int q = 0; q < kMaxArity; ++q) s.a.in[q] = s.a.grad[q] = nullptr;
        s.a.out_value = s.a.out_rows = s.a.out_elems = s.a.out_rows_raw = nullptr;
        s.a.table = s.a.index = s.a.row_weight = nullptr;
        s.a.totals_out = nullptr;
        s.a.param_from = s.a.offset_from = nullptr;
        s.a.totals = nullptr;
      } else {
        const KindInfo& info = kKinds[c.kind];
        for (int j = 0, q = 0; j < info.n && ok; ++j) {
          if (info.fields[j].type != kTAddr) continue;
          ok = ref(addr_of(c.k, info.fields[j]), s.addr[q++]);
          set_addr(s.k, info.fields[j], nullptr);
        }
      }
      if (!ok) return false;
      p.work += work_of(c);
      p.steps.push_back(s);
    }
    if (p.steps.empty()) return false;
    p.key = py::reinterpret_borrow<py::object>(key);
    for (const Input& x : in) {
      p.in_kinds.push_back(kind_of(x));
      p.in_shapes.push_back(x.shape);
    }
    p.grads_empty = n_grads == 0;
    for (size_t j = 0; j < out.size(); ++j) {
      p.out_shapes.push_back(p.out_present[j] ? out[j].shape : std::vector<int64_t>{});
      // The input the output is allocated like: one of its dtype and shape if any
      // (empty_like), else one of its dtype (new_empty), else (a 16-bit call's float32
      // value) any float input (new_empty with the dtype); an absent gradient needs none.
      int like = -1;
      for (int pass_ = 0; pass_ < 3 && like < 0; ++pass_)
        for (size_t i = 0; i < in.size() && like < 0; ++i)
          if (!in[i].integer &&
              (pass_ == 2 || (in[i].code == out[j].code && (pass_ == 1 || in[i].shape == out[j].shape))))
            like = static_cast<int>(i);
      if (like < 0 && p.out_present[j]) return false;
      p.out_like.push_back(like < 0 ? 0 : like);
      p.out_code.push_back(p.out_present[j] ? out[j].code : kFloat32);
    }
    if (count_ >= kMaxPlans) clear();
    const uint64_t hash = p.hash;
    plans_[hash].push_back(std::make_shared<const Plan>(std::move(p)));
    ++count_;
    return true;
  }

  void clear() {
    plans_.clear();
    count_ = 0;
  }
  size_t size() const { return count_; }

 private:
  std::shared_ptr<const Plan> find(uint64_t h, PyObject* key, const std::vector<Input>& in) const {
    auto it = plans_.find(h);
    if (it == plans_.end()) return nullptr;
    for (const std::shared_ptr<const Plan>& pp : it->second) {
      const Plan& p = *pp;
      if (p.in_shapes.size() != in.size()) continue;
      bool same = true;
      for (size_t i = 0; i < in.size() && same; ++i)
        same = p.in_kinds[i] == kind_of(in[i]) && p.in_shapes[i] == in[i].shape;
      if (same && same_key(p.key.ptr(), key)) return pp;
    }
    return nullptr;
  }

  // One guard tuple (kind, addresses, arg) into p.guards; false: not one this cache knows
  // how to re-run (the plan is refused).
  template <class RefOf>
  static bool add_guard(py::handle h, const RefOf& ref, const std::vector<Input>& in, Plan& p) {
    PyObject* o = h.ptr();
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 3) return false;
    PyObject* kind = PyTuple_GET_ITEM(o, 0);
    PyObject* ptrs = PyTuple_GET_ITEM(o, 1);
    const double arg = PyFloat_AsDouble(PyTuple_GET_ITEM(o, 2));
    if (PyErr_Occurred() || !PyUnicode_Check(kind) || !PyTuple_Check(ptrs)) return PyErr_Clear(), false;
    const Py_ssize_t n = PyTuple_GET_SIZE(ptrs);
    Ref r[2];
    for (Py_ssize_t i = 0; i < n && i < 2; ++i) {
      const void* ptr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(ptrs, i));
      if (PyErr_Occurred()) return PyErr_Clear(), false;
      if (ptr == nullptr || !ref(ptr, r[i])) return false;
    }
    const auto input = [&](const Ref& x, bool integer) {
      return x.kind == 1 && in[static_cast<size_t>(x.index)].integer == integer;
    };
    Guard g{};
    g.x = r[0];
    g.y = r[1];
    if (PyUnicode_CompareWithASCIIString(kind, "index_range") == 0 && n == 1 && input(r[0], true)) {
      g.kind = kIndexRange;
      g.limit = static_cast<int64_t>(arg);
    } else if (PyUnicode_CompareWithASCIIString(kind, "rows_finite") == 0 && n == 2 && input(r[0], false) &&
               input(r[1], true) && in[static_cast<size_t>(r[0].index)].code == 1 &&
               in[static_cast<size_t>(r[0].index)].shape.size() == 2) {
      g.kind = kRowsFinite;
    } else if (PyUnicode_CompareWithASCIIString(kind, "finite") == 0 && n == 1 && input(r[0], false)) {
      g.kind = kFinite;
      g.nonnegative = arg != 0.0;
    } else if (PyUnicode_CompareWithASCIIString(kind, "unit_interval") == 0 && n == 1 && input(r[0], false) &&
               arg >= 0.0) {
      g.kind = kUnitInterval;
      g.bound = arg;
    } else if (PyUnicode_CompareWithASCIIString(kind, "bounded") == 0 && n == 1 && input(r[0], false)) {
      g.kind = kBounded;
      g.bound = arg;
    } else if (PyUnicode_CompareWithASCIIString(kind, "rows_normal") == 0 && n == 1 && r[0].kind == 3) {
      g.kind = kRowsNormal;
      g.bound = arg;
    } else if (PyUnicode_CompareWithASCIIString(kind, "within") == 0 && n == 1 && input(r[0], false)) {
      g.kind = kWithin;
      g.bound = arg;
    } else if (PyUnicode_CompareWithASCIIString(kind, "positive") == 0 && n == 1 && input(r[0], false)) {
      g.kind = kPositive;
      g.bound = arg;
    } else if (PyUnicode_CompareWithASCIIString(kind, "ordered") == 0 && n == 2 && input(r[0], false) &&
               input(r[1], false) &&
               kind_of(in[static_cast<size_t>(r[0].index)]) == kind_of(in[static_cast<size_t>(r[1].index)]) &&
               in[static_cast<size_t>(r[0].index)].numel == in[static_cast<size_t>(r[1].index)].numel) {
      g.kind = kOrdered;
    } else if (PyUnicode_CompareWithASCIIString(kind, "no_nan") == 0 && n == 1 && r[0].kind == 2) {
      g.kind = kNoNaN;
    } else {
      return false;
    }
    p.guards.push_back(g);
    return true;
  }

  std::unordered_map<uint64_t, std::vector<std::shared_ptr<const Plan>>> plans_;
  size_t count_ = 0;
};

// PlanCache.run, a raw METH_FASTCALL method: no pybind11 argument dispatch (a few hundred
// ns of a ~10 us loss).

PyObject* plan_run(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 2) throw py::type_error("PlanCache.run(key, arrays) takes 2 arguments");
    PlanCache& cache = py::handle(self).cast<PlanCache&>();
    return cache.run(args[0], args[1]).release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef kPlanRunDef = {
    "run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&plan_run)), METH_FASTCALL,
    "run(key, arrays): (value, grads) from the cached plan of (key, kinds, shapes), or None: run the Python path."};

}  // namespace
}  // namespace genloss

void bind_plan(py::module_& m) {
  using namespace genloss;
  // map_reduce's own fields read back; another kind's through .fields.
  const auto mr = [](const Call& c, const char* what) {
    if (c.kind != kMapReduce)
      throw py::attribute_error(std::string("Call.") + what + ": a map_reduce field; this Call is kind '" +
                                kKindNames[c.kind] + "' (see .fields)");
  };
  py::class_<Call>(m, "Call",
                   "One engine call; every field by name: kind map_reduce (engine.h MapReduceArgs, the default) or "
                   "row_scale, col_sum, col_broadcast, row_lse, gmm (their Args structs).")
      .def(py::init([](const py::kwargs& kw) {
        Fields f;
        f.dict = kw.ptr();
        Call c = make_call(f);
        c.alloc = nullptr;  // workspace= serves run_call only (a borrowed reference)
        return c;
      }))
      .def_property_readonly("kind", [](const Call& c) { return std::string(kKindNames[c.kind]); })
      .def_property_readonly("fields", &call_fields)
      .def_property_readonly("functor",
                             [mr](const Call& c) {
                               mr(c, "functor");
                               return std::string(kFunctors[c.a.functor].name);
                             })
      .def_property_readonly("params",
                             [mr](const Call& c) {
                               mr(c, "params");
                               return call_params(c);
                             })
      .def_property_readonly("rows",
                             [mr](const Call& c) {
                               mr(c, "rows");
                               return c.a.rows;
                             })
      .def_property_readonly("cols",
                             [mr](const Call& c) {
                               mr(c, "cols");
                               return c.a.cols;
                             })
      .def_property_readonly("value_scale",
                             [mr](const Call& c) {
                               mr(c, "value_scale");
                               return c.a.value_scale;
                             })
      .def_property_readonly("grad_scale",
                             [mr](const Call& c) {
                               mr(c, "grad_scale");
                               return c.a.grad_scale;
                             })
      .def_property_readonly("totals", [](const Call& c) -> py::object {
        if (!c.want_totals) return py::none();
        return py::make_tuple(c.totals[0], c.totals[1]);
      });
  m.add_object("run_call", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&kRunCallDef, nullptr, nullptr)));
  m.def("run", &run_calls, py::arg("calls"),
        "Run a Call or a sequence of Calls in order, with the GIL released (the one entry point of the engine's "
        "map_reduce and kernels).");
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
  py::dict rows;  // name -> (id, (a, b, c, mode) names or None, n_in, n_table, n_out): kind row_map
  for (int i = 0; i < kNumRowFunctors; ++i) {
    const RowFunctorInfo& f = kRowFunctors[i];
    py::list names;
    for (int q = 0; q < 4; ++q) {
      const char* n = slot_name(f.params, q);
      names.append(n ? py::object(py::str(n)) : py::object(py::none()));
    }
    rows[f.name] = py::make_tuple(i, py::tuple(names), f.n_in, f.n_table, f.n_out);
  }
  m.attr("ROW_FUNCTORS") = rows;
  py::class_<PlanCache> plans(m, "PlanCache", "Recorded compositions, replayed on new plain CPU torch tensors.");
  plans.def(py::init<>())
      .def("add", &PlanCache::add, py::arg("key"), py::arg("arrays"), py::arg("calls"), py::arg("result"),
           py::arg("guards") = py::none(), py::arg("allocs") = py::none(),
           "Record the Calls (and data checks) a composition ran on arrays, with the arrays it allocated, as a "
           "plan; False: not replayable.")
      .def("clear", &PlanCache::clear)
      .def("__len__", &PlanCache::size);
  PyObject* run = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(plans.ptr()), &kPlanRunDef);
  if (run == nullptr || PyObject_SetAttrString(plans.ptr(), "run", run) != 0) throw py::error_already_set();
  Py_DECREF(run);
  m.attr("HOST_CACHE_MIN_BYTES") = kHostCacheMinBytes;
  m.attr("LFQ_MAX_BITS") = cpu::kLfqMaxBits;
#ifdef GENLOSS_CUDA_EMULATOR
  m.def(
      "cuda_emulator", [](bool on) { return g_emulate.exchange(on); }, py::arg("on"),
      "Run every CPU call on the host emulation of the CUDA engine (on=True) or on the CPU engine; returns the "
      "previous setting. Only in builds with GENLOSS_CUDA_EMULATOR=ON (tests).");
  m.def("cuda_emulator_launches", &genloss_emulator::launch_count,
        "How many kernel launches the CUDA emulator ran in this process.");
#endif
  m.def("cuda_scratch_fallbacks", &cuda::scratch_fallbacks,
        "How many CUDA scratch buffers fell back to cudaMallocAsync (the call had no workspace from its caller).");
}
