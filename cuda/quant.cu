// quant.cu — the quant family's kernels on CUDA: vector_quantize, vq_ema_update, lfq_entropy (the Args structs of
// cpp/src/quant_cpu.h; the math in derivations/quant.md, QNT.1-QNT.9). Deterministic: no floating-point atomics, every
// float sum in a fixed order; no host synchronisation (capturable in a CUDA graph; scratch through Scratch).
//
// vector_quantize: the CPU's filter and recheck (QNT.3). One thread per row of z, the block's rows staged (transposed)
// in shared memory, the codes in shared-memory tiles; for every code the expansion f~ = ||e_k||^2 - 2 z.e_k in the
// input's type (float32: D FMAs, where the brute force took 3 D float64 operations), and for the few codes whose f~
// is below the running threshold the exact float64 sum_d (z_d - e_d)^2 in order d = 0..D-1 with
// __dsub_rn/__dmul_rn/__dadd_rn (never contracted into an FMA), codes scanned in ascending order with a strict <: the
// index is the CPU's (the float64 brute-force argmin, ties to the lowest index), bit for bit. A row whose expansion
// could overflow is searched exactly over every code; a row whose distances are all NaN gets index 0 (the CPU's rule).
// z_q and grad_z elementwise; the loss is the sum of the row distances by a fixed tree (the CPU sums them serially:
// equal within rounding).
//
// Segment sums (the codebook gradient, vq_ema_update): the indices become 32-bit keys (an index outside [0, K) the
// key K, ignored), a stable radix sort of (key, row) (CUB: deterministic) gives every code its rows in ascending
// order, a binary search its segment; one warp per code then sums its rows in ascending order in float64 (lanes over
// D), exactly the CPU's order: the sums, counts and the outputs computed from them are the CPU's bits. The EMA's
// total count is summed serially in index order (one thread), as on the CPU.
//
// lfq_entropy: the CPU's algorithm. q = sigmoid(2 tau z) per element; the per-sample entropy by rows then a fixed
// tree. The codebook mean P (2^dh x 2^dl, the high/low half product tables) as a rank-N update: one block per 32 x 32
// tile of P and fixed group of rows, rows in order within the group, groups summed in order. The gradient contracts
// log P with the tables (U = A M, V = B M^T: tiled like a GEMM, rows in fixed chunks) and takes each row's
// multilinear derivative with one block per row (QNT.9). Float64 throughout; within rounding of the CPU's sums.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <stdexcept>
#include <string>

#include "quant_cpu.h"
#include "scratch.cuh"

namespace genloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;              // elementwise kernels
constexpr int kSearchRows = 128;           // rows (threads) per block of the vector_quantize search
constexpr int64_t kSmemBytes = 48 * 1024;  // dynamic shared memory of the search (no opt-in needed)
constexpr int kMaxCodeTile = 256;          // codes per shared-memory tile at most
constexpr int kSumThreads = 1024;          // the fixed-tree sum
constexpr int kWarps = 8;                  // warps (codes) per block of the segment sums
constexpr int kTile = 32;                  // LFQ: tile side of P and of the contractions
constexpr int kTileThreads = 256;          // LFQ: threads per tile (32 columns x 8 rows, 4 entries each)
constexpr int kRowThreads = 128;           // LFQ: threads per row of the multilinear gradient

void launched(const char* what) {
  check_cuda(cudaGetLastError(), what);
}

unsigned blocks_for(int64_t n, int64_t per) {
  return grid_blocks(n, per);
}

// ============================================================================= shared pieces
// s + (a - b)^2, rounded step by step (the CPU's exact_dist, compiled with -ffp-contract=off).
__device__ __forceinline__ double add_sq_diff(double s, double a, double b) {
  const double t = __dsub_rn(a, b);
  return __dadd_rn(s, __dmul_rn(t, t));
}

// The fixed-tree reductions below: float64 sums rounded step by step, and maxima (exact in any order).
struct AddRn {
  __device__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};
struct MaxNum {  // NaN skipped (fmax), as the CPU's `if (s > m) m = s`
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// *out = op-reduction of init and x[0..n), a fixed order: thread t folds t, t + 1024, ... then a fixed tree. One
// block of kSumThreads.
template <class Op>
__global__ void __launch_bounds__(kSumThreads)
    reduce_fixed(const double* __restrict__ x, int64_t n, double init, Op op, double* out) {
  __shared__ double buf[kSumThreads];
  const int t = static_cast<int>(threadIdx.x);
  double s = init;
  for (int64_t q = t; q < n; q += kSumThreads) s = op(s, x[q]);
  buf[t] = s;
  __syncthreads();
  for (int w = kSumThreads / 2; w > 0; w >>= 1) {
    if (t < w) buf[t] = op(buf[t], buf[t + w]);
    __syncthreads();
  }
  if (t == 0) *out = buf[0];
}

void launch_sum(const double* x, int64_t n, double* out, cudaStream_t st) {
  reduce_fixed<<<1, kSumThreads, 0, st>>>(x, n, 0.0, AddRn{}, out);
  launched("quant sum");
}

// ============================================================================= segment sums
template <class I>
__global__ void seg_keys(const I* __restrict__ idx, int64_t N, int64_t K, unsigned* __restrict__ keys,
                         int* __restrict__ rows) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = static_cast<int64_t>(idx[i]);
    keys[i] = static_cast<unsigned>(k >= 0 && k < K ? k : K);  // out of range: the key K, no code's segment
    rows[i] = static_cast<int>(i);
  }
}

// start[k] = the first position of a key >= k in the sorted keys, k = 0..K: code k's rows are order[start[k],
// start[k + 1]).
__global__ void seg_bounds(const unsigned* __restrict__ sorted, int64_t N, int64_t K, int64_t* __restrict__ start) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k <= K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = N;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(sorted[mid]) < k)
        lo = mid + 1;
      else
        hi = mid;
    }
    start[k] = lo;
  }
}

// One warp per code k: s_d = sum of z[row, d] over the code's rows in ascending row order, float64, from 0 (the CPU's
// segment_sums), then f(k, d, count, s_d); lanes over d, in chunks of 32.
template <class T, class F>
__global__ void __launch_bounds__(kWarps * 32) seg_codes(const T* __restrict__ z, const int* __restrict__ order,
                                                         const int64_t* __restrict__ start, int64_t K, int64_t D, F f) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); k < K; k += warps) {
    const int64_t j0 = start[k], j1 = start[k + 1];
    for (int64_t d = lane; d < D; d += 32) {
      double s = 0.0;
      for (int64_t j = j0; j < j1; ++j)
        s = __dadd_rn(s, static_cast<double>(z[static_cast<int64_t>(order[j]) * D + d]));
      f(k, d, j1 - j0, s);
    }
  }
}

// The segments of the indices idx (N of them, type I) over K codes, then launch(order, start) while they live.
template <class I, class Launch>
void with_segments(const I* idx, int64_t N, int64_t K, cudaStream_t st, Launch launch) {
  if (K >= INT_MAX || N > INT_MAX)
    throw std::length_error("genloss CUDA quant: segment sums need N <= 2^31 - 1 and K < 2^31 - 1");
  Scratch start(sizeof(int64_t) * static_cast<size_t>(K + 1), st);
  if (N == 0) {
    check_cuda(cudaMemsetAsync(start.as<int64_t>(), 0, sizeof(int64_t) * static_cast<size_t>(K + 1), st),
               "quant segments memset");
    launch(static_cast<const int*>(nullptr), start.as<int64_t>());
    return;
  }
  const size_t n = static_cast<size_t>(N);
  Scratch keys(sizeof(unsigned) * n, st), rows(sizeof(int) * n, st), skeys(sizeof(unsigned) * n, st),
      order(sizeof(int) * n, st);
  seg_keys<I><<<blocks_for(N, kThreads), kThreads, 0, st>>>(idx, N, K, keys.as<unsigned>(), rows.as<int>());
  launched("quant segment keys");
  int end_bit = 1;
  while (end_bit < 32 && (int64_t{1} << end_bit) <= K) ++end_bit;  // the keys 0..K
  size_t temp_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys.as<unsigned>(), skeys.as<unsigned>(),
                                             rows.as<int>(), order.as<int>(), static_cast<int>(N), 0, end_bit, st),
             "quant segment sort size");
  Scratch temp(temp_bytes, st);
  // stable: the rows of one key stay in ascending order
  check_cuda(cub::DeviceRadixSort::SortPairs(temp.as<void>(), temp_bytes, keys.as<unsigned>(), skeys.as<unsigned>(),
                                             rows.as<int>(), order.as<int>(), static_cast<int>(N), 0, end_bit, st),
             "quant segment sort");
  seg_bounds<<<blocks_for(K + 1, kThreads), kThreads, 0, st>>>(skeys.as<unsigned>(), N, K, start.as<int64_t>());
  launched("quant segment bounds");
  launch(static_cast<const int*>(order.as<int>()), start.as<int64_t>());
}

unsigned code_blocks(int64_t K) {
  return blocks_for(K, kWarps);
}

// ============================================================================= vector_quantize
// ||e_k||^2 in float64 (order d = 0..D-1, rounded step by step: the CPU's sum), kept in float64 and rounded to T for
// the filter.
template <class T>
__global__ void vq_norms(const T* __restrict__ e, int64_t K, int64_t D, T* __restrict__ nrm, double* __restrict__ n64) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = static_cast<double>(e[k * D + d]);
      s = __dadd_rn(s, __dmul_rn(v, v));
    }
    nrm[k] = static_cast<T>(s);
    n64[k] = s;
  }
}

// sum_d (z_d - e_d)^2 in float64, order d, rounded step by step: the exact distance of QNT.3 (the CPU's exact_dist).
template <class T, bool kStageZ>
__device__ __forceinline__ double exact_dist(const T* zs, const T* zr, int tid, const T* ec, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const T zv = kStageZ ? zs[d * kSearchRows + tid] : zr[d];
    s = add_sq_diff(s, static_cast<double>(zv), static_cast<double>(ec[d]));
  }
  return s;
}

// One thread per row; kStageZ: the block's rows in shared memory as [d][row]; kStageE: codes in tiles of kt. The CPU's
// filter and recheck (QNT.3, quant_cpu.cpp vq_impl): f~ = ||e_k||^2 - 2 z.e_k in T for every code, the exact float64
// distance only for a code whose f~ is below the running threshold (best f~ + 2.5 delta_i), codes in ascending order,
// a strictly smaller exact distance wins: the float64 brute-force argmin, the CPU's index bit for bit. A row whose
// expansion could leave T's range (or with a NaN: no candidate either way) is searched exactly over every code.
template <class T, bool kStageZ, bool kStageE>
__global__ void __launch_bounds__(kSearchRows)
    vq_search(const T* __restrict__ z, const T* __restrict__ e, const T* __restrict__ nrm,
              const double* __restrict__ emax, int64_t N, int64_t K, int64_t D, int kt, int64_t* __restrict__ idx,
              double* __restrict__ rowdist) {
  extern __shared__ double smem[];
  T* zs = reinterpret_cast<T*>(smem);
  T* es = zs + (kStageZ ? D * kSearchRows : 0);
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kSearchRows;
  const int64_t i = i0 + tid;
  const bool live = i < N;
  const T* zr = z + (live ? i : i0) * D;
  if (kStageZ) {
    const int64_t nr = N - i0 < kSearchRows ? N - i0 : kSearchRows;
    for (int64_t q = tid; q < nr * D; q += kSearchRows) {
      const int64_t r = q / D, d = q - r * D;
      zs[d * kSearchRows + r] = z[i0 * D + q];
    }
  }
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  double sz = 0.0;  // ||z_i||^2, float64, order d
  for (int64_t d = 0; d < D; ++d) {
    const double v = static_cast<double>(zr[d]);
    sz = __dadd_rn(sz, __dmul_rn(v, v));
  }
  const double e2max = *emax;
  const double scale = __dadd_rn(e2max, __dmul_rn(__dmul_rn(2.0, sqrt(sz)), sqrt(e2max)));  // >= |partial sums|
  const bool exact_row = !(scale <= static_cast<double>(std::numeric_limits<T>::max()) / 16);
  const double bound = 2.5 * static_cast<double>(D + 2) * (static_cast<double>(std::numeric_limits<T>::epsilon()) / 2);
  const double margin = __dmul_rn(bound, scale);
  double thr = inf, best_f = inf, best = inf;
  int64_t bk = -1;
  const int64_t step = kStageE ? kt : K;
  for (int64_t k0 = 0; k0 < K; k0 += step) {
    const int64_t nc = K - k0 < step ? K - k0 : step;
    if (kStageE) {
      __syncthreads();  // the previous tile is consumed
      for (int64_t q = tid; q < nc * D; q += kSearchRows) es[q] = e[k0 * D + q];
    }
    __syncthreads();  // the tile (and the staged rows) are in place
    if (!live) continue;
    for (int64_t c = 0; c < nc; ++c) {
      const T* ec = kStageE ? es + c * D : e + (k0 + c) * D;
      double fv = -inf;  // exact rows: every code is a candidate
      if (!exact_row) {
        T f = nrm[k0 + c];
        for (int64_t d = 0; d < D; ++d) f += T(-2) * ec[d] * (kStageZ ? zs[d * kSearchRows + tid] : zr[d]);
        fv = static_cast<double>(f);
        if (!(fv < thr)) continue;  // NaN: never a candidate
      }
      const double x = exact_dist<T, kStageZ>(zs, zr, tid, ec, D);  // (QNT.3) the exact recheck
      if (x < best) {  // ascending codes, strict: a tie keeps the lowest index; NaN never wins
        best = x;
        bk = k0 + c;
      }
      if (fv < best_f) {
        best_f = fv;
        thr = fv + margin;
      }
    }
  }
  if (live) {
    if (bk < 0) {  // every distance NaN (a NaN in z_i): index 0, its NaN distance makes the losses NaN (the CPU's)
      bk = 0;
      best = exact_dist<T, false>(nullptr, zr, tid, e, D);
    }
    idx[i] = bk;
    rowdist[i] = best;
  }
}

// z_q = the chosen rows (bitwise), grad_z = cz (z - z_q) (QNT.4), elementwise.
template <class T>
__global__ void vq_rows_out(const T* __restrict__ z, const T* __restrict__ e, const int64_t* __restrict__ idx,
                            int64_t N, int64_t D, double cz, T* __restrict__ zq, T* __restrict__ gz) {
  const int64_t n = N * D;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = q / D, d = q - i * D;
    const T ev = e[idx[i] * D + d];
    zq[q] = ev;
    if (gz) gz[q] = static_cast<T>(__dmul_rn(cz, __dsub_rn(static_cast<double>(z[q]), static_cast<double>(ev))));
  }
}

template <class T>
__global__ void vq_finish(const double* S, double nd, double beta, T* commit, T* cb) {
  const double mean = __ddiv_rn(*S, nd);  // (QNT.1)
  *commit = static_cast<T>(__dmul_rn(beta, mean));
  *cb = static_cast<T>(mean);
}

// grad_codebook[k, d] = c (count_k e_kd - sum_{idx = k} z_id) (QNT.4), the CPU's rounding steps; 0 for a code no
// row picked (as the CPU: the loss does not depend on it).
template <class T>
struct VqGradCodebook {
  const T* e;
  T* ge;
  double c;
  int64_t D;
  __device__ void operator()(int64_t k, int64_t d, int64_t count, double s) const {
    const int64_t q = k * D + d;
    ge[q] = count == 0 ? static_cast<T>(0.0)
                       : static_cast<T>(__dmul_rn(
                             c, __dsub_rn(__dmul_rn(static_cast<double>(count), static_cast<double>(e[q])), s)));
  }
};

template <class T>
void vq_run(const cpu::VqArgs& a, cudaStream_t st) {
  const int64_t N = a.N, K = a.K, D = a.D;
  if (N <= 0 || K <= 0 || D <= 0) return;
  const T* z = static_cast<const T*>(a.z);
  const T* e = static_cast<const T*>(a.codebook);
  const int64_t tb = static_cast<int64_t>(sizeof(T));
  const int64_t zbytes = kSearchRows * D * tb;
  const bool stage_z = zbytes + 8 * D * tb <= kSmemBytes;  // the rows plus a tile of at least 8 codes
  int64_t kt = (kSmemBytes - (stage_z ? zbytes : 0)) / (D * tb);
  if (kt > kMaxCodeTile) kt = kMaxCodeTile;
  if (kt > K) kt = K;
  const bool stage_e = kt >= 1;
  const size_t smem = static_cast<size_t>((stage_z ? zbytes : 0) + (stage_e ? kt * D * tb : 0));
  Scratch rowdist(sizeof(double) * static_cast<size_t>(N), st), S(sizeof(double), st);
  // the codes' norms: float64 (K), then in T (K, padded to 8 bytes), then the largest (1)
  const int64_t tpad = (K * tb + 7) / 8;
  Scratch norms(sizeof(double) * static_cast<size_t>(K + tpad + 1), st);
  double* n64 = norms.as<double>();
  T* nrm = reinterpret_cast<T*>(n64 + K);
  double* emax = n64 + K + tpad;
  vq_norms<T><<<blocks_for(K, kThreads), kThreads, 0, st>>>(e, K, D, nrm, n64);
  launched("vector_quantize norms");
  reduce_fixed<<<1, kSumThreads, 0, st>>>(n64, K, 0.0, MaxNum{}, emax);  // e2max = max(0, max_k ||e_k||^2)
  launched("vector_quantize largest norm");
  const unsigned grid = grid_exact(N, kSearchRows);
  const int kti = static_cast<int>(kt);
  double* rd = rowdist.as<double>();
  if (stage_z && stage_e)
    vq_search<T, true, true><<<grid, kSearchRows, smem, st>>>(z, e, nrm, emax, N, K, D, kti, a.indices, rd);
  else if (stage_e)
    vq_search<T, false, true><<<grid, kSearchRows, smem, st>>>(z, e, nrm, emax, N, K, D, kti, a.indices, rd);
  else
    vq_search<T, false, false><<<grid, kSearchRows, smem, st>>>(z, e, nrm, emax, N, K, D, kti, a.indices, rd);
  launched("vector_quantize search");
  const double nd = static_cast<double>(N) * static_cast<double>(D);
  const double cz = 2.0 * a.beta / nd;
  vq_rows_out<T><<<blocks_for(N * D, kThreads), kThreads, 0, st>>>(z, e, a.indices, N, D, cz, static_cast<T*>(a.z_q),
                                                                   static_cast<T*>(a.grad_z));
  launched("vector_quantize rows");
  launch_sum(rowdist.as<double>(), N, S.as<double>(), st);
  vq_finish<T>
      <<<1, 1, 0, st>>>(S.as<double>(), nd, a.beta, static_cast<T*>(a.out_commitment), static_cast<T*>(a.out_codebook));
  launched("vector_quantize finish");
  if (a.grad_codebook) {
    const VqGradCodebook<T> f{e, static_cast<T*>(a.grad_codebook), 2.0 / nd, D};
    with_segments<int64_t>(a.indices, N, K, st, [&](const int* order, const int64_t* start) {
      seg_codes<T, VqGradCodebook<T>><<<code_blocks(K), kWarps * 32, 0, st>>>(z, order, start, K, D, f);
      launched("vector_quantize codebook gradient");
    });
  }
}

// ============================================================================= vq_ema_update
// ncs[k] = decay cs[k] + (1 - decay) count_k (QNT.5); *total = their sum in index order (serial: the CPU's bits).
template <class T>
__global__ void __launch_bounds__(kSumThreads)
    ema_counts(const T* __restrict__ cs, const int64_t* __restrict__ start, int64_t K, double dec, double mix,
               double* __restrict__ ncs, double* __restrict__ total) {
  __shared__ double buf[kSumThreads];
  const int t = static_cast<int>(threadIdx.x);
  double n = 0.0;  // thread 0's
  for (int64_t k0 = 0; k0 < K; k0 += kSumThreads) {
    const int64_t k = k0 + t;
    if (k < K) {
      const double v = __dadd_rn(__dmul_rn(dec, static_cast<double>(cs[k])),
                                 __dmul_rn(mix, static_cast<double>(start[k + 1] - start[k])));
      ncs[k] = v;
      buf[t] = v;
    }
    __syncthreads();
    if (t == 0) {
      const int64_t m = K - k0 < kSumThreads ? K - k0 : kSumThreads;
      for (int64_t j = 0; j < m; ++j) n = __dadd_rn(n, buf[j]);
    }
    __syncthreads();
  }
  if (t == 0) *total = n;
}

template <class T>
struct EmaOut {
  const T* es;
  const double* ncs;
  const double* total;
  double dec, mix, eps, Keps;
  int64_t D;
  T* ocs;
  T* oes;
  T* ocb;
  __device__ void operator()(int64_t k, int64_t d, int64_t, double s) const {
    const double n = *total;
    const double denom = __dadd_rn(n, Keps);
    const double smoothed = __dmul_rn(__ddiv_rn(__dadd_rn(ncs[k], eps), denom), n);  // (QNT.6)
    const int64_t q = k * D + d;
    const double v = __dadd_rn(__dmul_rn(dec, static_cast<double>(es[q])), __dmul_rn(mix, s));  // (QNT.5)
    oes[q] = static_cast<T>(v);
    ocb[q] = static_cast<T>(__ddiv_rn(v, smoothed));
    if (d == 0) ocs[k] = static_cast<T>(ncs[k]);
  }
};

template <class T, class I>
void ema_run(const cpu::VqEmaArgs& a, cudaStream_t st) {
  const int64_t N = a.N, K = a.K, D = a.D;
  if (K <= 0 || D <= 0) return;
  Scratch ncs(sizeof(double) * static_cast<size_t>(K), st), total(sizeof(double), st);
  const EmaOut<T> f{static_cast<const T*>(a.embed_sum),
                    ncs.as<double>(),
                    total.as<double>(),
                    a.decay,
                    1.0 - a.decay,
                    a.eps,
                    static_cast<double>(K) * a.eps,
                    D,
                    static_cast<T*>(a.out_cluster_size),
                    static_cast<T*>(a.out_embed_sum),
                    static_cast<T*>(a.out_codebook)};
  const T* z = static_cast<const T*>(a.z);
  with_segments<I>(static_cast<const I*>(a.indices), N, K, st, [&](const int* order, const int64_t* start) {
    ema_counts<T><<<1, kSumThreads, 0, st>>>(static_cast<const T*>(a.cluster_size), start, K, a.decay, 1.0 - a.decay,
                                             ncs.as<double>(), total.as<double>());
    launched("vq_ema_update counts");
    seg_codes<T, EmaOut<T>><<<code_blocks(K), kWarps * 32, 0, st>>>(z, order, start, K, D, f);
    launched("vq_ema_update sums");
  });
}

// ============================================================================= lfq_entropy

// Entry c of the product table of m bits: prod_j (bit j of c ? q_j : qm_j), in the CPU's order (j ascending).
__device__ __forceinline__ double table_entry(const double* q, const double* qm, int m, int64_t c) {
  double t = 1.0;
  for (int j = 0; j < m; ++j) t = __dmul_rn(t, ((c >> j) & 1) ? q[j] : qm[j]);
  return t;
}

template <class T>
__global__ void lfq_prep(const T* __restrict__ z, int64_t N, int d, double tau2, double* __restrict__ q,
                         double* __restrict__ qm, double* __restrict__ rowH) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double h = 0.0;
    for (int j = 0; j < d; ++j) {
      const int64_t p = i * d + j;
      const double x = tau2 * static_cast<double>(z[p]);
      cpu::sigmoid2(x, q[p], qm[p]);  // quant_cpu.h: the CPU's own definition
      h += cpu::bin_entropy(x);       // (QNT.8)
    }
    rowH[i] = h;
  }
}

// Pp[g] = sum over the rows of group g (in order) of A_i (x) B_i on one 32 x 32 tile of P (QNT.9).
__global__ void __launch_bounds__(kTileThreads)
    lfq_p_tiles(const double* __restrict__ q, const double* __restrict__ qm, int64_t N, int d, int dl, int dh,
                int64_t H, int64_t L, int64_t rows_per_group, int64_t tiles_l, double* __restrict__ Pp) {
  __shared__ double As[kTile][kTile + 1], Bs[kTile][kTile + 1];
  const int tid = static_cast<int>(threadIdx.x), tx = tid % kTile, ty = tid / kTile;
  const int64_t tile = blockIdx.x, g = blockIdx.y;
  const int64_t h0 = (tile / tiles_l) * kTile, l0 = (tile % tiles_l) * kTile;
  const int64_t r_begin = g * rows_per_group;
  const int64_t r_end = N < r_begin + rows_per_group ? N : r_begin + rows_per_group;
  double acc[kTile / 8] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kTile) {
    const int64_t nr = r_end - r0 < kTile ? r_end - r0 : kTile;
    __syncthreads();
    for (int p = tid; p < kTile * kTile; p += kTileThreads) {
      const int r = p / kTile, c = p % kTile;
      double av = 0.0, bv = 0.0;
      if (r < nr) {
        const int64_t row = (r0 + r) * d;
        if (h0 + c < H) av = table_entry(q + row + dl, qm + row + dl, dh, h0 + c);
        if (l0 + c < L) bv = table_entry(q + row, qm + row, dl, l0 + c);
      }
      As[r][c] = av;
      Bs[r][c] = bv;
    }
    __syncthreads();
    for (int r = 0; r < nr; ++r) {
      const double b = Bs[r][tx];
#pragma unroll
      for (int u = 0; u < kTile / 8; ++u) acc[u] = fma(As[r][ty + 8 * u], b, acc[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < kTile / 8; ++u) {
    const int64_t h = h0 + ty + 8 * u, l = l0 + tx;
    if (h < H && l < L) Pp[g * H * L + h * L + l] = acc[u];
  }
}

// P = (sum of the groups, in order) / N; ent[c] = P log P (0 log 0 = 0, NaN propagates); M = log P, an underflowed
// P = 0 the log of the smallest positive double (the CPU's stand-in).
__global__ void lfq_p_finish(const double* __restrict__ Pp, int64_t G, int64_t HL, double invN, double* __restrict__ M,
                             double* __restrict__ ent) {
  const double logmin = -744.44007192138126;  // log(denorm_min) = log(2^-1074)
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < HL;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t g = 0; g < G; ++g) s += Pp[g * HL + c];
    const double p = s * invN;
    ent[c] = !(p <= 0.0) ? p * log(p) : 0.0;
    M[c] = p > 0.0 ? log(p) : (p == 0.0 ? logmin : p);
  }
}

template <class T>
__global__ void lfq_finish(const double* sums, double invN, double sw, double cw, int codebook, T* out, double* terms) {
  const double Hs = sums[0] * invN;              // (QNT.8)
  const double Hcb = codebook ? -sums[1] : 0.0;  // (QNT.9)
  *out = static_cast<T>(sw * Hs - cw * Hcb);
  if (terms) {
    terms[0] = Hs;
    terms[1] = Hcb;
  }
}

// out[r, c] = sum_k T_r[k] M'(k, c) for the rows r0 + r, r < nr: T_r the product table of the m bits from boff of
// row r0 + r, k < Kd, c < Cd; M'(k, c) = M[k L + c] (U = A M) or, transposed, M[c L + k] (V = B M^T).
template <bool transposed>
__global__ void __launch_bounds__(kTileThreads)
    lfq_contract(const double* __restrict__ q, const double* __restrict__ qm, int64_t r0, int64_t nr, int d, int boff,
                 int m, int64_t Kd, int64_t Cd, int64_t L, const double* __restrict__ M, double* __restrict__ out) {
  __shared__ double Ts[kTile][kTile + 1], Ms[kTile][kTile + 1];
  const int tid = static_cast<int>(threadIdx.x), tx = tid % kTile, ty = tid / kTile;
  const int64_t rt = static_cast<int64_t>(blockIdx.x) * kTile, ct = static_cast<int64_t>(blockIdx.y) * kTile;
  double acc[kTile / 8] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t k0 = 0; k0 < Kd; k0 += kTile) {
    __syncthreads();
    for (int p = tid; p < kTile * kTile; p += kTileThreads) {
      const int r = p / kTile, c = p % kTile;
      double t = 0.0;
      if (rt + r < nr && k0 + c < Kd) {
        const int64_t row = (r0 + rt + r) * d + boff;
        t = table_entry(q + row, qm + row, m, k0 + c);
      }
      Ts[r][c] = t;
      const int kk = transposed ? c : r, cc = transposed ? r : c;  // consecutive threads: consecutive addresses
      double mv = 0.0;
      if (k0 + kk < Kd && ct + cc < Cd) mv = transposed ? M[(ct + cc) * L + k0 + kk] : M[(k0 + kk) * L + ct + cc];
      Ms[kk][cc] = mv;
    }
    __syncthreads();
    const int64_t kn = Kd - k0 < kTile ? Kd - k0 : kTile;
    for (int kk = 0; kk < kn; ++kk) {
      const double mv = Ms[kk][tx];
#pragma unroll
      for (int u = 0; u < kTile / 8; ++u) acc[u] = fma(Ts[ty + 8 * u][kk], mv, acc[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < kTile / 8; ++u) {
    const int64_t r = rt + ty + 8 * u, c = ct + tx;
    if (r < nr && c < Cd) out[r * Cd + c] = acc[u];
  }
}

// g[j] = d/dq_j sum_c u[c] prod_j (bit j ? q_j : 1 - q_j), j < m (the CPU's multilinear_grad, QNT.9), by the whole
// block: levels T_{m-1} .. T_0 in lev (T_j at offset 2^j), then reverse mode with the adjoint tables in adj; each
// g[j] a fixed-tree sum over the block. Every thread calls it (it synchronises).
__device__ void ml_grad(const double* u, const double* q, const double* qm, int m, double* lev, double* adj,
                        double* red, double* g) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int j = m - 1; j >= 0; --j) {
    const int64_t h = int64_t{1} << j;
    const double* up = j == m - 1 ? u : lev + 2 * h;
    double* cur = lev + h;
    const double a = q[j], b = qm[j];
    for (int64_t t = tid; t < h; t += kRowThreads) cur[t] = __dadd_rn(__dmul_rn(b, up[t]), __dmul_rn(a, up[t + h]));
    __syncthreads();
  }
  if (tid == 0) adj[0] = 1.0;
  __syncthreads();
  for (int j = 0; j < m; ++j) {
    const int64_t h = int64_t{1} << j;
    const double* up = j == m - 1 ? u : lev + 2 * h;  // T_{j+1}
    double s = 0.0;
    for (int64_t t = tid; t < h; t += kRowThreads) s = fma(adj[t], up[t + h] - up[t], s);
    red[tid] = s;
    __syncthreads();
    for (int w = kRowThreads / 2; w > 0; w >>= 1) {
      if (tid < w) red[tid] += red[tid + w];
      __syncthreads();
    }
    if (tid == 0) g[j] = red[0];
    const double a = q[j], b = qm[j];
    for (int64_t t = tid; t < h; t += kRowThreads) {
      const double v = adj[t];
      adj[t + h] = v * a;
      adj[t] = v * b;
    }
    __syncthreads();
  }
}

// d loss / d z_ij = 2 tau q (1 - q) (cw G_ij - sw x_ij) / N (QNT.8, QNT.9), one block per row r0 + r, r < nr.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    lfq_grad_rows(const T* __restrict__ z, const double* __restrict__ q, const double* __restrict__ qm, int64_t r0,
                  int64_t nr, int d, int dl, int dh, int64_t H, int64_t L, const double* __restrict__ U,
                  const double* __restrict__ V, int codebook, double tau2, double sw, double cw, double invN,
                  T* __restrict__ gz) {
  __shared__ double lev[2 << (cpu::kLfqMaxBits / 2)], adj[1 << (cpu::kLfqMaxBits / 2)], red[kRowThreads],
      g[cpu::kLfqMaxBits];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t r = blockIdx.x; r < nr; r += gridDim.x) {
    const int64_t i = r0 + r;
    const double* qi = q + i * d;
    const double* qmi = qm + i * d;
    for (int j = tid; j < d; j += kRowThreads) g[j] = 0.0;
    __syncthreads();
    if (codebook) {
      ml_grad(U + r * L, qi, qmi, dl, lev, adj, red, g);
      ml_grad(V + r * H, qi + dl, qmi + dl, dh, lev, adj, red, g + dl);
    }
    __syncthreads();
    for (int j = tid; j < d; j += kRowThreads) {
      const double x = tau2 * static_cast<double>(z[i * d + j]);
      gz[i * d + j] = static_cast<T>(tau2 * qi[j] * qmi[j] * (cw * g[j] - sw * x) * invN);
    }
    __syncthreads();  // g is rewritten by the next row
  }
}

template <class T>
void lfq_run(const cpu::LfqArgs& a, cudaStream_t st) {
  const int64_t N = a.N;
  const int d = static_cast<int>(a.d);
  if (N <= 0 || d <= 0) return;
  if (d > cpu::kLfqMaxBits) throw std::invalid_argument("genloss CUDA lfq_entropy: d > LFQ_MAX_BITS");
  const int dh = d / 2, dl = d - d / 2;  // code c = (hi << dl) | lo, as on the CPU
  const int64_t H = int64_t{1} << dh, L = int64_t{1} << dl;
  const double tau2 = 2.0 * a.inv_temperature, invN = 1.0 / static_cast<double>(N);
  const bool codebook = a.codebook_weight != 0.0;
  const T* z = static_cast<const T*>(a.z);
  const size_t nd = static_cast<size_t>(N) * static_cast<size_t>(d);
  Scratch qs(sizeof(double) * nd, st), qms(sizeof(double) * nd, st), rowH(sizeof(double) * static_cast<size_t>(N), st),
      sums(2 * sizeof(double), st), M(sizeof(double) * static_cast<size_t>(codebook ? H * L : 1), st);
  const double* q = qs.as<double>();
  const double* qm = qms.as<double>();
  lfq_prep<T><<<blocks_for(N, kThreads), kThreads, 0, st>>>(z, N, d, tau2, qs.as<double>(), qms.as<double>(),
                                                            rowH.as<double>());
  launched("lfq_entropy prep");
  launch_sum(rowH.as<double>(), N, sums.as<double>(), st);
  const int64_t tiles_h = (H + kTile - 1) / kTile, tiles_l = (L + kTile - 1) / kTile;
  if (codebook) {
    // rows in G fixed groups (a function of N and d only): enough blocks for the small tables
    const int64_t chunks = (N + kTile - 1) / kTile;
    int64_t G = 512 / (tiles_h * tiles_l);
    if (G < 1) G = 1;
    if (G > chunks) G = chunks;
    const int64_t rows_per_group = ((chunks + G - 1) / G) * kTile;
    G = (N + rows_per_group - 1) / rows_per_group;
    Scratch Pp(sizeof(double) * static_cast<size_t>(G * H * L), st),
        ent(sizeof(double) * static_cast<size_t>(H * L), st);
    lfq_p_tiles<<<dim3(static_cast<unsigned>(tiles_h * tiles_l), static_cast<unsigned>(G)), kTileThreads, 0, st>>>(
        q, qm, N, d, dl, dh, H, L, rows_per_group, tiles_l, Pp.as<double>());
    launched("lfq_entropy codebook mean");
    lfq_p_finish<<<blocks_for(H * L, kThreads), kThreads, 0, st>>>(Pp.as<double>(), G, H * L, invN, M.as<double>(),
                                                                   ent.as<double>());
    launched("lfq_entropy codebook entropy");
    launch_sum(ent.as<double>(), H * L, sums.as<double>() + 1, st);
  }
  lfq_finish<T><<<1, 1, 0, st>>>(sums.as<double>(), invN, a.sample_weight, a.codebook_weight, codebook ? 1 : 0,
                                 static_cast<T*>(a.out_value), a.terms);
  launched("lfq_entropy value");
  T* gz = static_cast<T*>(a.grad_z);
  if (!gz) return;
  // rows in chunks of Rc: U (Rc x L) and V (Rc x H) of at most 2^22 doubles (32 MiB)
  int64_t Rc = N;
  if (codebook) {
    Rc = ((int64_t{1} << 22) / (H + L)) / kTile * kTile;
    if (Rc < kTile) Rc = kTile;
  }
  Scratch U(sizeof(double) * static_cast<size_t>(codebook ? Rc * L : 1), st),
      V(sizeof(double) * static_cast<size_t>(codebook ? Rc * H : 1), st);
  for (int64_t r0 = 0; r0 < N; r0 += Rc) {
    const int64_t nr = N - r0 < Rc ? N - r0 : Rc;
    if (codebook) {
      const unsigned rows = grid_exact(nr, kTile);
      lfq_contract<false><<<dim3(rows, static_cast<unsigned>(tiles_l)), kTileThreads, 0, st>>>(
          q, qm, r0, nr, d, dl, dh, H, L, L, M.as<double>(), U.as<double>());
      launched("lfq_entropy contraction (high bits)");
      lfq_contract<true><<<dim3(rows, static_cast<unsigned>(tiles_h)), kTileThreads, 0, st>>>(
          q, qm, r0, nr, d, 0, dl, L, H, L, M.as<double>(), V.as<double>());
      launched("lfq_entropy contraction (low bits)");
    }
    const unsigned rb = blocks_for(nr < 65536 ? nr : 65536, 1);
    lfq_grad_rows<T><<<rb, kRowThreads, 0, st>>>(z, q, qm, r0, nr, d, dl, dh, H, L, U.as<double>(), V.as<double>(),
                                                 codebook ? 1 : 0, tau2, a.sample_weight, a.codebook_weight, invN, gz);
    launched("lfq_entropy gradient");
  }
}

}  // namespace

void vector_quantize(const cpu::VqArgs& a, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.dtype == 0)
    vq_run<float>(a, st);
  else
    vq_run<double>(a, st);
}

void vq_ema_update(const cpu::VqEmaArgs& a, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.dtype == 0) {
    if (a.index_dtype == 0)
      ema_run<float, int64_t>(a, st);
    else
      ema_run<float, int32_t>(a, st);
  } else {
    if (a.index_dtype == 0)
      ema_run<double, int64_t>(a, st);
    else
      ema_run<double, int32_t>(a, st);
  }
}

void lfq_entropy(const cpu::LfqArgs& a, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.dtype == 0)
    lfq_run<float>(a, st);
  else
    lfq_run<double>(a, st);
}

}  // namespace cuda
}  // namespace genloss
