// genloss/ops/vae.h — per-element (value, derivative) functors of the VAE family.
// Tags (VAE.n) point to derivations/vae.md. Same interface as ops/gan.h;
// functors of arity >= 3 take arrays: eval(const T* x, const Params<T>&, T& v, T* d).
#pragma once

#include "genloss/common.h"

namespace genloss {
namespace ops {

// KL(N(mu, e^lv) || N(0, 1)) per element = 1/2 (mu^2 + e^lv - 1 - lv),
// written 1/2 (mu^2 + expm1(lv) - lv) so lv ~ 0 loses no digits.
// d/dmu = mu, d/dlv = 1/2 expm1(lv).                                  (VAE.4)
struct GaussianKL {
  static constexpr int arity = 2;
  template <class T>
  GENLOSS_HD static void eval(T mu, T lv, const Params<T>&, T& v, T& dmu, T& dlv) {
    const T em1 = gl_expm1(lv);
    v = T(0.5) * (mu * mu + em1 - lv);
    dmu = mu;
    dlv = T(0.5) * em1;
  }
};

// Bernoulli NLL from logits: softplus(l) - x l; d/dl = sigmoid(l) - x,
// d/dx = -l. Targets x in [0, 1] (soft targets allowed). A target outside
// [0, 1] (or NaN) makes its value NaN: the caller checks the result instead
// of reading x in a separate pass, and only a NaN result costs that pass
// (python/genloss/native/vae.py, _unit_interval_after).               (VAE.6)
struct BernoulliNLL {
  static constexpr int arity = 2;
  template <class T>
  GENLOSS_HD static void eval(T l, T x, const Params<T>&, T& v, T& dl, T& dx) {
    // max(l, 0) - x l + log1p(e^{-|l|}): for x in {0, 1} the first two terms
    // cancel exactly where the answer is small. The gradient is written
    // (1 - x) sigmoid(l) - x sigmoid(-l): no cancellation at x in {0, 1}.
    const T e = exp_nonpos(-gl_abs(l));
    const T r = T(1) / (T(1) + e);
    const T sp = l >= T(0) ? r : e * r;  // sigmoid(l)
    const T sn = l >= T(0) ? e * r : r;  // sigmoid(-l)
    v = gl_max(l, T(0)) - x * l + log1p_unit(e);
    v = x >= T(0) && x <= T(1) ? v : gl_nan<T>();
    dl = (T(1) - x) * sp - x * sn;
    dx = -l;
  }
};

// Gaussian NLL: 1/2 (log 2 pi + lv + (x - mean)^2 e^{-lv}); inputs (mean, x, lv).
// d/dmean = -(x - mean) e^{-lv}, d/dx = +(x - mean) e^{-lv},
// d/dlv = 1/2 (1 - (x - mean)^2 e^{-lv}).                             (VAE.7)
struct GaussianNLL {
  static constexpr int arity = 3;
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>&, T& v, T* d) {
    const T log2pi = T(1.8378770664093453);
    const T r = in[1] - in[0];
    const T w = gl_exp(-in[2]);
    const T rw = r * w;
    v = T(0.5) * (log2pi + in[2] + r * rw);
    d[0] = -rw;
    d[1] = rw;
    d[2] = T(0.5) * (T(1) - r * rw);
  }
};

// Gaussian NLL with unit variance (lv = 0): 1/2 (log 2 pi + (x - mean)^2);
// inputs (mean, x); d/dmean = -(x - mean), d/dx = x - mean. "MSE" is this up to
// the constant and the factor 1/2.                                    (VAE.7)
struct GaussianNLLUnit {
  static constexpr int arity = 2;
  template <class T>
  GENLOSS_HD static void eval(T mean, T x, const Params<T>&, T& v, T& dm, T& dx) {
    const T r = x - mean;
    v = T(0.5) * (T(1.8378770664093453) + r * r);
    dm = -r;
    dx = r;
  }
};

// KL(N(m1, e^lv1) || N(m2, e^lv2)) per element; inputs (m1, lv1, m2, lv2).
// With delta = lv1 - lv2 and q = (m1 - m2)^2 e^{-lv2}:
//   1/2 (expm1(delta) - delta + q)
// d/dm1 = (m1 - m2) e^{-lv2} = -d/dm2, d/dlv1 = 1/2 expm1(delta),
// d/dlv2 = -1/2 (expm1(delta) + q).                                   (VAE.5)
struct NormalKL {
  static constexpr int arity = 4;
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>&, T& v, T* d) {
    const T delta = in[1] - in[3];
    T ed, em1, w, wm1;
    exp_expm1(delta, ed, em1);
    exp_expm1(-in[3], w, wm1);  // (wm1 unused: the compiler drops it)
    const T dm = in[0] - in[2];
    const T q = dm * dm * w;
    v = T(0.5) * (em1 - delta + q);
    d[0] = dm * w;
    d[1] = T(0.5) * em1;
    d[2] = -d[0];
    d[3] = T(-0.5) * (em1 + q);
  }
};

}  // namespace ops
}  // namespace genloss
