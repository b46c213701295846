// bindings.cpp — the pybind11 module genloss._C. Thin by design: the engine itself
// (map_reduce and its kernels row_scale, col_sum, col_broadcast, row_lse, gmm, mmd) is run
// only through typed Calls with named fields (_C.Call, _C.run, _C.run_call, in
// plan.cpp); this file binds the rest (DLPack, settings, build info). No math here;
// validation happens in python/genloss/native/_engine.py, which owns the DLPack side.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "cpu_config.h"
#include "dlpack.h"
#include "genloss/cuda_info.h"
#include "genloss/engine.h"

namespace py = pybind11;
using namespace genloss;

void bind_mmd(py::module_& m);         // bindings_mmd.cpp
void bind_host_cache(py::module_& m);  // host_cache.cpp
void bind_plan(py::module_& m);        // plan.cpp: Call, run, PlanCache (map_reduce)

namespace {

// Reads a DLPack capsule without consuming it (its owner keeps the memory alive
// as long as the capsule lives; Python holds it for the duration of the call).
// Returns (data_ptr, dtype_code, bits, lanes, device_type, device_id, shape, strides).
// The capsule comes from any producer's __dlpack__, so nothing in it is trusted
// before it is checked: errors name the argument (`name`) and say what was expected.
// DLPack gives no length for the shape/strides arrays, so a producer whose ndim
// exceeds them cannot be detected; ndim is bounded by kMaxDims (NumPy's limit) so
// that a garbage ndim is refused instead of read.
constexpr int kMaxDims = 64;

py::tuple dlpack_info(const py::object& cap, const std::string& name) {
  const std::string want = name + " must give an unconsumed DLPack capsule from __dlpack__";
  if (!PyCapsule_CheckExact(cap.ptr()))
    throw py::type_error(want + ", got " + std::string(Py_TYPE(cap.ptr())->tp_name));
  const char* cname = PyCapsule_GetName(cap.ptr());
  if (cname == nullptr) {
    PyErr_Clear();
    throw py::type_error(want + ", got a capsule without a name");
  }
  const std::string n(cname);
  if (n == "used_dltensor" || n == "used_dltensor_versioned")
    throw py::type_error(want + ", got one already consumed (name '" + n + "'): call __dlpack__ again");
  if (n != "dltensor" && n != "dltensor_versioned") throw py::type_error(want + ", got a capsule named '" + n + "'");
  void* p = PyCapsule_GetPointer(cap.ptr(), cname);
  if (p == nullptr) {
    PyErr_Clear();
    throw py::type_error(want + ", got a '" + n + "' capsule holding a null pointer");
  }
  DLTensor* t = nullptr;
  if (n == "dltensor") {
    t = &static_cast<DLManagedTensor*>(p)->dl_tensor;
  } else {
    auto* v = static_cast<DLManagedTensorVersioned*>(p);
    // another major version may lay the struct out differently: its fields are not read
    if (v->version.major != 1)
      throw py::type_error(name + ": DLPack version " + std::to_string(v->version.major) + "." +
                           std::to_string(v->version.minor) + " is not supported (expected 1.x)");
    t = &v->dl_tensor;
  }
  if (t->ndim < 0 || t->ndim > kMaxDims)
    throw py::value_error(name + ": DLPack ndim must be in [0, " + std::to_string(kMaxDims) + "], got " +
                          std::to_string(t->ndim));
  if (t->ndim > 0 && t->shape == nullptr)
    throw py::value_error(name + ": DLPack tensor has ndim " + std::to_string(t->ndim) + " but no shape array");
  py::list shape, strides;
  bool empty = false;
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] < 0)
      throw py::value_error(name + ": DLPack shape must be >= 0 in every dimension, got " +
                            std::to_string(t->shape[i]) + " in dimension " + std::to_string(i));
    empty = empty || t->shape[i] == 0;
    shape.append(t->shape[i]);
  }
  if (t->strides)
    for (int i = 0; i < t->ndim; ++i) strides.append(t->strides[i]);
  if (t->data == nullptr && !empty)
    throw py::value_error(name + ": DLPack tensor has a null data pointer but holds elements");
  const std::uintptr_t data = reinterpret_cast<std::uintptr_t>(t->data) + t->byte_offset;
  return py::make_tuple(data, static_cast<int>(t->dtype.code), static_cast<int>(t->dtype.bits),
                        static_cast<int>(t->dtype.lanes), static_cast<int>(t->device.device_type),
                        static_cast<int>(t->device.device_id), py::tuple(shape),
                        t->strides ? py::object(py::tuple(strides)) : py::object(py::none()));
}

// The runtime settings (cpu_config.h) for genloss.native.options, which validates
// what it sets.
py::dict config() {
  py::dict d;
  d["isa"] = std::string(cpu::isa());
  d["isa_forced"] = std::string(cpu::isa_forced());
  d["threads"] = cpu::threads();
  d["threads_setting"] = cpu::threads_setting();
  d["forked"] = cpu::forked_child();
  d["stream_min_bytes"] = cpu::stream_min_bytes();
  d["nt_stores"] = cpu::nt_stores();
  d["huge_pages"] = cpu::huge_pages();
  d["host_cache_mb"] = cpu::host_cache_mb();
  return d;
}

py::dict cuda_runtime() {
  const cuda::RuntimeInfo r = cuda::runtime_info();
  py::dict d;
  d["built"] = cuda::built();
  d["runtime_version"] = r.runtime_version;
  d["driver_version"] = r.driver_version;
  d["device_count"] = r.device_count;
  d["error"] = std::string(r.error);
  return d;
}

py::dict build_info() {
  py::dict d;
  d["cuda"] = cuda::built();
  d["isa"] = std::string(cpu::isa());
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["omp_max_threads"] = cpu::threads();
#ifdef GENLOSS_CUDA_ARCHS
  d["cuda_archs"] = std::string(GENLOSS_CUDA_ARCHS);
#else
  d["cuda_archs"] = std::string();
#endif
#ifdef GENLOSS_CUDA_EMULATOR
  d["cuda_emulator"] = true;  // _C.cuda_emulator: the CUDA engine's kernels, emulated on the host
#else
  d["cuda_emulator"] = false;
#endif
  d["compiler"] = std::string(__VERSION__);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genloss native engine (CPU, and CUDA when built with nvcc)";
  // clang-format off
  m.def("dlpack_info",   &dlpack_info, py::arg("cap"), py::arg("name") = "array");
  m.def("build_info",    &build_info);
  m.def("cuda_runtime",  &cuda_runtime);
  m.def("config",        &config);
  m.def("config_warnings", &cpu::config_warnings);
  m.def("set_threads",   &cpu::set_threads);
  m.def("set_stream_min_bytes", &cpu::set_stream_min_bytes);
  m.def("set_nt_stores", &cpu::set_nt_stores);
  m.def("set_huge_pages", &cpu::set_huge_pages);
  m.def("set_host_cache_mb", &cpu::set_host_cache_mb);
  m.def("streamed_calls", &cpu::streamed_calls);
  // clang-format on
  py::dict ids;
#define GENLOSS_ID(id, type) ids[#id + 1] = static_cast<int>(id);
  GENLOSS_FUNCTORS(GENLOSS_ID)
#undef GENLOSS_ID
  m.attr("FUNCTORS") = ids;
  bind_mmd(m);
  bind_host_cache(m);
  bind_plan(m);
}
