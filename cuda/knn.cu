// knn.cu — the k-nearest-neighbour kernel of prdc on CUDA (knn.h; the CPU twin is cpp/src/knn_cpu.cpp, the math
// derivations/metrics.md MET.10-MET.13). Float32 and float64 inputs; memory O((N + M) k) beyond them.
//
// Every pair's squared distance is the EXACT d2 of knn.h: float64 differences t = double(a_d) - double(b_d), squares
// added from 0 in d order, each step rounded on its own (__dsub_rn, __dmul_rn, __dadd_rn: nvcc never contracts
// them into an FMA). The CPU decides every radius and every count on these same numbers (its GEMM expansion only
// filters, the decisions are made on the exact d2), so the radii equal the CPU's bit for bit and the counts exactly.
// (d2(a, b) = d2(b, a) bit for bit: round-to-nearest is symmetric, so a - b and b - a differ only in sign.)
//
//  * radii (MET.10): one thread per point i of a set; the other points come through shared memory in tiles of
//    kTileJ points x kTileD coordinates (float64), a tile's kTileJ distances accumulate in registers over the
//    coordinate chunks. Each thread keeps the k smallest d2 to the OTHER points (self excluded by index: a duplicate
//    at distance 0 is a neighbour) in an ascending list in global scratch (N k doubles, entry p of point i at
//    p N + i) and the k-th in a register: a pair touches the list only when its d2 is below the k-th. The result is
//    the k-th smallest, the CPU's (k+1)-th smallest with self's 0 included. Any k < N (the list is not in registers).
//  * counts (MET.11-MET.13): one thread per fake j, the reals in tiles as above with their radii in shared memory:
//    the number of reals whose ball holds f_j (d2 <= r2_i, the <= tie rule) in a register, and two flags per real
//    (some fake within its ball: coverage; inside some fake's ball: recall), written as plain stores of 1.
//  * reduction: integer atomics of per-warp integer sums (popcounts of ballots, per-thread counts): integers, so the
//    result does not depend on the order. No floating-point atomics anywhere: the same bits on every run.
// No host synchronisation and no host memory: the three launches, two memsets and the stream-ordered scratch can be
// captured in a CUDA graph.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>

#include "genloss/common.h"
#include "knn.h"
#include "scratch.cuh"

namespace genloss {
namespace cuda {
namespace {

constexpr int kThreads = 64;  // query points per block (whole warps)
constexpr int kTileJ = 32;    // other points per shared-memory tile
constexpr int kTileD = 16;    // coordinates per staged chunk
constexpr int kFlagThreads = 256;
static_assert(kThreads % 32 == 0, "whole warps: the ballots use full masks");
static_assert(kTileJ <= kThreads, "one thread loads each radius of a tile");

// acc[jj] = d2(Q[i], X[j0 + jj]) for the kTileJ points from j0 on (knn.h's order; 0 past X's end). Every thread of
// the block calls it (it stages the tiles together); a thread with i >= nq computes values that are not used.
template <class T>
__device__ __forceinline__ void tile_d2(const T* __restrict__ Q, int64_t nq, const T* __restrict__ X, int64_t n,
                                        int64_t D, int64_t i, int64_t j0, double (*tile)[kTileD],
                                        double (&acc)[kTileJ]) {
#pragma unroll
  for (int jj = 0; jj < kTileJ; ++jj) acc[jj] = 0.0;
  const bool active = i < nq;
  for (int64_t d0 = 0; d0 < D; d0 += kTileD) {
    double q[kTileD];
#pragma unroll
    for (int dd = 0; dd < kTileD; ++dd) {
      const int64_t d = d0 + dd;
      q[dd] = (active && d < D) ? static_cast<double>(Q[i * D + d]) : 0.0;
    }
    __syncthreads();  // every thread is done with the previous chunk
    for (int e = threadIdx.x; e < kTileJ * kTileD; e += kThreads) {
      const int jj = e / kTileD, dd = e % kTileD;
      const int64_t j = j0 + jj, d = d0 + dd;
      tile[jj][dd] = (j < n && d < D) ? static_cast<double>(X[j * D + d]) : 0.0;
    }
    __syncthreads();
    // Padding coordinates give t = 0 - 0 = +0 and acc + 0 = acc (acc is never -0): the sum is knn.h's.
#pragma unroll
    for (int jj = 0; jj < kTileJ; ++jj) {
#pragma unroll
      for (int dd = 0; dd < kTileD; ++dd) {
        const double t = __dsub_rn(q[dd], tile[jj][dd]);
        acc[jj] = __dadd_rn(acc[jj], __dmul_rn(t, t));
      }
    }
  }
}

// Inserts v (below the list's last entry) into the ascending list L of k entries, entry p at L[p * stride], as the
// CPU's insert_smallest; returns the new last entry. The k smallest values of a sequence are the same multiset in
// any order of insertion, ties included.
__device__ __forceinline__ double insert_smallest(double* L, int64_t stride, int64_t k, double v) {
  int64_t p = k - 1;
  for (; p > 0 && L[(p - 1) * stride] > v; --p) L[p * stride] = L[(p - 1) * stride];
  L[p * stride] = v;
  return L[(k - 1) * stride];
}

// (MET.10) r2[i] = the k-th smallest d2 from X[i] to the other points of X; lists: n k doubles of scratch.
template <class T>
__global__ void __launch_bounds__(kThreads) radii_kernel(const T* __restrict__ X, int64_t n, int64_t D, int64_t k,
                                                         double* __restrict__ lists, double* __restrict__ r2) {
  __shared__ double tile[kTileJ][kTileD];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = i < n;
  constexpr double inf = std::numeric_limits<double>::infinity();
  double* L = lists + (active ? i : 0);
  if (active)
    for (int64_t p = 0; p < k; ++p) L[p * n] = inf;
  double kth = inf;  // the list's last entry
  for (int64_t j0 = 0; j0 < n; j0 += kTileJ) {
    double acc[kTileJ];
    tile_d2(X, n, X, n, D, i, j0, tile, acc);
    if (!active) continue;  // (still in the loop: the next tile's barriers need every thread)
#pragma unroll
    for (int jj = 0; jj < kTileJ; ++jj) {
      const int64_t j = j0 + jj;
      if (j < n && j != i && acc[jj] < kth) kth = insert_smallest(L, n, k, acc[jj]);
    }
  }
  if (active) r2[i] = kth;
}

// (MET.11-MET.13) one thread per fake j: counts[2] += #{i: d2(r_i, f_j) <= rr2_i}, counts[0] += (that > 0);
// covered[i] = 1 where d2 <= rr2_i for some j, recalled[i] = 1 where d2 <= fr2_j for some j.
template <class T>
__global__ void __launch_bounds__(kThreads)
    counts_kernel(const T* __restrict__ R, int64_t n, const T* __restrict__ F, int64_t m, int64_t D,
                  const double* __restrict__ rr2, const double* __restrict__ fr2, unsigned* __restrict__ recalled,
                  unsigned* __restrict__ covered, unsigned long long* __restrict__ counts) {
  __shared__ double tile[kTileJ][kTileD];
  __shared__ double rad[kTileJ];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = j < m;
  const double fr = active ? fr2[j] : 0.0;
  unsigned long long inside = 0;  // reals whose ball holds f_j (MET.12)
  for (int64_t i0 = 0; i0 < n; i0 += kTileJ) {
    __syncthreads();  // every thread is done with the previous tile's radii
    if (threadIdx.x < kTileJ) rad[threadIdx.x] = i0 + threadIdx.x < n ? rr2[i0 + threadIdx.x] : 0.0;
    double acc[kTileJ];
    tile_d2(F, m, R, n, D, j, i0, tile, acc);  // (its barriers publish rad)
    if (!active) continue;
#pragma unroll
    for (int ii = 0; ii < kTileJ; ++ii) {
      const int64_t i = i0 + ii;
      if (i >= n) break;
      if (acc[ii] <= rad[ii]) {  // (MET.11) the <= tie rule
        ++inside;
        covered[i] = 1u;
      }
      if (acc[ii] <= fr) recalled[i] = 1u;
    }
  }
  const unsigned hit = __ballot_sync(0xffffffffu, active && inside > 0);
  if ((threadIdx.x & 31) == 0 && hit != 0u) atomicAdd(&counts[0], static_cast<unsigned long long>(__popc(hit)));
  if (inside > 0) atomicAdd(&counts[2], inside);
}

// counts[1] += #recalled, counts[3] += #covered: per-warp popcounts of ballots, one atomic per warp and count.
__global__ void __launch_bounds__(kFlagThreads)
    flag_counts(const unsigned* __restrict__ recalled, const unsigned* __restrict__ covered, int64_t n,
                unsigned long long* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kFlagThreads;
  unsigned long long rc = 0, cv = 0;
  // Every thread of a warp runs the same number of rounds (n rounded up to the grid), so the ballots are full.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kFlagThreads; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    const unsigned r = __ballot_sync(0xffffffffu, i < n && recalled[i] != 0u);
    const unsigned c = __ballot_sync(0xffffffffu, i < n && covered[i] != 0u);
    rc += static_cast<unsigned long long>(__popc(r));
    cv += static_cast<unsigned long long>(__popc(c));
  }
  if ((threadIdx.x & 31) == 0) {
    if (rc != 0) atomicAdd(&counts[1], rc);
    if (cv != 0) atomicAdd(&counts[3], cv);
  }
}

void check_launch(const char* what) {
  check_cuda(cudaGetLastError(), what);
}

template <class T>
void run(const KnnArgs& a, cudaStream_t s) {
  const T* real = static_cast<const T*>(a.real);
  const T* fake = static_cast<const T*>(a.fake);
  auto* counts = reinterpret_cast<unsigned long long*>(a.counts);
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are int64");
  check_cuda(cudaMemsetAsync(a.counts, 0, 4 * sizeof(int64_t), s), "knn_prdc: counts reset");
  if (a.N < 1 || a.M < 1 || a.D < 1) return;  // (plan.cpp refuses these; nothing to launch)
  const int64_t big = a.N > a.M ? a.N : a.M;
  if (a.k < 1 || a.k >= a.N || a.k >= a.M) throw std::invalid_argument("knn_prdc: need 1 <= k < N, M");
  if (static_cast<uint64_t>(big) > (std::numeric_limits<uint64_t>::max() / sizeof(double)) / static_cast<uint64_t>(a.k))
    throw std::length_error("knn_prdc: the neighbour lists (max(N, M) k doubles) do not fit in memory");
  {
    const Scratch lists(static_cast<size_t>(big) * static_cast<size_t>(a.k) * sizeof(double), s);
    radii_kernel<T><<<grid_exact(a.N, kThreads), kThreads, 0, s>>>(real, a.N, a.D, a.k, lists.as<double>(), a.real_r2);
    check_launch("knn_prdc: real radii");
    radii_kernel<T><<<grid_exact(a.M, kThreads), kThreads, 0, s>>>(fake, a.M, a.D, a.k, lists.as<double>(), a.fake_r2);
    check_launch("knn_prdc: fake radii");
  }
  const Scratch flags(2 * static_cast<size_t>(a.N) * sizeof(unsigned), s);
  unsigned* recalled = flags.as<unsigned>();
  unsigned* covered = recalled + a.N;
  check_cuda(cudaMemsetAsync(recalled, 0, 2 * static_cast<size_t>(a.N) * sizeof(unsigned), s), "knn_prdc: flags");
  counts_kernel<T><<<grid_exact(a.M, kThreads), kThreads, 0, s>>>(real, a.N, fake, a.M, a.D, a.real_r2, a.fake_r2,
                                                                  recalled, covered, counts);
  check_launch("knn_prdc: counts");
  const unsigned all_blocks = grid_blocks(a.N, kFlagThreads);
  const unsigned flag_blocks = all_blocks < 1024u ? all_blocks : 1024u;  // a grid stride covers the rest
  flag_counts<<<flag_blocks, kFlagThreads, 0, s>>>(recalled, covered, a.N, counts);
  check_launch("knn_prdc: flag counts");
}

}  // namespace

void knn_prdc(const KnnArgs& a, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.dtype == kFloat64)
    run<double>(a, s);
  else if (a.dtype == kFloat32)
    run<float>(a, s);
  else
    throw std::invalid_argument("knn_prdc: dtype must be float32 or float64");
}

}  // namespace cuda
}  // namespace genloss
