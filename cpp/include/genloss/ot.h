// genloss/ot.h — optimal transport on the CPU and CUDA: the log-domain Sinkhorn loop of
// sinkhorn_divergence (potentials, value, envelope gradients) and the exact assignment
// solver of ot_coupling. Implemented in cpp/src/ot_cpu.cpp (one build per instruction
// set), dispatched by cpp/src/cpu_dispatch.cpp. Inputs are float64 (the Python layer
// converts): the potentials and the log-sum-exps are float64 throughout.
#pragma once

#include <cstdint>

namespace genloss {

struct SinkhornArgs {
  int dtype;        // kFloat64 (the OT kernels are float64 only; every Args struct starts with its dtype)
  const double* x;  // (N, D) contiguous
  const double* y;  // (M, D) contiguous
  int64_t N, M, D;
  double p;           // cost |a - b|^p / p, p >= 1                          (MET.20)
  const double* eps;  // the annealing schedule, last entry = the target eps (MET.22)
  int64_t n_eps;      // >= 1
  double tol;         // stop when no potential moves by more than tol * eps
  int64_t max_iter;   // rounds at the last eps
  int debias;         // nonzero: also solve OT(x, x) and OT(y, y) and debias the value (MET.23)
  double* value;      // out: S_eps (debias) or OT_eps(x, y)
  double* f;          // out, optional (N): the x-y potential on x
  double* g;          // out, optional (M): the x-y potential on y
  double* grad_x;     // out, optional (N, D): dvalue/dx                     (MET.24)
  double* grad_y;     // out, optional (M, D)
  int64_t* rounds;    // out, optional (1): rounds run at the last eps
  double* change;     // out, optional (1): the last round's largest x-y potential change (converged:
                      // <= tol * eps; change / eps estimates the relative error of the row marginals)
};

// ot_coupling's exact pairing of two batches of B points.                  (MET.26)
struct AssignArgs {
  int dtype;         // kFloat64
  const double* x0;  // (B, D) contiguous
  const double* x1;  // (B, D) contiguous
  int64_t B, D;
  int64_t* perm;  // out (B)
};

namespace cpu {
void sinkhorn(const SinkhornArgs& a);
// perm[i] = the column matched to row i by a minimum-cost perfect matching of the
// cost |x0_i - x1_j|^2 (float64), shortest augmenting paths; ties -> lowest column.  (MET.26)
void assignment(const AssignArgs& a);
}  // namespace cpu

// The same on CUDA (cuda/ot.cu): device pointers, launched on `stream`. assignment gives the
// CPU's permutation bit for bit, with no host synchronisation (CUDA-graph capturable);
// sinkhorn reads its convergence test back once per round (refuses capture), its results
// equal the CPU's to rounding. eps stays a host array.
namespace cuda {
void sinkhorn(const SinkhornArgs& a, void* stream);
void assignment(const AssignArgs& a, void* stream);
}  // namespace cuda

}  // namespace genloss
