// genloss/ops/flow.h — per-element (value, derivative) functors of the
// continuous-time family. Tags (FLOW.n) point to derivations/flow.md.
//
// Time-dependent weights lambda(t) are per sample: Python forms the B values
// w_b lambda(t_b) and hands them to the engine as row weights (MapReduceArgs::
// row_weight), so the per-element functor sees only constants.
#pragma once

#include "genloss/common.h"

namespace genloss {
namespace ops {

// (pred - u)^2 with the velocity target u = noise - c x0 built in place,
// c = 1 - sigma_min = p.a (one scalar for the whole call: no per-row table).
// Inputs (pred, x0, noise); derivatives w.r.t. all three. No x_t or target
// is ever stored.                                               (FLOW.1, FLOW.2)
struct FlowMatchingMSE {
  static constexpr int arity = 3;
  static constexpr ParamNames params{"x0_coef"};
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>& p, T& v, T* d) {
    const T r = in[0] - (in[2] - p.a * in[1]);
    v = r * r;
    d[0] = T(2) * r;  // (FLOW.2) d/dpred = 2 r, d/dx0 = 2 c r, d/dnoise = -2 r
    d[1] = d[0] * p.a;
    d[2] = -d[0];
  }
};

// Pseudo-Huber of a per-sample squared norm s = ||x - y||^2 (one element per
// row), c = p.a > 0:  h(s) = sqrt(s + c^2) - c, computed as s / (q + c) with
// q = sqrt(s + c^2), which has no cancellation when s << c^2 (the value is then
// ~ s / 2c); dh/ds = 1 / (2 q) <= 1 / (2 c). s = inf gives h = inf (not
// inf / inf). The gradient w.r.t. x is then 2 (dh/ds) (x - y): a second pass of
// SquaredDiff with this derivative as its row weight.           (FLOW.20)
struct PseudoHuberOfSqNorm {
  static constexpr int arity = 1;
  static constexpr ParamNames params{"c"};
  template <class T>
  GENLOSS_HD static void eval(T s, const Params<T>& p, T& v, T& d) {
    const T q = gl_sqrt(s + p.a * p.a);
    v = s - s == T(0) ? s / (q + p.a) : s;  // s = inf (or NaN): inf (NaN), not inf / inf
    d = T(0.5) / q;
  }
};

// The row sum that gives the sigma-gradient of denoiser_loss: with the
// per-row table (a, b, a', b') = p.rp (DiffusionMSE reads the first two), the
// residual r = F - (a x0 + b noise) times the target's slope
// dF_tgt/dsigma = a' x0 + b' noise, so that sum_i r (a' x0 + b' noise) =
// -(n / 2) dm/dsigma. a' = sigma_d / rho^3 and b' = sigma a' are bounded for
// every sigma (unlike x_sigma = x0 + sigma noise, whose row sums overflow
// float32 at large sigma). Inputs (F, x0, noise); a value only (its
// derivatives are never asked).                                     (FLOW.23)
struct DenoiserSigmaDot {
  static constexpr int arity = 3;
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>& p, T& v, T* d) {
    const T a = T(p.rp[0]), b = T(p.rp[1]), da = T(p.rp[2]), db = T(p.rp[3]);
    v = (in[0] - (a * in[1] + b * in[2])) * (da * in[1] + db * in[2]);
    d[0] = d[1] = d[2] = T(0);
  }
};

}  // namespace ops
}  // namespace genloss
