// genloss/mmd.h — squared maximum mean discrepancy, tiled, fwd+bwd in one pass.
//
// The per-pair kernels are written once here (GENLOSS_HD) and used by the CPU
// engine (cpp/src/mmd_cpu.cpp, one build per instruction set) and the CUDA
// engine (cuda/mmd.cu). Safe for nvcc: no torch, no pybind11.
//
// Estimators (x: N points, y: M points, dimension D), with k the kernel:
//   unbiased  a S_xx + b S_yy + c S_xy,  S_xx = sum_{i != j} k(x_i, x_j),
//             a = 1/(N(N-1)), b = 1/(M(M-1)), c = -2/(NM), S_xy = sum_{i,j} k(x_i, y_j)
//   biased    the same with the diagonals, a = 1/N^2, b = 1/M^2
//   linear    N == M, n = N/2: (1/n) sum_{i<n} k(x_2i, x_2i+1) + k(y_2i, y_2i+1)
//             - k(x_2i, y_2i+1) - k(x_2i+1, y_2i)
//
// Every kernel is given as a value k and a weight w such that the gradient of
// k(a, b) with respect to a is
//   distance kernels (rbf, imq, energy), k = f(|a-b|^2):   w (a - b),  w = 2 f'(r2)
//   polynomial, k = (a.b/D + 1)^3:                           w b,        w = 3 t^2 / D
// and with respect to b, by symmetry, w (b - a) or w a.
#pragma once

#include <cstdint>

#include "genloss/common.h"

namespace genloss {

enum MmdKernel : int { kMmdRbf = 0, kMmdImq = 1, kMmdPolynomial = 2, kMmdEnergy = 3 };
enum MmdEstimator : int { kMmdUnbiased = 0, kMmdBiased = 1, kMmdLinear = 2 };

// Points per tile side on the CPU. Fixed: the summation order, hence the bits of
// the result, depend on it and on nothing else (not on the thread count).
constexpr int64_t kMmdTile = 256;

struct MmdArgs {
  int dtype;
  int kernel;     // MmdKernel
  int estimator;  // MmdEstimator
  const void* x;  // (N, D) contiguous
  const void* y;  // (M, D) contiguous
  int64_t N, M, D;
  const double* bandwidths;  // host, nbw entries (rbf, imq); ignored otherwise
  int nbw;
  void* out_value;  // one element of dtype
  double grad_scale;
  void* grad_x;  // (N, D), may be null
  void* grad_y;  // (M, D), may be null
};

namespace mmd {

// Exponentials of non-positive arguments. On CUDA, exp2f / expf of libdevice. On
// the CPU a branch-free polynomial that GCC vectorises inline (no libmvec call,
// so no register spills in the fused pair loop), written in base 2 because the
// tile loops fold log2(e) into the kernel coefficient (c' = c log2 e, t = -c' r2):
//   t = n + f, n = nearest integer (1.5 2^23 + 127 added and subtracted: the sum's
//   low mantissa bits are n + 127, shifted into the exponent field gives 2^n),
//   f in [-1/2, 1/2], 2^f by exp2_poly (genloss/common.h, a degree-6 fit),
// about 13 vector instructions; max error 0.93 ulp on [-126, 0] (checked against
// float64 exp2 on 4M points by tests/test_mmd.py). 2^t is 0 below -126 (where
// float's normal range ends); there the other lanes' arithmetic may be garbage
// and is discarded by the final select, so no clamp is needed; NaN stays NaN.
// exp_neg(x) = exp_nonpos(x) (genloss/common.h, the same polynomial after a
// Cody-Waite reduction) for the scalar paths.
#if defined(__CUDACC__)
GENLOSS_HD float exp2_neg(float t) {
  return ::exp2f(t);
}
GENLOSS_HD double exp2_neg(double t) {
  return ::exp2(t);
}
#else
GENLOSS_HD float exp2_neg(float t) {
  const float nf = t + kExpMagic;  // rounds to nearest: bits hold n + 127
  const float n = nf - kExpMagic;
  const float p = exp2_poly(t - n);
  const float scale = __builtin_bit_cast(float, __builtin_bit_cast(unsigned, nf) << 23);
  return t < -126.0f ? 0.0f : p * scale;
}
GENLOSS_HD double exp2_neg(double t) {
  return ::exp2(t);
}
#endif
template <class T>
GENLOSS_HD T exp_neg(T x) {
  return exp_nonpos(x);
}

// log2(e): the tile loops use c' = c log2(e) with exp2_neg.
constexpr double kLog2e = 1.4426950408889634074;

template <class T>
GENLOSS_HD T rsqrt(T x) {
  return T(1) / gl_sqrt(x);
}

// Sum over bandwidths of the Gaussian kernel, c_s = 1/(2 s^2):
//   k = sum_s exp(-c_s r2),  w = 2 dk/dr2 = -2 sum_s c_s exp(-c_s r2).   (DIV.8)
template <class T>
GENLOSS_HD void rbf(T r2, const T* c, int nbw, T& k, T& w) {
  k = T(0);
  w = T(0);
  for (int s = 0; s < nbw; ++s) {
    const T e = exp_neg(-c[s] * r2);
    k += e;
    w -= c[s] * e;
  }
  w *= T(2);
}

// Inverse multiquadric, c_s = 1/s^2:
//   k = sum_s (1 + c_s r2)^(-1/2),  w = 2 dk/dr2 = -sum_s c_s (1 + c_s r2)^(-3/2).   (DIV.8)
template <class T>
GENLOSS_HD void imq(T r2, const T* c, int nbw, T& k, T& w) {
  k = T(0);
  w = T(0);
  for (int s = 0; s < nbw; ++s) {
    const T u = rsqrt(T(1) + c[s] * r2);
    k += u;
    w -= c[s] * u * u * u;
  }
}

// Energy distance kernel k = -|a - b|; w = 2 dk/dr2 = -1/|a - b|, and 0 at a == b
// (the subgradient the convention fixes).                                 (DIV.8)
template <class T>
GENLOSS_HD void energy(T r2, T& k, T& w) {
  const T r = gl_sqrt(r2);
  k = -r;
  w = r > T(0) ? T(-1) / r : T(0);
}

// Cubic polynomial (KID) on the dot product p = a.b: t = p/D + 1, k = t^3,
// dk/da = 3 t^2 / D b, so w = 3 t^2 / D.                                   (DIV.8)
template <class T>
GENLOSS_HD void polynomial(T p, T inv_d, T& k, T& w) {
  const T t = p * inv_d + T(1);
  k = t * t * t;
  w = T(3) * t * t * inv_d;
}

// One kernel evaluation for a runtime kernel id (scalar paths: linear estimator,
// CUDA). s is r2 for distance kernels and the dot product for the polynomial.
template <class T>
GENLOSS_HD void eval(int kernel, T s, const T* c, int nbw, T inv_d, T& k, T& w) {
  switch (kernel) {
    case kMmdRbf:
      rbf(s, c, nbw, k, w);
      break;
    case kMmdImq:
      imq(s, c, nbw, k, w);
      break;
    case kMmdPolynomial:
      polynomial(s, inv_d, k, w);
      break;
    default:
      energy(s, k, w);
      break;
  }
}

// Estimator weights (a, b, c) of S_xx, S_yy, S_xy.
inline void estimator_weights(int estimator, int64_t N, int64_t M, double& a, double& b, double& c) {
  const double n = static_cast<double>(N), m = static_cast<double>(M);
  if (estimator == kMmdBiased) {
    a = 1.0 / (n * n);
    b = 1.0 / (m * m);
  } else {
    a = 1.0 / (n * (n - 1.0));
    b = 1.0 / (m * (m - 1.0));
  }
  c = -2.0 / (n * m);
}

// Kernel coefficients c_s from bandwidths: rbf 1/(2 s^2), imq 1/s^2.
inline double coef(int kernel, double s) {
  return kernel == kMmdRbf ? 1.0 / (2.0 * s * s) : 1.0 / (s * s);
}

}  // namespace mmd

namespace cpu {
void mmd(const MmdArgs& a);
}
namespace cuda {
void mmd(const MmdArgs& a, void* stream);
}

}  // namespace genloss
