// emulator.h — the subset of CUDA that genloss's kernels use, emulated on the host, so that
// the CUDA engine (cuda/*.cu) runs in the test suite on machines without a GPU.
//
// Why: most CI machines and contributors have no GPU, and a GPU session is rare and short.
// Before this, a CUDA kernel written here ran for the first time on a lent GPU, where every
// minute counts. Emulated, the same kernel source runs on CPU tensors through the engine's
// one Call path (plan.cpp run_one), and the CPU-engine and reference tests check it.
//
// How: translate.py rewrites each .cu file's launches `k<<<grid, block, shmem, stream>>>(args)`
// into `::genloss_emulator::launch([&] { k(args); }, grid, block, shmem, stream)`, and
// `extern __shared__` arrays into the launch's dynamic shared memory; the macros below make
// `__shared__` `static` (one block runs at a time, so a function-static array IS the block's
// shared memory) and the qualifiers nothing. A launch runs the blocks one after another;
// inside a block every thread is a fiber on one OS thread, switched only at a barrier
// (__syncthreads, __syncwarp) or a warp collective (shuffles, ballot), which wait for the
// threads they name exactly as the hardware does. Device memory is host memory; streams are
// ignored (everything is synchronous, which is one valid order of a CUDA stream).
//
// What it cannot show: most races between threads that do not synchronise (a fiber runs
// until it waits; launches alternate the order in which a block's fibers are resumed, which
// exposes a read that relies on the writer having run first), memory-model and coalescing
// effects, speed, and the last bits of float math
// (host libm and no FMA contraction, where the GPU uses libdevice and contracts a * b + c).
// Those need the GPU run (bench/gpu_check.sh).
//
// The translated sources are compiled with -Dgenloss=genloss_emulated, so the emulated
// engine's symbols never meet the real CUDA engine's or the CPU engine's in one module, and
// this header keeps its own names (cudaStream_t, dim3, __half, ...) in a namespace: a
// module can link both the real CUDA runtime and this emulator.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifndef __CUDACC__
#define __CUDACC__ 1  // genloss's headers take their CUDA branches (libm math, no CPU polynomials)
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define CUDART_VERSION 13000

namespace genloss_emulator {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// The running thread's coordinates (the fiber the scheduler resumed last).
struct ThreadCtx {
  dim3 thread, block, block_dim, grid_dim;
};
const ThreadCtx& current();
void* dynamic_shared();  // `extern __shared__` storage: the launch's shmem bytes

// Block barrier and warp collectives: they return once every live thread they name has
// arrived (a thread that returned counts as arrived, as on Volta and later GPUs).
// site: where the barrier is in the source (__syncthreads() below is a macro that names it):
// live threads of a block meeting at two different barriers is undefined behaviour on a GPU
// (compute-sanitizer's synccheck reports it) and raises here.
void syncthreads(const char* site);
int syncthreads_or(const char* site, int pred);  // a barrier; nonzero when any live thread passed pred != 0
void syncwarp(unsigned mask);
// The 64-bit words the lanes in `mask` put in, after all arrived (indexed by lane).
const uint64_t* warp_exchange(unsigned mask, uint64_t mine);
int lane_id();

// ---- the runtime API the engine calls ------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9
};
struct EmulatedStream;
using cudaStream_t = EmulatedStream*;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t s);
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t bytes, cudaMemcpyKind k, cudaStream_t st);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDriverGetVersion(int* v);

// Runs fn() as every thread of a grid x block launch (launches count and validate as the
// hardware does: an empty or oversized configuration sets cudaErrorInvalidConfiguration).
void launch_grid(void (*body)(void*), void* ctx, dim3 grid, dim3 block, size_t shmem);
uint64_t launch_count();  // the launches that ran, in this process (tests: the emulator was used)
template <class Fn>
void launch(Fn&& fn, dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t = nullptr) {
  launch_grid([](void* c) { (*static_cast<std::remove_reference_t<Fn>*>(c))(); }, &fn, grid, block, shmem);
}

// ---- intrinsics ----------------------------------------------------------------------
inline double __dadd_rn(double a, double b) {
  return a + b;
}
inline double __dsub_rn(double a, double b) {
  return a - b;
}
inline double __dmul_rn(double a, double b) {
  return a * b;
}
inline double __ddiv_rn(double a, double b) {
  return a / b;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}
inline int __popc(unsigned v) {
  return __builtin_popcount(v);
}
inline double rsqrt(double x) {
  return 1.0 / std::sqrt(x);
}
inline float rsqrt(float x) {
  return 1.0f / std::sqrt(x);
}
#define GENLOSS_EMULATOR_STR2(x) #x
#define GENLOSS_EMULATOR_STR(x) GENLOSS_EMULATOR_STR2(x)
#define __syncthreads() ::genloss_emulator::syncthreads(__FILE__ ":" GENLOSS_EMULATOR_STR(__LINE__))
#define __syncthreads_or(pred) ::genloss_emulator::syncthreads_or(__FILE__ ":" GENLOSS_EMULATOR_STR(__LINE__), (pred))
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  syncwarp(mask);
}
// Cooperative fibers never interleave inside one call: a plain read-modify-write is atomic.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

template <class T>
uint64_t to_word(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a shuffled value fits a 64-bit word");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof v);
  return w;
}
template <class T>
T from_word(uint64_t w) {
  T v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const uint64_t* w = warp_exchange(mask, to_word(v));
  const int base = lane_id() & ~(width - 1);
  return from_word<T>(w[base + (src & (width - 1))]);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const uint64_t* w = warp_exchange(mask, to_word(v));
  const int lane = lane_id(), in_seg = lane & (width - 1);
  return in_seg + static_cast<int>(delta) < width ? from_word<T>(w[lane + delta]) : v;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const uint64_t* w = warp_exchange(mask, to_word(v));
  const int lane = lane_id(), src = lane ^ lane_mask;
  return (src & ~(width - 1)) == (lane & ~(width - 1)) ? from_word<T>(w[src]) : v;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* w = warp_exchange(mask, pred != 0);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && w[l]) r |= 1u << l;
  return r;
}

// ---- 16-bit storage types: round to nearest even on store, exact widening on load -----
struct __half {
  uint16_t bits = 0;
};
struct __nv_bfloat16 {
  uint16_t bits = 0;
};
float __half2float(__half h);
__half __float2half_rn(float f);
float __bfloat162float(__nv_bfloat16 h);
__nv_bfloat16 __float2bfloat16_rn(float f);

// ---- CUB: the one algorithm quant.cu uses -------------------------------------------
namespace cub {
struct DeviceRadixSort {
  // A stable sort of (key, value) pairs by the key bits [begin_bit, end_bit), as CUB's.
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const unsigned* keys_in, unsigned* keys_out,
                               const int* values_in, int* values_out, int n, int begin_bit, int end_bit,
                               cudaStream_t stream = nullptr);
};
}  // namespace cub

}  // namespace genloss_emulator

using namespace genloss_emulator;  // NOLINT: the translated sources name these unqualified

#define threadIdx (::genloss_emulator::current().thread)
#define blockIdx (::genloss_emulator::current().block)
#define blockDim (::genloss_emulator::current().block_dim)
#define gridDim (::genloss_emulator::current().grid_dim)
