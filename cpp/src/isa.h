// isa.h — what the kernel files built once per instruction set (cpu_kernels.cpp, mmd_cpu.cpp,
// knn_cpu.cpp, quant_cpu.cpp, ot_cpu.cpp; GENLOSS_ISA names the build) share about it: the
// guard that GENLOSS_ISA is set, the vector width tiles are sized by, the explicit fused
// multiply-add.
#pragma once

#include <cmath>

#ifndef GENLOSS_ISA
#error "GENLOSS_ISA must name the instruction set of this translation unit"
#endif

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// a * b + c, fused where the instruction set has FMA. The engine builds with -ffp-contract=off,
// so only this explicit call fuses (on sse2 std::fma would be a slow libm call, hence the plain
// form there). Either way one rounding per product and per add at most: the rounding bounds the
// kernels rely on (MET.29's gamma_D) cover both.
template <class T>
inline T madd(T a, T b, T c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

}  // namespace GENLOSS_ISA
}  // namespace cpu
}  // namespace genloss
