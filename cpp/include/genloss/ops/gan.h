// genloss/ops/gan.h — per-element (value, derivative) functors of the GAN family.
//
// Each functor is a pure function of one element (two for binary ones) and the
// call's Params; the CPU engine (cpp/src/cpu_kernels.cpp) and the CUDA engine
// (cuda/engine.cu) run any of them. Tags (GAN.n) point to derivations/gan.md.
//
// Unary:  static void eval(T x, const Params<T>& p, T& value, T& dvalue_dx)
// Binary: static void eval(T x, T y, const Params<T>& p, T& value, T& dx, T& dy)
#pragma once

#include "genloss/common.h"

namespace genloss {
namespace ops {

// c where x is a number, x (NaN) where x is NaN: a select, so loops stay
// vectorised. A piecewise-constant derivative (sign, a relu's step) would
// otherwise turn a NaN input into a finite gradient (SPEC: NaN in, NaN out).
// (A derivative that is one constant everywhere, of a term linear in x, does
// not read x and stays that constant, as in torch's autograd.)
template <class T>
GENLOSS_HD T nan_or(T x, T c) {
  return x == x ? c : x;
}

// max(x, 0) that keeps NaN (gl_max(NaN, 0) is 0: the comparison is false).
template <class T>
GENLOSS_HD T relu_nan(T x) {
  return x < T(0) ? T(0) : x;
}

// softplus(a - x) = -log sigmoid(x - a); d/dx = -sigmoid(a - x).  (GAN.2, GAN.4)
// a = 0: the real term of the GAN discriminator loss and the non-saturating
// generator loss; a = mean of the other population: the relativistic losses.
struct SoftplusNeg {
  static constexpr int arity = 1;
  static constexpr ParamNames params{"shift"};
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>& p, T& v, T& d) {
    T sig;
    softplus_and_sigmoid(p.a - x, v, sig);
    d = -sig;  // (GAN.4)
  }
};

// softplus(x - a) = -log(1 - sigmoid(x - a)); d/dx = sigmoid(x - a). (GAN.2, GAN.4)
// The fake term of the discriminator loss; with scale -1, the minimax generator.
struct Softplus {
  static constexpr int arity = 1;
  static constexpr ParamNames params{"shift"};
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>& p, T& v, T& d) {
    softplus_and_sigmoid(x - p.a, v, d);  // (GAN.4)
  }
};

// 1/2 (x - a)^2; d/dx = x - a.                                        (GAN.8)
struct HalfSquare {
  static constexpr int arity = 1;
  static constexpr ParamNames params{"target"};
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>& p, T& v, T& d) {
    const T r = x - p.a;
    v = T(0.5) * r * r;
    d = r;
  }
};

// x; d/dx = 1. The WGAN critic and generator (sign through the scale). (GAN.9)
struct Linear {
  static constexpr int arity = 1;
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>&, T& v, T& d) {
    v = x;
    d = T(1);
  }
};

// relu(a + b x); d/dx = b [a + b x > 0] (0 at the kink).              (GAN.10)
// Hinge: real term a = 1, b = -1; fake term a = 1, b = +1.
// A NaN score keeps NaN in value and derivative (a bare `z > 0 ? z : 0` would
// mask it to 0: NaN in, NaN out, SPEC Conventions).
struct HingeRelu {
  static constexpr int arity = 1;
  static constexpr ParamNames params{"offset", "slope"};
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>& p, T& v, T& d) {
    const T z = p.a + p.b * x;
    const bool on = z > T(0);
    v = on ? z : nan_or(z, T(0));
    d = on ? p.b : nan_or(z, T(0));
  }
};

// x^2; d/dx = 2x. Squared norms of the gradient penalties.       (GAN.12, GAN.13)
struct Square {
  static constexpr int arity = 1;
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>&, T& v, T& d) {
    v = x * x;
    d = T(2) * x;
  }
};

// phi(s) = (sqrt(s) - c)^2 of a squared norm s (one-sided when mode = 1:
// max(sqrt(s) - c, 0)^2); dphi/ds = (sqrt(s) - c) / sqrt(s) = 1 - c/sqrt(s)
// (clamped at 0 when one-sided), defined as 0 at s = 0 (the cone point), so the
// gradient 2 dphi/ds g is 0 at g = 0. The 1 - c/n form has no inf/inf when the
// norm overflows.                                                   (GAN.12)
struct GradPenaltyOfSqNorm {
  static constexpr int arity = 1;
  static constexpr ParamNames params{"center", nullptr, nullptr, "one_sided"};
  template <class T>
  GENLOSS_HD static void eval(T s, const Params<T>& p, T& v, T& d) {
    const T n = gl_sqrt(s);
    T r = n - p.a;
    T q = T(1) - p.a / n;
    if (p.mode == 1) {  // NaN-keeping clamps: a NaN gradient entry makes s, r, q NaN
      r = relu_nan(r);
      q = relu_nan(q);
    }
    v = r * r;
    d = n == T(0) ? T(0) : q;  // the cone point; NaN n keeps q = NaN
  }
};

// |x - y|; d/dx = sign(x - y) (0 at 0, NaN at NaN), d/dy = -d/dx.  (GAN.16)
struct AbsDiff {
  static constexpr int arity = 2;
  template <class T>
  GENLOSS_HD static void eval(T x, T y, const Params<T>&, T& v, T& dx, T& dy) {
    const T r = x - y;
    v = gl_abs(r);
    dx = r > T(0) ? T(1) : (r < T(0) ? T(-1) : nan_or(r, T(0)));
    dy = -dx;
  }
};

// (x - y)^2; d/dx = 2(x - y), d/dy = -2(x - y). Feature matching.    (GAN.14)
struct SquaredDiff {
  static constexpr int arity = 2;
  template <class T>
  GENLOSS_HD static void eval(T x, T y, const Params<T>&, T& v, T& dx, T& dy) {
    const T r = x - y;
    v = r * r;
    dx = T(2) * r;
    dy = -dx;
  }
};

// softplus(y - x) = -log sigmoid(x - y): the paired relativistic (RSGAN)
// losses; d/dx = -sigmoid(y - x), d/dy = sigmoid(y - x).              (GAN.11)
struct SoftplusNegDiff {
  static constexpr int arity = 2;
  template <class T>
  GENLOSS_HD static void eval(T x, T y, const Params<T>&, T& v, T& dx, T& dy) {
    T sig;
    softplus_and_sigmoid(y - x, v, sig);
    dx = -sig;
    dy = sig;
  }
};

// d/dv tanh(v)/2 = sech(v)^2 / 2 = 2e / (1 + e)^2 with e = e^{-2|v|}: accurate
// in the tails, where 1 - tanh(v)^2 would round to 0.                  (GAN.18)
template <class T>
GENLOSS_HD T half_sech2(T x) {
  const T e = gl_exp(T(-2) * gl_abs(x));
  const T q = T(1) + e;
  return T(2) * e / (q * q);
}

// f-GAN divergences (mode): the order of python/genloss/_fgan.py.     (GAN.18)
enum FganDivergence : int {
  kKL = 0,
  kReverseKL = 1,
  kPearson = 2,
  kSquaredHellinger = 3,
  kJensenShannon = 4,
  kGan = 5,
  kTotalVariation = 6
};

// -g_f(v): the real-sample term of the f-GAN critic loss, and the non-saturating
// generator loss. g_f is the output activation mapping v into dom f*. (GAN.18)
struct FganActivation {
  static constexpr int arity = 1;
  static constexpr ParamNames params{nullptr, nullptr, nullptr, "divergence"};
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>& p, T& v, T& d) {
    const T ln2 = T(0.6931471805599453);
    switch (p.mode) {
      case kKL:
      case kPearson:  // g = v
        v = -x;
        d = T(-1);
        break;
      case kReverseKL: {  // g = -e^{-v}
        const T e = gl_exp(-x);
        v = e;
        d = -e;
        break;
      }
      case kSquaredHellinger: {  // g = 1 - e^{-v} = -expm1(-v)
        v = gl_expm1(-x);
        d = -gl_exp(-x);
        break;
      }
      case kJensenShannon: {  // g = log 2 - softplus(-v)
        T sp, sig;
        softplus_and_sigmoid(-x, sp, sig);
        v = sp - ln2;
        d = -sig;
        break;
      }
      case kGan: {  // g = -softplus(-v)
        T sp, sig;
        softplus_and_sigmoid(-x, sp, sig);
        v = sp;
        d = -sig;
        break;
      }
      default: {  // total variation: g = tanh(v)/2
        v = T(-0.5) * gl_tanh(x);
        d = -half_sech2(x);
        break;
      }
    }
  }
};

// f*(g_f(v)): the generated-sample term of the f-GAN critic loss (minimax
// generator with scale -1), composed in closed form so it stays stable. (GAN.18)
struct FganConjugate {
  static constexpr int arity = 1;
  static constexpr ParamNames params{nullptr, nullptr, nullptr, "divergence"};
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>& p, T& v, T& d) {
    const T ln2 = T(0.6931471805599453);
    switch (p.mode) {
      case kKL: {  // e^{v-1}
        const T e = gl_exp(x - T(1));
        v = e;
        d = e;
        break;
      }
      case kReverseKL:  // v - 1
        v = x - T(1);
        d = T(1);
        break;
      case kPearson:  // v^2/4 + v
        v = T(0.25) * x * x + x;
        d = T(0.5) * x + T(1);
        break;
      case kSquaredHellinger:  // e^v - 1
        v = gl_expm1(x);
        d = gl_exp(x);
        break;
      case kJensenShannon: {  // softplus(v) - log 2
        T sp, sig;
        softplus_and_sigmoid(x, sp, sig);
        v = sp - ln2;
        d = sig;
        break;
      }
      case kGan: {  // softplus(v)
        softplus_and_sigmoid(x, v, d);
        break;
      }
      default: {  // total variation: tanh(v)/2
        v = T(0.5) * gl_tanh(x);
        d = half_sech2(x);
        break;
      }
    }
  }
};

// ---- rows of log-sum-exp losses: the engines' row_lse call ----------------------
// Every mode but 3 is lse(T u O) - lse(T) for a target set T and the other classes
// O of a row (classes outside both are excluded: weight 0, gradient 0):
//   0: T = {label},          O = the rest       -log softmax(l)_label
//   1: T = {index},          O = the rest       -log softmax(l)_index      (GAN.15)
//   2: T = {0..K-2},         O = {K-1}          -log(1 - p_last)           (GAN.15)
//   4: T = {label},          O = {0..K-2} - T   -log p(label | not last)   (GAN.19)
//   3: lse(l) - log K over all classes (the IWAE bound), gradient softmax(l). (VAE.10)
// Computed as softplus(d), d = lse(O) - lse(T), with gradient sigma(d) softmax_O(l)
// on O and -sigma(d) softmax_T(l) on T (GAN.19): no difference of two large
// log-sum-exps, and each set is shifted by its OWN maximum. The shift of an entry
// equal to its set's maximum is exactly 0, so a +inf logit gives e^0 = 1 rather
// than inf - inf: finite wherever the math is (a +inf real-class logit makes
// -log(1 - p_fake) = 0). NaN anywhere in the sets gives NaN.
enum RowLseMode : int { kLseLabel = 0, kLseIndex = 1, kLseAllButLast = 2, kLseMinusLogK = 3, kLseRealLabel = 4 };

// 1: k in T; 0: k in O; -1: excluded.
GENLOSS_HD int lse_role(int mode, int64_t k, int64_t K, int64_t target) {
  if (mode == kLseMinusLogK) return 0;
  if (mode == kLseAllButLast) return k < K - 1 ? 1 : 0;
  if (mode == kLseRealLabel && k == K - 1) return -1;
  return k == target ? 1 : 0;
}

// x - m for m the maximum of x's set: exactly 0 at x == m (m = +inf included).
GENLOSS_HD double lse_shift(double x, double m) {
  return x == m ? 0.0 : x - m;
}

// Statistics of one row in double: call max() over the row, then add(), then
// finish(); grad() per class after that.
struct LseRow {
  double m[2] = {0.0, 0.0}, s[2] = {0.0, 0.0};  // [0]: O, [1]: T
  bool seen[2] = {false, false};
  double sig = 0.0;
  GENLOSS_HD void max(int role, double x) {
    if (role < 0) return;
    // x != x: a NaN becomes the maximum and stays it (every shift is then NaN).
    if (!seen[role] || x > m[role] || x != x) m[role] = x;
    seen[role] = true;
  }
  GENLOSS_HD void add(int role, double x) {
    if (role >= 0) s[role] += gl_exp(lse_shift(x, m[role]));
  }
  // lse of a set; an empty set (s = 0) gives log 0 = -inf.
  GENLOSS_HD double lse(int role) const { return m[role] + gl_log(s[role]); }
  GENLOSS_HD double finish(int mode, int64_t K) {
    if (mode == kLseMinusLogK) return lse(0) - gl_log(static_cast<double>(K));
    double v;
    softplus_and_sigmoid(lse(0) - lse(1), v, sig);  // (GAN.19)
    return v;
  }
  GENLOSS_HD double grad(int mode, int role, double x) const {
    if (role < 0) return 0.0;
    const double soft = gl_exp(lse_shift(x, m[role])) / s[role];
    if (mode == kLseMinusLogK) return soft;
    return role == 1 ? -sig * soft : sig * soft;
  }
};

}  // namespace ops
}  // namespace genloss
