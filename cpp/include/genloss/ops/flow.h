// genloss/ops/flow.h — per-element (value, derivative) functors of the
// continuous-time family. Tags (FLOW.n) point to derivations/flow.md.
//
// Time-dependent weights lambda(t) are per sample: a row functor (below) forms the
// B values w_b lambda(t_b) and the engine reads them as row weights (MapReduceArgs::
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

// ---- Row functors: per-sample coefficients (engine.h RowMapArgs, kind row_map) --------
// The B numbers a loss needs per sample (EDM's coefficients of sigma_b, lambda(t_b), iCT's
// 1 / (sigma_next - sigma_i)) and the per-sample gradients formed from the row sums of a
// map_reduce pass, computed in float64 by the engine from (B,) inputs of the call's dtype.
// So these compositions are engine calls only, which the plan cache replays (plan.cpp).
// A row functor declares n_in inputs (widened to double; an absent one reads as
// fallback(q)), n_table float64 columns of a per-row table it writes (a map_reduce table),
// n_out per-row outputs rounded to the call's dtype, and its parameters (ParamNames).

constexpr int kMaxRowTable = 4;  // table columns a row functor may write
constexpr int kMaxRowOut = 2;    // per-row outputs of the call's dtype

// The weightings lambda(sigma) of denoiser_loss (the mode of DenoiserRows/DenoiserGrads).
enum DenoiserWeighting : int { kDenoiseEdm = 0, kDenoiseSnr = 1, kDenoiseSoftMinSnr = 2, kDenoiseMinSnr = 3 };

// EDM's per-sample coefficients at noise level s (FLOW.21-FLOW.23), rho = sqrt(s^2 + sd^2):
// F_tgt = a x0 + b noise with a = s / (sd rho), b = -sd / rho; k = sd / rho^3 = da/ds
// (db/ds = k s); W = lambda c_out^2 the weight of the F-space mean square, and W' = dW/ds.
// Every one is bounded for s in (0, 1e50] (the range check_sigmas admits).
struct DenoiserCoef {
  double a, b, k, w, dw;
  GENLOSS_HD DenoiserCoef(double s, double sd, double gamma, int weighting) {
    const double sd2 = sd * sd, s2 = s * s, p2 = s2 + sd2, rho = gl_sqrt(p2);
    a = s / (sd * rho);
    b = -sd / rho;
    k = sd / (p2 * rho);
    const double snr_w = sd2 / p2, snr_dw = -2.0 * s * sd2 / (p2 * p2);  // lambda = 1 / s^2
    switch (weighting) {
      case kDenoiseSnr:
        w = snr_w;
        dw = snr_dw;
        break;
      case kDenoiseSoftMinSnr:  // lambda = 1 / (s^2 + sd^2)
        w = s2 * sd2 / (p2 * p2);
        dw = 2.0 * s * sd2 * (sd2 - s2) / (p2 * p2 * p2);
        break;
      case kDenoiseMinSnr:  // lambda = min(1 / s^2, gamma): gamma where gamma s^2 < 1
        if (gamma * s2 < 1.0) {
          w = gamma * s2 * snr_w;
          dw = 2.0 * gamma * s * sd2 * sd2 / (p2 * p2);
        } else {
          w = snr_w;
          dw = snr_dw;
        }
        break;
      default:  // 'edm' / 'karras': lambda = 1 / c_out^2, W = 1
        w = 1.0;
        dw = 0.0;
    }
  }
};

// denoiser_loss's rows: (sigma, logvar) -> the table (a, b, k, k sigma) that DiffusionMSE
// and DenoiserSigmaDot read, and the row weight W e^{-u} (no logvar: u = 0).  (FLOW.21-23)
struct DenoiserRows {
  static constexpr int n_in = 2, n_table = 4, n_out = 1;
  static constexpr ParamNames params{"sigma_data", "gamma", nullptr, "weighting"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double* tab, double* out) {
    const DenoiserCoef c(in[0], p.a, p.b, p.mode);
    tab[0] = c.a;
    tab[1] = c.b;
    tab[2] = c.k;
    tab[3] = c.k * in[0];
    out[0] = c.w * gl_exp(-in[1]);
  }
};

// denoiser_loss's per-sample gradients from m = g mean_i r^2 (the raw rows of DiffusionMSE,
// the reduction's weight g included) and dot = g sum_i r dF_tgt/dsigma / n (DenoiserSigmaDot):
// d/dsigma = e^{-u} (W' m - 2 W dot), d/dlogvar = value_weight - e^{-u} W m, value_weight
// = g per sample (FLOW.23). Inputs (sigma, logvar, m, dot).
struct DenoiserGrads {
  static constexpr int n_in = 4, n_table = 0, n_out = 2;
  static constexpr ParamNames params{"sigma_data", "gamma", "value_weight", "weighting"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double*, double* out) {
    const DenoiserCoef c(in[0], p.a, p.b, p.mode);
    const double eu = gl_exp(-in[1]);
    out[0] = eu * (c.dw * in[2] - 2.0 * c.w * in[3]);
    out[1] = p.c - eu * c.w * in[2];
  }
};

// lambda(t) of flow matching and its derivative (FLOW.3): mode 0 'none' 1, mode 1
// 'sigma_sqrt' t^-2, mode 2 'cosmap' 2 / (pi ((1 - t)^2 + t^2)), its denominator a sum of
// squares (no cancellation).
GENLOSS_HD void flow_weight(double t, int mode, double& w, double& dw) {
  if (mode == 0) {
    w = 1.0;
    dw = 0.0;
    return;
  }
  if (mode == 1) {
    w = 1.0 / (t * t);
    dw = -2.0 * w / t;
    return;
  }
  constexpr double kPi = 3.141592653589793;
  const double s = (1.0 - t) * (1.0 - t) + t * t;
  w = 2.0 / (kPi * s);
  dw = 4.0 * (1.0 - 2.0 * t) / (kPi * s * s);
}

// flow_matching_loss's row weight w_b lambda(t_b). Inputs (t, weights; absent: 1).
struct FlowWeightRows {
  static constexpr int n_in = 2, n_table = 0, n_out = 1;
  static constexpr ParamNames params{nullptr, nullptr, nullptr, "weighting"};
  GENLOSS_HD static double fallback(int q) { return q == 1 ? 1.0 : 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double*, double* out) {
    double w, dw;
    flow_weight(in[0], p.mode, w, dw);
    out[0] = in[1] * w;
  }
};

// flow_matching_loss's gradients w.r.t. t and the weights from m = g mean_i r^2 (the raw rows):
// d/dt = w lambda'(t) m, d/dw = lambda(t) m (FLOW.2). Inputs (t, weights; absent: 1, m).
struct FlowWeightGrads {
  static constexpr int n_in = 3, n_table = 0, n_out = 2;
  static constexpr ParamNames params{nullptr, nullptr, nullptr, "weighting"};
  GENLOSS_HD static double fallback(int q) { return q == 1 ? 1.0 : 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double*, double* out) {
    double w, dw;
    flow_weight(in[0], p.mode, w, dw);
    out[0] = in[1] * (dw * in[2]);
    out[1] = w * in[2];
  }
};

// iCT's lambda = 1 / (sigma_next - sigma_i), the difference formed in float64 (FLOW.24).
// Inputs (sigma_i, sigma_next).
struct CtWeight {
  static constexpr int n_in = 2, n_table = 0, n_out = 1;
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>&, double*, double* out) {
    out[0] = 1.0 / (in[1] - in[0]);
  }
};

// The path's per-row table (FLOW.1): (1 - c t, t), the coefficients of x0 and noise in x_t;
// with `velocity` set, (-c, 1), those of dx_t/dt = noise - c x0 (t not used). Input (t).
struct InterpolantRows {
  static constexpr int n_in = 1, n_table = 2, n_out = 0;
  static constexpr ParamNames params{"x0_coef", nullptr, nullptr, "velocity"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double* tab, double*) {
    tab[0] = p.mode ? -p.a : 1.0 - p.a * in[0];
    tab[1] = p.mode ? 1.0 : in[0];
  }
};

// sqrt(s) in float64 as a one-column table (a per-sample norm from its squared row sum).
struct SqrtRows {
  static constexpr int n_in = 1, n_table = 1, n_out = 0;
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>&, double* tab, double*) {
    tab[0] = gl_sqrt(in[0]);
  }
};

// sCM's per-row tables (FLOW.31) from the TrigFlow angle t and, for modes 2-3, the float64
// norm ||g|| of the tangent: alpha = -cos^2 t, beta = -r cos t sin t, k = 1 / (||g|| + c):
// mode 0 (alpha sd, -alpha): G = alpha sd F^- - alpha dx_t/dt; mode 1 (-beta, -beta sd):
// H = -beta x_t - beta sd dF^-/dt; mode 2 (1 + k alpha sd, -k alpha): F^- + k G; mode 3
// (1, -k): the DiffusionMSE table of r = F - (F^- + k G) + k H. Inputs (t, ||g||).
struct ScmRows {
  static constexpr int n_in = 2, n_table = 2, n_out = 0;
  static constexpr ParamNames params{"sigma_data", "r", "c", "mode"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double* tab, double*) {
    const double ct = ::cos(in[0]), st = ::sin(in[0]);
    const double alpha = -(ct * ct), beta = -p.b * ct * st, k = 1.0 / (in[1] + p.c);
    switch (p.mode) {
      case 0:
        tab[0] = alpha * p.a;
        tab[1] = -alpha;
        break;
      case 1:
        tab[0] = -beta;
        tab[1] = -beta * p.a;
        break;
      case 2:
        tab[0] = 1.0 + k * alpha * p.a;
        tab[1] = -k * alpha;
        break;
      default:
        tab[0] = 1.0;
        tab[1] = -k;
    }
  }
};

// EDM2's uncertainty weighting per sample (FLOW.23, FLOW.32): the row weight e^{-u}, and
// d/du = value_weight - e^{-u} m from the raw row means m. Inputs (logvar u, m).
struct UncertaintyRows {
  static constexpr int n_in = 2, n_table = 0, n_out = 2;
  static constexpr ParamNames params{"value_weight"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double*, double* out) {
    const double eu = gl_exp(-in[0]);
    out[0] = eu;
    out[1] = p.a - eu * in[1];
  }
};

// MeanFlow's per-row table (1, r - t) for DiffusionMSE (u_tgt = v - (t - r) du/dt), r - t
// formed in float64: exactly 0 at r = t, where du/dt is not read. Inputs (t, r). (FLOW.33)
struct MeanflowRows {
  static constexpr int n_in = 2, n_table = 2, n_out = 0;
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>&, double* tab, double*) {
    tab[0] = 1.0;
    tab[1] = in[1] - in[0];
  }
};

// MeanFlow's adaptive weight w = (delta + eps)^-p from the row sums delta. (FLOW.33)
struct MeanflowWeight {
  static constexpr int n_in = 1, n_table = 0, n_out = 1;
  static constexpr ParamNames params{"p", "eps"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double*, double* out) {
    out[0] = gl_pow(in[0] + p.b, -p.a);
  }
};

// DMD2's normaliser w = 1 / (mean|x - x0_real| + eps) from the row means: the row weight
// w^2 / 2 of the value and the per-row table (s w, -s w) of the gradient, s = scale (the
// loss scale over n). Input: the row means.                                 (FLOW.34)
struct VsdRows {
  static constexpr int n_in = 1, n_table = 2, n_out = 1;
  static constexpr ParamNames params{"scale", "eps"};
  GENLOSS_HD static double fallback(int) { return 0.0; }
  GENLOSS_HD static void eval(const double* in, const Params<double>& p, double* tab, double* out) {
    const double w = 1.0 / (in[0] + p.b);
    tab[0] = p.a * w;
    tab[1] = -p.a * w;
    out[0] = 0.5 * w * w;
  }
};

}  // namespace ops
}  // namespace genloss
