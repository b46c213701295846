// genloss/common.h — what every functor and both engines share.
//
// GENLOSS_HD marks a function for host and device. The math helpers below are
// written once and used by the CPU engine (vectorised through glibc's libmvec,
// see cpp/src/cpu_kernels.cpp) and by the CUDA engine (CUDA's libdevice).
// This header includes neither torch nor pybind11: it is safe for nvcc.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define GENLOSS_HD __host__ __device__ __forceinline__
#else
#define GENLOSS_HD inline __attribute__((always_inline))
#endif

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace genloss {

// The compute type of a storage type, on both engines: float32 and float64 compute as
// themselves, the 16-bit storage types (float16, bfloat16: CPU cpu_half.h, CUDA storage.cuh)
// are widened to float32 on load and rounded on store.
template <class S>
using compute_t = std::conditional_t<sizeof(S) == 2, float, S>;

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

// The names a functor gives the slots of its Params (a, b, c, mode), declared next
// to the code that reads them as ``static constexpr ParamNames params{...}``; nullptr:
// the slot is unused (a functor without parameters declares nothing). Callers pass
// parameters by these names only (genloss._C.Call(params={...}), _C.FUNCTOR_PARAMS),
// so the meaning of a slot is stated once, here, not at every call site.
struct ParamNames {
  const char* a = nullptr;
  const char* b = nullptr;
  const char* c = nullptr;
  const char* mode = nullptr;  // an integer parameter (a flag or an enum)
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
GENLOSS_HD double gl_pow(double x, double y) {
  return ::pow(x, y);
}
GENLOSS_HD float gl_tanh(float x) {
  return ::tanhf(x);
}
GENLOSS_HD double gl_tanh(double x) {
  return ::tanh(x);
}

template <class T>
GENLOSS_HD T gl_nan() {
#if defined(__CUDACC__)
  return T(::nan(""));
#else
  return T(__builtin_nan(""));
#endif
}
// fabs: one AND of the sign bit (a compare-and-select costs three vector ops).
GENLOSS_HD float gl_abs(float x) {
  return ::fabsf(x);
}
GENLOSS_HD double gl_abs(double x) {
  return ::fabs(x);
}
template <class T>
GENLOSS_HD T gl_max(T x, T y) {
  return x > y ? x : y;
}

// ---- inline float exponentials for the CPU loops ----------------------------
// libmvec's expf is a call inside the vectorised loop, and every live vector
// register is spilled around it; these are plain code GCC vectorises inline.
// 2^f for f in [-1/2, 1/2] (the reductions below may overshoot it by an ulp):
// degree-6 fit, relative error 1.9e-9 on the range.
GENLOSS_HD float exp2_poly(float f) {
  float p = 1.5345810970757157e-4f;
  p = p * f + 1.3399930903688073e-3f;
  p = p * f + 9.618489071726799e-3f;
  p = p * f + 5.550328642129898e-2f;
  p = p * f + 2.4022646248340607e-1f;
  p = p * f + 6.931471824645996e-1f;
  return p * f + 1.0f;
}
// 1.5 2^23 + 127: added to a float t in [-126.5, 0], the sum's low mantissa bits are
// round(t) + 127; shifted left by 23 they are the exponent field of 2^round(t).
constexpr float kExpMagic = 12582912.0f + 127.0f;

// e^x for x <= 0 (CPU float): n = round(x log2 e) by the magic number, r = x - n ln 2
// in two steps (Cody-Waite: ln 2 = hi + lo, hi with 15 significant bits, so n hi is
// exact for |n| <= 126),
// e^r = 2^(r log2 e) by exp2_poly, times 2^n from the exponent bits. Max error
// about 2 ulp on [-87.3, 0] (tests/test_engine.py::test_float32_inline_exp_and_log1p_ulps); 0 below
// -87.3 (e^x under float's normal range, < 1.2e-38), where the other lanes'
// arithmetic may be garbage and is discarded by the final select; NaN stays NaN.
GENLOSS_HD float exp_nonpos(float x) {
#if defined(__CUDACC__)
  return ::expf(x);
#else
  const float nf = x * 1.44269504088896341f + kExpMagic;
  const float n = nf - kExpMagic;
  float r = x - n * 0.693145751953125f;    // ln 2 high part
  r = r - n * 1.42860682030941723212e-6f;  // ln 2 low part
  const float p = exp2_poly(r * 1.44269504088896341f);
  const float scale = __builtin_bit_cast(float, __builtin_bit_cast(unsigned, nf) << 23);
  return x < -87.3f ? 0.0f : p * scale;
#endif
}
GENLOSS_HD double exp_nonpos(double x) {
  return ::exp(x);
}

// e^x and e^x - 1 of any float x together (CPU, inline so they vectorise with the loop;
// libmvec's expf/expm1f are calls that spill every live register). n = round(x log2 e) by
// the magic number, r = x - n ln 2 in two steps (Cody-Waite, as exp_nonpos), q = e^r - 1 =
// r + r^2 P(r) with P Taylor's 1/2! .. 1/8! (|r| <= ln 2 / 2: truncation below 1.3e-9 of q).
// 2^n is built as 2^{n1} 2^{n2}, n1 = floor(n / 2), so every n in [-150, 128] keeps both
// factors in float's exponent range and the products underflow to denormals or overflow
// to inf as IEEE rounding says. e^x = 2^{n1} (1 + q) 2^{n2}; e^x - 1 = 2^n q + (2^n - 1)
// (exactly q at n = 0, no cancellation near 0), and e^x itself above x = 80, where 1 is
// far below half an ulp. Outside [-104, 89] (where the exponent bits would wrap): 0 / -1
// below, inf above; NaN stays NaN. Max error ~2 ulp
// (tests/test_engine.py::test_float32_inline_exp_expm1_ulps). CUDA and double: libm.
GENLOSS_HD void exp_expm1(float x, float& e, float& em1) {
#if defined(__CUDACC__)
  e = ::expf(x);
  em1 = ::expm1f(x);
#else
  constexpr float kRound = 12582912.0f;  // 1.5 2^23: adding it rounds to an integer
  const float nf = x * 1.44269504088896341f + kExpMagic;
  const float n = nf - kExpMagic;
  float r = x - n * 0.693145751953125f;    // ln 2 high part
  r = r - n * 1.42860682030941723212e-6f;  // ln 2 low part
  float p = 2.4801587301587302e-5f;        // 1/8!
  p = p * r + 1.9841269841269841e-4f;      // 1/7!
  p = p * r + 1.3888888888888889e-3f;      // 1/6!
  p = p * r + 8.3333333333333333e-3f;      // 1/5!
  p = p * r + 4.1666666666666667e-2f;      // 1/4!
  p = p * r + 1.6666666666666667e-1f;      // 1/3!
  p = p * r + 0.5f;
  const float q = r + (r * r) * p;
  const float n1 = (n * 0.5f - 0.25f + kRound) - kRound;  // floor(n / 2) for integer n
  const float s1 = __builtin_bit_cast(float, __builtin_bit_cast(unsigned, n1 + kExpMagic) << 23);
  const float s2 = __builtin_bit_cast(float, __builtin_bit_cast(unsigned, (n - n1) + kExpMagic) << 23);
  const float s = s1 * s2;
  const float ex = (s1 * (1.0f + q)) * s2;
  const float m1 = x > 80.0f ? ex : s * q + (s - 1.0f);
  e = x < -104.0f ? 0.0f : (x > 89.0f ? __builtin_inff() : ex);
  em1 = x < -104.0f ? -1.0f : (x > 89.0f ? __builtin_inff() : m1);
#endif
}
GENLOSS_HD void exp_expm1(double x, double& e, double& em1) {
  e = ::exp(x);
  em1 = ::expm1(x);
}

// log1p(e) for e in [0, 1] (softplus next to its sigmoid, e = e^{-|x|}). CPU float,
// inline so it vectorises with the loop (libmvec's log1pf was the largest cost of the
// Bernoulli NLL): log1p(e) = e - e^2 h(e), h(e) = (e - log1p(e)) / e^2 in [0.307, 0.5],
// h a degree-9 polynomial (weighted least squares, weights 1/h, on 6000 Chebyshev nodes
// of [0, 1] against 40-digit mpmath values; coefficients rounded to float). The
// correction e^2 h is at most 0.44 of the result, which damps h's rounding: max error
// 1.33 ulp over e in [0, 1] in float32 Horner
// (tests/test_engine.py::test_float32_inline_exp_and_log1p_ulps), 11 vector
// instructions. (It replaced a 1 + e = 2^k (1 + f) reduction with a degree-7 fit in f,
// ~22 instructions, 1.25 ulp.) CUDA and double: log1p.
#if defined(__CUDACC__)
GENLOSS_HD float log1p_unit(float e) {
  return ::log1pf(e);
}
#else
GENLOSS_HD float log1p_unit(float e) {
  float h = -2.7646850794553757e-3f;
  h = h * e + 1.7015568912029266e-2f;
  h = h * e - 4.898846149444580e-2f;
  h = h * e + 9.106287360191345e-2f;
  h = h * e - 1.3013409078121185e-1f;
  h = h * e + 1.6358062624931335e-1f;
  h = h * e - 1.9955284893512726e-1f;
  h = h * e + 2.4996615946292877e-1f;
  h = h * e - 3.333323299884796e-1f;
  h = h * e + 0.5f;
  return e - (e * e) * h;
}
#endif
GENLOSS_HD double log1p_unit(double e) {
  return ::log1p(e);
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^{-|x|})          (GAN.2)
// Never overflows: e^{-|x|} <= 1. Exact to a few ulp for every finite x.
template <class T>
GENLOSS_HD T softplus(T x) {
  return gl_max(x, T(0)) + gl_log1p(exp_nonpos(-gl_abs(x)));
}

// sigmoid(x) = 1/(1+e^{-x}), split on the sign so no exponential overflows.
// With e = e^{-|x|}: x >= 0 -> 1/(1+e); x < 0 -> e/(1+e).             (GAN.4)
template <class T>
GENLOSS_HD T sigmoid(T x) {
  const T e = exp_nonpos(-gl_abs(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}

// softplus and its derivative in one exponential.
template <class T>
GENLOSS_HD void softplus_and_sigmoid(T x, T& sp, T& sig) {
  const T e = exp_nonpos(-gl_abs(x));
  const T r = T(1) / (T(1) + e);
  sp = gl_max(x, T(0)) + log1p_unit(e);
  sig = x >= T(0) ? r : e * r;
}

// dtype codes shared with Python (python/genloss/native/_engine.py).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum IndexType : int { kInt64 = 0, kInt32 = 1 };

}  // namespace genloss
