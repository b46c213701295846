// bindings_prdc.cpp — genloss._C.knn_prdc: the tiled k-NN kernel of prdc (knn.h), CPU only.
// Thin: Python ints (pointers, sizes) into KnnArgs, the kernel called with the GIL released.
// Validation (finite inputs, k < N and k < M, the CUDA refusal) lives in python/genloss/native/metrics.py.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "genloss/common.h"
#include "knn.h"

namespace py = pybind11;

namespace {

void knn_prdc(int dtype, std::uintptr_t real, std::uintptr_t fake, int64_t N, int64_t M, int64_t D, int64_t k,
              std::uintptr_t real_r2, std::uintptr_t fake_r2, std::uintptr_t counts) {
  if (dtype != genloss::kFloat32 && dtype != genloss::kFloat64)
    throw py::type_error("prdc: real and fake must be float32 or float64");
  if (D < 1 || k < 1 || k >= N || k >= M) throw py::value_error("prdc: need D >= 1 and 1 <= k < N, M");
  genloss::KnnArgs a{};
  a.dtype = dtype;
  a.real = reinterpret_cast<const void*>(real);
  a.fake = reinterpret_cast<const void*>(fake);
  a.N = N;
  a.M = M;
  a.D = D;
  a.k = k;
  a.real_r2 = reinterpret_cast<double*>(real_r2);
  a.fake_r2 = reinterpret_cast<double*>(fake_r2);
  a.counts = reinterpret_cast<int64_t*>(counts);
  py::gil_scoped_release nogil;
  genloss::cpu::knn_prdc(a);
}

}  // namespace

void bind_prdc(py::module_& m) {
  m.def("knn_prdc", &knn_prdc);
}
