// bindings_mmd.cpp — genloss._C.mmd: the tiled MMD^2 kernel (genloss/mmd.h).
// Thin: Python ints (pointers, sizes) into MmdArgs, the CPU or CUDA engine called
// with the GIL released. Validation lives in python/genloss/native/divergence.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "address.h"
#include "genloss/engine.h"
#include "genloss/mmd.h"

namespace py = pybind11;

namespace {

void mmd_call(int device, int device_id, std::uintptr_t stream, int dtype, int kernel, int estimator, std::uintptr_t x,
              std::uintptr_t y, int64_t N, int64_t M, int64_t D, const std::vector<double>& bandwidths,
              std::uintptr_t out_value, double grad_scale, std::uintptr_t grad_x, std::uintptr_t grad_y) {
  if (kernel < genloss::kMmdRbf || kernel > genloss::kMmdEnergy) throw py::value_error("mmd: kernel id out of range");
  if (estimator < genloss::kMmdUnbiased || estimator > genloss::kMmdLinear)
    throw py::value_error("mmd: estimator id out of range");
  if (N < 1 || M < 1 || D < 1) throw py::value_error("mmd: empty input");
  genloss::MmdArgs a{};
  a.dtype = dtype;
  a.kernel = kernel;
  a.estimator = estimator;
  a.x = P(x);
  a.y = P(y);
  a.N = N;
  a.M = M;
  a.D = D;
  a.bandwidths = bandwidths.data();
  a.nbw = static_cast<int>(bandwidths.size());
  a.out_value = P(out_value);
  a.grad_scale = grad_scale;
  a.grad_x = P(grad_x);
  a.grad_y = P(grad_y);
  py::gil_scoped_release nogil;
  if (device == 0) {
    genloss::cpu::mmd(a);
  } else {
    const genloss::cuda::DeviceGuard guard(device_id);
    genloss::cuda::mmd(a, P(stream));
  }
}

}  // namespace

void bind_mmd(py::module_& m) {
  m.def("mmd", &mmd_call);
  m.attr("MMD_TILE") = genloss::kMmdTile;
  m.attr("MMD_KERNELS") = py::make_tuple("rbf", "imq", "polynomial", "energy");  // = enum MmdKernel
  m.attr("MMD_ESTIMATORS") = py::make_tuple("unbiased", "biased", "linear");     // = enum MmdEstimator
}
