// bindings_mmd.cpp — the constants of the tiled MMD^2 kernel (genloss/mmd.h). The kernel
// itself runs as a typed Call, kind "mmd" (plan.cpp: MmdArgs by field name). Validation
// lives in python/genloss/native/divergence.py.
#include <pybind11/pybind11.h>

#include "genloss/mmd.h"

namespace py = pybind11;

void bind_mmd(py::module_& m) {
  m.attr("MMD_TILE") = genloss::kMmdTile;
  m.attr("MMD_KERNELS") = py::make_tuple("rbf", "imq", "polynomial", "energy");  // = enum MmdKernel
  m.attr("MMD_ESTIMATORS") = py::make_tuple("unbiased", "biased", "linear");     // = enum MmdEstimator
}
