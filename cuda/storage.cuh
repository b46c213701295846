// storage.cuh — how the CUDA kernels read and write the storage dtypes: float32 and
// float64 as themselves, float16 / bfloat16 widened to a float32 compute type on load
// and rounded to nearest on store. Shared by engine.cu and mmd.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "genloss/common.h"  // compute_t

namespace genloss {
namespace cuda {

template <class S>
__device__ __forceinline__ compute_t<S> load(const S* p, int64_t i) {
  return static_cast<compute_t<S>>(p[i]);
}
template <>
__device__ __forceinline__ float load(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// Any value (float or double) stored into any storage type.
template <class S, class V>
__device__ __forceinline__ void store(S* p, int64_t i, V v) {
  p[i] = static_cast<S>(v);
}
template <class V>
__device__ __forceinline__ void store(__half* p, int64_t i, V v) {
  p[i] = __float2half_rn(static_cast<float>(v));
}
template <class V>
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, V v) {
  p[i] = __float2bfloat16_rn(static_cast<float>(v));
}

}  // namespace cuda
}  // namespace genloss
