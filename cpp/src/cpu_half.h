// cpu_half.h — float16 / bfloat16 storage on the CPU: the elementwise engine (map_reduce) loads
// them, computes in float32 and stores them, as the CUDA storage kernels do (cuda/storage.cuh).
// The conversions are written with integer and float32 operations only (no _Float16, no F16C):
// one definition on every compiler and instruction set, round to nearest even, infinities and
// NaNs kept (a NaN stays a quiet NaN of its sign), float16 subnormals exact. map_reduce's float16
// loop in the avx2/avx512 builds converts a block at a time with F16C instead (cpu_kernels.cpp,
// widen_block), to the same bits. tests/test_low_storage.py checks both directions, under every
// ISA build, against torch's conversions on every 16-bit pattern and on float32 values around
// every rounding boundary.
#pragma once

#include <cstdint>
#include <cstring>

namespace genloss {
namespace cpu {

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float widen(BF16 h) {
  return bits_float(static_cast<uint32_t>(h.bits) << 16);
}

inline float widen(F16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m 2^-24, exact in float32
    const float v = static_cast<float>(m) * 0x1p-24f;
    return bits_float(float_bits(v) | sign);
  }
  const uint32_t x = e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13);
  return bits_float(x | sign);
}

template <class S>
inline S narrow(float f);

template <>
inline BF16 narrow<BF16>(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  // round to nearest even on the low 16 bits (a carry moves into the exponent: up to inf)
  return BF16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

template <>
inline F16 narrow<F16>(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return F16{static_cast<uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu))};  // NaN
  if (x >= 0x477ff000u) return F16{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 (and inf): inf
  if (x < 0x38800000u) {  // below 2^-14: a subnormal m 2^-24, m rounded to nearest even
    // |f| 2^24 is exact (a power-of-two scale); adding and taking off 2^23 rounds it to an
    // integer, to nearest even, in float32 arithmetic (no contraction: CMakeLists.txt)
    const float t = bits_float(x) * 0x1p24f;
    const float m = (t + 0x1p23f) - 0x1p23f;
    return F16{static_cast<uint16_t>(sign | static_cast<uint16_t>(m))};  // m = 1024: the smallest normal
  }
  const uint32_t r = x - 0x38000000u;  // rebias the exponent (127 -> 15)
  return F16{static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13))};
}

// Loads and stores of any storage type in its compute type.
inline float load(BF16 v) {
  return widen(v);
}
inline float load(F16 v) {
  return widen(v);
}
inline float load(float v) {
  return v;
}
inline double load(double v) {
  return v;
}
template <class S, class V>
inline S store_as(V v) {
  if constexpr (sizeof(S) == 2)
    return narrow<S>(static_cast<float>(v));
  else
    return static_cast<S>(v);
}

}  // namespace cpu
}  // namespace genloss
