// genloss/common.h — what every functor and both engines share.
//
// GENLOSS_HD marks a function for host and device. The math helpers below are
// written once and used by the CPU engine (vectorised through glibc's libmvec,
// see cpp/src/cpu_kernels.cpp) and by the CUDA engine (CUDA's libdevice).
// This header includes neither torch nor pybind11: it is safe for nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GENLOSS_HD __host__ __device__ __forceinline__
#else
#define GENLOSS_HD inline __attribute__((always_inline))
#endif

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace genloss {

// Hyperparameters of one functor call. Held in the compute type T so the
// inner loop does no conversions. ``rp`` points at the current row's entry of a
// per-row parameter table (MapReduceArgs::table: the diffusion schedule gathered
// at each sample's timestep), or is null when the call has no table. The table
// is float64 whatever the compute type: a functor converts what it needs once
// per element (free next to the memory traffic) and may keep float64 where the
// conditioning asks for it.
template <class T>
struct Params {
  T a, b, c;
  int mode;
  const double* rp;
};

// ---- elementary math, overloaded for float and double ----------------------
GENLOSS_HD float gl_exp(float x) {
  return ::expf(x);
}
GENLOSS_HD double gl_exp(double x) {
  return ::exp(x);
}
GENLOSS_HD float gl_expm1(float x) {
  return ::expm1f(x);
}
GENLOSS_HD double gl_expm1(double x) {
  return ::expm1(x);
}
GENLOSS_HD float gl_log1p(float x) {
  return ::log1pf(x);
}
GENLOSS_HD double gl_log1p(double x) {
  return ::log1p(x);
}
GENLOSS_HD float gl_log(float x) {
  return ::logf(x);
}
GENLOSS_HD double gl_log(double x) {
  return ::log(x);
}
GENLOSS_HD float gl_sqrt(float x) {
  return ::sqrtf(x);
}
GENLOSS_HD double gl_sqrt(double x) {
  return ::sqrt(x);
}
GENLOSS_HD float gl_tanh(float x) {
  return ::tanhf(x);
}
GENLOSS_HD double gl_tanh(double x) {
  return ::tanh(x);
}

template <class T>
GENLOSS_HD T gl_abs(T x) {
  return x < T(0) ? -x : x;
}
template <class T>
GENLOSS_HD T gl_max(T x, T y) {
  return x > y ? x : y;
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^{-|x|})          (GAN.2)
// Never overflows: e^{-|x|} <= 1. Exact to a few ulp for every finite x.
template <class T>
GENLOSS_HD T softplus(T x) {
  return gl_max(x, T(0)) + gl_log1p(gl_exp(-gl_abs(x)));
}

// sigmoid(x) = 1/(1+e^{-x}), split on the sign so no exponential overflows.
// With e = e^{-|x|}: x >= 0 -> 1/(1+e); x < 0 -> e/(1+e).             (GAN.4)
template <class T>
GENLOSS_HD T sigmoid(T x) {
  const T e = gl_exp(-gl_abs(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}

// softplus and its derivative in one exponential.
template <class T>
GENLOSS_HD void softplus_and_sigmoid(T x, T& sp, T& sig) {
  const T e = gl_exp(-gl_abs(x));
  const T r = T(1) / (T(1) + e);
  sp = gl_max(x, T(0)) + gl_log1p(e);
  sig = x >= T(0) ? r : e * r;
}

// dtype codes shared with Python (python/genloss/native/_engine.py).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum IndexType : int { kInt64 = 0, kInt32 = 1 };

}  // namespace genloss
