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

// Exponential of a non-positive argument. On the CPU a branch-free polynomial
// that GCC vectorises inline (no libmvec call, so no register spills in the
// fused pair loop): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes'
// degree-7 polynomial, 2^n by exponent bits; max error about 2 ulp
// on [-87, 0]; exp(x) is 0 below -87.3 (where float's normal range ends).
// On CUDA, expf / exp of libdevice.
#if defined(__CUDACC__)
GENLOSS_HD float exp_neg(float x) {
  return ::expf(x);
}
GENLOSS_HD double exp_neg(double x) {
  return ::exp(x);
}
#else
GENLOSS_HD float exp_neg(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float n = __builtin_rintf(xc * 1.44269504088896341f);
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  return x < -87.3f ? 0.0f : p * scale;
}
GENLOSS_HD double exp_neg(double x) {
  return ::exp(x);
}
#endif

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
