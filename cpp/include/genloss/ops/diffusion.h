// genloss/ops/diffusion.h — per-element (value, derivative) functors of the
// diffusion family. Tags (DIF.n) point to derivations/diffusion.md.
//
// The schedule enters through the per-row parameter table (Params::rp, see
// MapReduceArgs in engine.h): Python gathers nothing per element; the engine
// hands each row (sample) the schedule's float64 entries at that sample's
// timestep (never rounded to the input's low precision).
#pragma once

#include "genloss/common.h"

namespace genloss {
namespace ops {

// ---- the normal CDF in log space, in double (DIF.10) --------------------------
// float32's erfc underflows near z = -13, long before the asymptotic series is
// accurate, so these always run in double; they are only used by the decoder
// term (one row in T of vlb_term) and by discretized_gaussian_log_likelihood.
GENLOSS_HD double gl_erfc(double x) {
  return ::erfc(x);
}
GENLOSS_HD double gl_erf(double x) {
  return ::erf(x);
}

constexpr double kLogSqrt2Pi = 0.91893853320467274178;
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kAsymptoticBelow = -20.0;

GENLOSS_HD double log_normal_pdf(double z) {
  return -0.5 * z * z - kLogSqrt2Pi;
}

// S(z) = sum_{n<=12} (-1)^n (2n-1)!! / z^{2n}: Phi(z) = phi(z) S(z) / (-z) as z -> -inf.
GENLOSS_HD double mills_series(double z) {
  const double w = 1.0 / (z * z);
  double s = 1.0;
  for (int n = 12; n > 0; --n) s = 1.0 - (2 * n - 1) * w * s;
  return s;
}

// log Phi(z), a few ulp everywhere: log1p above 0, erfc in the middle, the
// asymptotic series below -20 (before erfc underflows).               (DIF.10)
GENLOSS_HD double log_ndtr(double z) {
  if (z > 0.0) return ::log1p(-0.5 * gl_erfc(z * kSqrtHalf));
  if (z >= kAsymptoticBelow) return ::log(0.5 * gl_erfc(-z * kSqrtHalf));
  return log_normal_pdf(z) - ::log(-z) + ::log(mills_series(z));
}

// d/dz log Phi(z) = phi(z) / Phi(z), the inverse Mills ratio.        (DIF.10)
GENLOSS_HD double log_ndtr_grad(double z) {
  if (z < kAsymptoticBelow) return -z / mills_series(z);
  return ::exp(log_normal_pdf(z) - log_ndtr(z));
}

// log(Phi(b) - Phi(a)) for finite a < b, moved to the lower side first so the
// subtraction is of the smaller CDFs; with both ends in (-1, 1), the erf
// difference instead: its relative error ~ eps |z| / (b - a) beats the log
// form's ~ eps / (b - a), which returns -inf for a centred bin narrower than
// eps (a decoder log-scale of 35); the two errors cross near |z| ~ 0.9.  (DIF.10)
constexpr double kErfBelow = 1.0;
GENLOSS_HD double log_diff_ndtr(double a, double b) {
  if (gl_abs(a) < kErfBelow && gl_abs(b) < kErfBelow)
    return ::log(0.5 * (gl_erf(b * kSqrtHalf) - gl_erf(a * kSqrtHalf)));
  double lo = a, hi = b;
  if (a + b > 0.0) {
    lo = -b;
    hi = -a;
  }
  const double log_hi = log_ndtr(hi);
  return log_hi + ::log1p(-::exp(log_ndtr(lo) - log_hi));
}

// The slopes of log_diff_ndtr for finite a < b: da = -phi(a)/P, db = phi(b)/P.
// On the lower side, with r = log Phi(lo) - log Phi(hi) <= 0, each is an
// inverse Mills ratio over a factor: phi(hi)/P = m(hi) / -expm1(r) and
// phi(lo)/P = m(lo) / expm1(-r). exp(log phi - log P) would subtract two
// numbers ~ z^2/2 (every digit lost at a decoder log-scale of -18). Inside
// (-1, 1), where log P is the erf difference and r can round to 0, the
// exponent form is exact and kept.                                   (DIF.10)
GENLOSS_HD void log_diff_ndtr_grad(double a, double b, double logp, double& da, double& db) {
  if (gl_abs(a) < kErfBelow && gl_abs(b) < kErfBelow) {
    da = -::exp(log_normal_pdf(a) - logp);
    db = ::exp(log_normal_pdf(b) - logp);
    return;
  }
  const bool flip = a + b > 0.0;
  const double lo = flip ? -b : a, hi = flip ? -a : b;
  const double r = log_ndtr(lo) - log_ndtr(hi);
  const double d_hi = log_ndtr_grad(hi) / -::expm1(r);
  const double d_lo = log_ndtr_grad(lo) / ::expm1(-r);
  da = -(flip ? d_hi : d_lo);  // Phi(b) - Phi(a) = Phi(-a) - Phi(-b): a flipped pair swaps roles
  db = flip ? d_lo : d_hi;
}

// improved-diffusion's tanh approximation of Phi and its derivative.  (DIF.11)
constexpr double kTanhC = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kTanhK = 0.044715;
constexpr double kTanhClamp = 1e-12;

// Phi(z) ~ 1/2 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi)(z + 0.044715 z^3), and
// its derivative 2 sigmoid(2u) sigmoid(-2u) u' (no 1 - tanh^2 cancellation).
GENLOSS_HD double tanh_u(double z) {
  return kTanhC * (z + kTanhK * z * z * z);
}
GENLOSS_HD double tanh_cdf(double z) {
  return sigmoid(2.0 * tanh_u(z));
}
GENLOSS_HD double tanh_cdf_grad(double z) {
  const double u2 = 2.0 * tanh_u(z);
  return 2.0 * sigmoid(u2) * sigmoid(-u2) * kTanhC * (1.0 + 3.0 * kTanhK * z * z);
}

// log P(bin of x) under N(mean, e^{2 log_scale}), edge bins open, and its
// derivatives w.r.t. mean and log_scale.  h is half the bin width; tanh selects
// the approximation (clamped at 1e-12, zero slope where clamped).  (DIF.9-DIF.11)
GENLOSS_HD void discretized_ll(double x, double mean, double log_scale, double h, bool tanh, double& logp,
                               double& dmean, double& dlog_scale) {
  const bool lowest = x < -1.0 + h;
  const bool highest = x > 1.0 - h;
  const double inv_s = ::exp(-log_scale);
  const double zlo = lowest ? 0.0 : (x - mean - h) * inv_s;  // (DIF.9) an open end reads 0
  const double zhi = highest ? 0.0 : (x - mean + h) * inv_s;
  double d_lo = 0.0, d_hi = 0.0;
  if (tanh) {
    // in the upper half, the difference of the two upper tails (1 - cdf(z) = cdf(-z)):
    // the same mass without cancelling two numbers near 1
    const bool upper = highest ? !lowest : (!lowest && zlo + zhi > 0.0);
    const double prob = upper ? (lowest ? 1.0 : tanh_cdf(-zlo)) - (highest ? 0.0 : tanh_cdf(-zhi))
                              : (highest ? 1.0 : tanh_cdf(zhi)) - (lowest ? 0.0 : tanh_cdf(zlo));
    const bool live = !(prob <= kTanhClamp);  // (a NaN mean or log-scale stays NaN: not clamped)
    logp = ::log(live ? prob : kTanhClamp);   // (DIF.11) the clamp
    const double inv = live ? 1.0 / prob : 0.0;
    if (!highest) d_hi = tanh_cdf_grad(zhi) * inv;
    if (!lowest) d_lo = -tanh_cdf_grad(zlo) * inv;
  } else if (lowest && highest) {  // one bin covers the line (cannot happen for bits >= 1)
    logp = 0.0;
  } else if (lowest) {  // log Phi(hi): slope the inverse Mills ratio
    logp = log_ndtr(zhi);
    d_hi = log_ndtr_grad(zhi);
  } else if (highest) {  // log Phi(-lo)
    logp = log_ndtr(-zlo);
    d_lo = -log_ndtr_grad(-zlo);
  } else {  // (DIF.10) d/dhi = phi(hi)/P, d/dlo = -phi(lo)/P
    logp = log_diff_ndtr(zlo, zhi);
    log_diff_ndtr_grad(zlo, zhi, logp, d_lo, d_hi);
  }
  dmean = -inv_s * (d_hi + d_lo);           // dz/dmean = -e^{-s}
  dlog_scale = -(d_hi * zhi + d_lo * zlo);  // dz/ds = -z
}

// Elementwise log-probability of the data bin; inputs (x, mean, log_scale),
// p.a = h = 1/(2^bits - 1), p.mode 0 exact / 1 tanh. d/dx is 0 (data).
struct DiscretizedGaussianLL {
  static constexpr int arity = 3;
  static constexpr ParamNames params{"bin_width", nullptr, nullptr, "tanh_cdf"};
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>& p, T& v, T* d) {
    double lp, dm, ds;
    discretized_ll(double(in[0]), double(in[1]), double(in[2]), double(p.a), p.mode == 1, lp, dm, ds);
    v = T(lp);
    d[0] = T(0);
    d[1] = T(dm);
    d[2] = T(ds);
  }
};

// a x + b y with (a, b) = (rp[0], rp[1]) per row: q_sample, v_target,
// predict_x0_from_eps, posterior_mean_from_eps and the posterior mean.
//                                                       (DIF.2, DIF.3, DIF.7, DIF.14)
struct RowAffine {
  static constexpr int arity = 2;
  template <class T>
  GENLOSS_HD static void eval(T x, T y, const Params<T>& p, T& v, T& dx, T& dy) {
    const T a = T(p.rp[0]), b = T(p.rp[1]);
    v = a * x + b * y;
    dx = a;
    dy = b;
  }
};

// (pred - target)^2 with the target a x0 + b noise built in place, (a, b) =
// (rp[0], rp[1]): eps (0, 1), x0 (1, 0), v (-sqrt(1-abar), sqrt(abar)).
// Inputs (pred, x0, noise). An input whose coefficient is 0 does not enter the
// target (eps: x0; x0: noise): selected out, not multiplied by 0, so an inf
// there does not make 0 * inf = NaN.                            (DIF.12, DIF.14)
struct DiffusionMSE {
  static constexpr int arity = 3;
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>& p, T& v, T* d) {
    const T a = T(p.rp[0]), b = T(p.rp[1]);
    const T ax = a == T(0) ? T(0) : a * in[1];
    const T bn = b == T(0) ? T(0) : b * in[2];
    const T r = in[0] - (ax + bn);
    v = r * r;
    d[0] = T(2) * r;
    d[1] = -d[0] * a;
    d[2] = -d[0] * b;
  }
};

// L_T per element: a + b x0^2 with a = 1/2 (-abar - log(1 - abar)) and
// b = abar/2 (scalars, precomputed in float64).                       (DIF.5)
struct PriorKL {
  static constexpr int arity = 1;
  static constexpr ParamNames params{"constant", "half_alpha_bar"};
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>& p, T& v, T& dx) {
    v = p.a + p.b * x * x;
    dx = T(2) * p.b * x;
  }
};

// Per-row table of vlb_term (python/genloss/native/diffusion.py builds it).
enum VlbRow : int {
  kVlbC1 = 0,        // posterior mean coefficient of x0
  kVlbC2 = 1,        // ... of x_t
  kVlbK1 = 2,        // model mean: k1 x_t - k2 eps, k1 = 1/sqrt(alpha_t)
  kVlbK2 = 3,        // k2 = beta_t / (sqrt(1 - abar_t) sqrt(alpha_t))
  kVlbLogTilde = 4,  // log beta~_t (clipped at t = 0)
  kVlbLogBeta = 5,   // log beta_t
  kVlbFixedLv = 6,   // the fixed model log-variance (fixedlarge)
  kVlbFirst = 7,     // 1 at t = 0: the decoder term
  kVlbFixedW = 8,    // e^{-fixed lv}
  kVlbFixedC = 9,    // 1/2 (expm1(delta) - delta), delta = log beta~ - fixed lv
  kVlbC2K1 = 10,     // c2 - k1 = -beta_t / ((1 - abar_t) sqrt(alpha_t)), formed in float64
  kVlbWTilde = 11,   // e^{-log beta~}: the learned range's e^{-lv} = e^{delta} e^{-log beta~}
  kVlbStride = 12
};

// The model's log-variance of p(x_{t-1} | x_t), log beta~ + (v + 1)/2 (log beta -
// log beta~) for the learned range (v = in[3]), else the fixed one.  (DIF.8)
template <bool kLearned, class T>
GENLOSS_HD T vlb_log_variance(const T* in, const Params<T>& p) {
  if constexpr (kLearned)
    return T(p.rp[kVlbLogTilde]) + T(0.5) * (in[3] + T(1)) * T(p.rp[kVlbLogBeta] - p.rp[kVlbLogTilde]);
  else
    return T(p.rp[kVlbFixedLv]);
}

// t = 0: the decoder NLL -log p(x0 | x1) with mean mu_theta = k1 x_t - k2 eps and
// log-scale lv/2, all in float64 (the bin is narrow: the tail derivatives grow
// like z^2, and float32 rounding of the mean or lv would show); inputs and
// outputs as VlbKL.                                       (DIF.4, DIF.7-DIF.9)
template <bool kLearned>
struct VlbDecoder {
  static constexpr int arity = 4;
  static constexpr ParamNames params{"bin_width"};
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>& p, T& v, T* d) {
    const double* r = p.rp;
    const double mean = r[kVlbK1] * double(in[1]) - r[kVlbK2] * double(in[2]);
    const double lv =
        kLearned ? r[kVlbLogTilde] + 0.5 * (double(in[3]) + 1.0) * (r[kVlbLogBeta] - r[kVlbLogTilde]) : r[kVlbFixedLv];
    double lp, dm, ds;
    discretized_ll(double(in[0]), mean, 0.5 * lv, double(p.a), false, lp, dm, ds);
    v = gl_abs(in[0]) <= T(1) ? T(-lp) : gl_nan<T>();  // x0 off the data box [-1, 1]: marked
    d[0] = T(0);
    d[1] = T(0);
    d[2] = T(r[kVlbK2] * dm);                                                            // (DIF.7)
    d[3] = kLearned ? T(0.5 * (r[kVlbLogBeta] - r[kVlbLogTilde]) * (-0.5) * ds) : T(0);  // (DIF.8)
  }
};

// t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) per element, the expm1
// form of normal_kl (VAE.5); inputs (x0, x_t, eps_pred, v); gradients w.r.t.
// eps_pred and v (x0, x_t: 0). The fixed variance needs no transcendental per
// element: e^{-lv} and the variance part come from the table.  (DIF.4, DIF.6)
template <bool kLearned>
struct VlbKLT {
  static constexpr int arity = 4;
  static constexpr ParamNames params{"bin_width"};
  using Alt = VlbDecoder<kLearned>;
  static constexpr int alt_flag = kVlbFirst;
  template <class T>
  GENLOSS_HD static void eval(const T* in, const Params<T>& p, T& v, T* d) {
    // posterior mean - model mean, c1 x0 + (c2 - k1) x_t + k2 eps: c2 and k1 agree to
    // O(beta), so their difference is formed in float64 in the table, not here
    const T k2 = T(p.rp[kVlbK2]);
    const T dm = T(p.rp[kVlbC1]) * in[0] + T(p.rp[kVlbC2K1]) * in[1] + k2 * in[2];
    d[0] = T(0);
    d[1] = T(0);
    if constexpr (kLearned) {
      const T lv = vlb_log_variance<true>(in, p);
      const T delta = T(p.rp[kVlbLogTilde]) - lv;
      T ed, em1;
      exp_expm1(delta, ed, em1);  // one reduction for both (no libmvec call in the loop)
      const T w = ed * T(p.rp[kVlbWTilde]);
      const T q = dm * dm * w;
      v = T(0.5) * (em1 - delta + q);
      d[2] = k2 * dm * w;  // dKL/dmean = -dm w, dmean/deps = -k2
      d[3] = T(0.5 * (p.rp[kVlbLogBeta] - p.rp[kVlbLogTilde])) * (T(-0.5) * (em1 + q));
    } else {
      const T w = T(p.rp[kVlbFixedW]);
      v = T(p.rp[kVlbFixedC]) + T(0.5) * dm * dm * w;
      d[2] = k2 * dm * w;
      d[3] = T(0);
    }
    // x0 must lie in the decoder's data box [-1, 1] on every row (NaN fails too): a value
    // of NaN marks it, and the caller reads x0 again to name it (no separate pass).
    v = gl_abs(in[0]) <= T(1) ? v : gl_nan<T>();
  }
};
using VlbKL = VlbKLT<false>;
using VlbKLLearned = VlbKLT<true>;

// VDM's discrete-time weight T/2 expm1(gamma_t - gamma_s) per sample (row functor of kind
// row_map, engine.h), in float64. Inputs (gamma_t, gamma_s).                 (DIF.17)
struct VdmDiscreteRows {
  static constexpr int n_in = 2, n_table = 0, n_out = 1;
  static constexpr ParamNames params{"half_T"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double*, double* out) {
    out[0] = p.a * gl_expm1(in[0] - in[1]);
  }
};

// Its gradients from the raw row sums m = g ||eps - eps_pred||^2: d/dgamma_t =
// T/2 e^{gamma_t - gamma_s} m = -d/dgamma_s. Inputs (gamma_t, gamma_s, m).   (DIF.17)
struct VdmDiscreteGrads {
  static constexpr int n_in = 3, n_table = 0, n_out = 2;
  static constexpr ParamNames params{"half_T"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double*, double* out) {
    out[0] = p.a * gl_exp(in[0] - in[1]) * in[2];
    out[1] = -out[0];
  }
};

}  // namespace ops
}  // namespace genloss
