// bindings_ot.cpp — genloss._C bindings of optimal transport (sinkhorn_divergence, ot_coupling).
// Thin: Python ints (pointers to host float64 / int64 arrays the caller allocated, sizes) into
// the CPU kernels of genloss/ot.h, run with the GIL released. Validation lives in
// python/genloss/native/metrics.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "address.h"
#include "genloss/ot.h"

namespace py = pybind11;

namespace {

// Returns the rounds run at the last eps.
int64_t sinkhorn(std::uintptr_t x, std::uintptr_t y, int64_t N, int64_t M, int64_t D, double p,
                 const std::vector<double>& eps, double tol, int64_t max_iter, bool debias, std::uintptr_t value,
                 std::uintptr_t f, std::uintptr_t g, std::uintptr_t grad_x, std::uintptr_t grad_y) {
  if (N < 1 || M < 1 || D < 1) throw py::value_error("sinkhorn: empty input");
  if (eps.empty()) throw py::value_error("sinkhorn: empty eps schedule");
  if (max_iter < 1) throw py::value_error("sinkhorn: max_iter must be >= 1");
  genloss::SinkhornArgs a{P<const double>(x),
                          P<const double>(y),
                          N,
                          M,
                          D,
                          p,
                          eps.data(),
                          int64_t(eps.size()),
                          tol,
                          max_iter,
                          debias,
                          P<double>(value),
                          P<double>(f),
                          P<double>(g),
                          P<double>(grad_x),
                          P<double>(grad_y),
                          0};
  py::gil_scoped_release nogil;
  genloss::cpu::sinkhorn(a);
  return a.rounds;
}

void assignment(std::uintptr_t x0, std::uintptr_t x1, int64_t B, int64_t D, std::uintptr_t perm) {
  if (B < 1 || D < 1) throw py::value_error("assignment: empty input");
  py::gil_scoped_release nogil;
  genloss::cpu::assignment(P<const double>(x0), P<const double>(x1), B, D, P<int64_t>(perm));
}

}  // namespace

void bind_ot(py::module_& m) {
  m.def("sinkhorn", &sinkhorn);
  m.def("ot_assignment", &assignment);
}
