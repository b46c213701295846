// mmd.cu — the MMD^2 kernel on CUDA: value and both gradients in one pass,
// O((N + M) D) memory, deterministic (no floating-point atomics).
//
// Every float64 accumulator (a point's value row, its gradient, a column buffer) has one
// owning thread and a fixed order of additions, so no two threads ever write the same
// accumulator and the result is bitwise repeatable. The row values are then summed by one
// block with a fixed tree. float16/bfloat16 are stored, float32 computed; float sums are
// flushed to float64 accumulators per tile.
//
// The value counts each unordered pair once: a same-side pair {p, q} with weight 2 (the
// diagonal 1), a cross pair once. Work per call at N = M (pairs evaluated, in units of N^2):
//                      value only   grad_x only   both gradients
//   rows_small (D<=4)      2           2.5             4
//   rows_tiled (D>4)       2            2              2   (each evaluated pair feeds
//                                                          the gradients of both points)
// (issue 16, item 7: before, rows_tiled evaluated 2.5 with grad_x, 4 with both, and
// rows_small 4 always.)
//
// D <= 4 (rows_small): one thread per point (x rows first, then y rows), coordinates and
// gradient in registers, tiles of 32 other points in shared memory. A point's value takes
// the pairs with the points after it (its own side) and, for an x point, all of y; a point
// whose gradient is requested sums over all pairs; the tiles no point of a block needs are
// skipped (__syncthreads_or).
// D > 4 (rows_tiled): a SIMT GEMM over tiles of 128 points (float; 64 for double). A
// pre-pass centres the points on their pooled mean (fixed-order float64 reduction on the
// device) and takes their squared norms, as the CPU's blocked body (mmd_cpu.cpp). Each
// unordered pair of tiles is one block's work in one sweep (see pair_live). Per pair, each
// thread accumulates an 8 x 4 (4 x 4) sub-tile of dot products a.b over D from shared-memory
// slices (one FMA per coordinate), r2 = |a|^2 + |b|^2 - 2 a.b is clamped at 0, exactly 0
// from a point to itself, and pairs with r2 < (|a|^2 + |b|^2) / 16 (coincident or close
// points, where r2 is mostly rounding) are re-evaluated from the differences of the input
// rows, as on the CPU. The gradients sum_q w_pq (a_p - b_q) of the row tile and
// sum_p w_pq (b_q - a_p) of the column tile are register-blocked products against the
// input points (exact differences) staged in shared memory. Measured on an H200, D = 64,
// rbf, float32, biased, N = M = 65,536, before the sweeps (bench/README.md): 0.136 s value
// only, 0.532 s with both gradients (every pair in both rows); torch.cdist in blocks
// 0.256 s. The sweeps are not yet timed on a GPU.
//
// Per point (rows_small's rows; rows_tiled adds each pair's value to its row tile's rows):
// Point a = x_i:  value = a_w sum_{b in x} k(a, b) + c sum_{b in y} k(a, b)
//                 grad  = 2 a_w sum_{b in x} dk/da + c sum_{b in y} dk/da
// Point a = y_j:  value = b_w sum_{b in y} k(a, b)       (the cross term is in x's rows)
//                 grad  = 2 b_w sum_{b in y} dk/da + c sum_{b in x} dk/da
// (diagonal b == a skipped for the unbiased estimator), with dk/da = w (a - b) for
// distance kernels and w b for the polynomial (genloss/mmd.h); dk/db mirrors it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "genloss/engine.h"
#include "genloss/mmd.h"
#include "scratch.cuh"
#include "storage.cuh"

namespace genloss {
namespace cuda {
namespace {

constexpr int kRowThreads = 128;  // points per block
constexpr int kTileB = 32;        // other points per shared-memory tile
constexpr int kSumThreads = 256;

void check_mmd(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("genloss CUDA mmd: ") + what + ": " + cudaGetErrorString(e));
}

// The kernel coefficients, passed BY VALUE in the launch (kernel parameters): a copy
// from host memory would be captured by a CUDA graph as a copy from that (by then
// stale) address, and replays would read whatever lies there. More than kMaxByValue
// bandwidths (rare) go through a device copy, refused under capture.
constexpr int kMaxByValue = 16;
template <class A>
struct Coefs {
  A c[kMaxByValue];
  const A* dev;  // non-null: the coefficients are in device memory instead
  __device__ const A* ptr() const { return dev ? dev : c; }
};

struct RowCtx {
  int kernel;
  bool unbiased;
  int64_t N, M, D;
  double wx, wy, wc;  // estimator weights of S_xx, S_yy, S_xy
  double grad_scale;
  int nbw;
};

// Small D: coordinates and gradient in registers; tiles of other points in shared memory.
template <class S, int DIM>
__global__ void rows_small(RowCtx r, const S* __restrict__ x, const S* __restrict__ y, Coefs<compute_t<S>> cv,
                           double* rowv, S* gx, S* gy) {
  using A = compute_t<S>;
  const A* c = cv.ptr();
  __shared__ A tile[kTileB][DIM];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  const int64_t total = r.N + r.M;
  const bool live = p < total;
  const int my_side = live && p >= r.N ? 1 : 0;
  const int64_t me = my_side == 0 ? p : p - r.N;
  A a[DIM];
  for (int d = 0; d < DIM; ++d) a[d] = live ? load(my_side == 0 ? x : y, me * DIM + d) : A(0);
  const A inv_d = A(1) / static_cast<A>(r.D);
  const bool dist = r.kernel != kMmdPolynomial;
  double value = 0.0;
  double g[DIM];
  for (int d = 0; d < DIM; ++d) g[d] = 0.0;
  const bool my_grad = live && (my_side == 0 ? gx : gy) != nullptr;
  for (int side = 0; side < 2; ++side) {
    const int64_t n = side == 0 ? r.N : r.M;
    const bool same = side == my_side;
    const double vw = same ? (my_side == 0 ? r.wx : r.wy) : (my_side == 0 ? r.wc : 0.0);
    const double gw = same ? 2.0 * (my_side == 0 ? r.wx : r.wy) : r.wc;
    const S* src = side == 0 ? x : y;
    for (int64_t q0 = 0; q0 < n; q0 += kTileB) {
      const int64_t nb = n - q0 < kTileB ? n - q0 : kTileB;
      // The value counts each same-side pair once, in the row of its smaller index (weight
      // 2, the diagonal 1), and each cross pair in the x row: a point without a requested
      // gradient needs only the tiles that reach its value. A tile no point of the block
      // needs is skipped (y rows skip x unless grad_y is requested; without its side's
      // gradient a block skips the tiles below its rows). The barrier also tells the
      // previous tile's readers are done.
      const bool want = my_grad || (live && vw != 0.0 && !(same && q0 + nb <= me));
      if (!__syncthreads_or(want)) continue;
      for (int e = threadIdx.x; e < kTileB * DIM; e += kRowThreads) {
        const int64_t q = q0 + e / DIM;
        tile[e / DIM][e % DIM] = q < n ? load(src, q * DIM + e % DIM) : A(0);
      }
      __syncthreads();
      if (!want) continue;
      A vs = 0, gs[DIM];
      for (int d = 0; d < DIM; ++d) gs[d] = 0;
      for (int b = 0; b < nb; ++b) {
        const int64_t q = q0 + b;
        if (same && r.unbiased && q == me) continue;
        A s = 0;
        for (int d = 0; d < DIM; ++d) s += dist ? (a[d] - tile[b][d]) * (a[d] - tile[b][d]) : a[d] * tile[b][d];
        A k, w;
        mmd::eval<A>(r.kernel, s, c, r.nbw, inv_d, k, w);
        vs += !same ? k : (q > me ? A(2) * k : (q == me ? k : A(0)));
        for (int d = 0; d < DIM; ++d) gs[d] += w * (dist ? a[d] - tile[b][d] : tile[b][d]);
      }
      value += vw * static_cast<double>(vs);
      for (int d = 0; d < DIM; ++d) g[d] += gw * static_cast<double>(gs[d]);
    }
  }
  if (!live) return;
  rowv[p] = value;
  S* out = my_side == 0 ? gx : gy;
  if (out)
    for (int d = 0; d < DIM; ++d) store(out, me * DIM + d, r.grad_scale * g[d]);
}

// D > 4: register-blocked tiles (a SIMT GEMM). Tile shapes per compute type: a block of
// 16 x 16 threads owns TM = 16 RM rows of one side; thread (ty, tx) owns rows ty + 16 i
// (i < RM) and, in a tile of TN = 64 other points, columns tx + 16 j (j < 4). Strided
// ownership: in a warp (two ty, sixteen tx) the row reads are broadcasts and the column
// reads consecutive words, so the shared-memory reads are conflict-free.
template <class A>
struct TileShape;
template <>
struct TileShape<float> {
  static constexpr int RM = 8;  // rows per thread: TM = 128
  static constexpr int GD = 2;  // gradient coordinates per thread and slice: DK2 = 32
};
template <>
struct TileShape<double> {
  static constexpr int RM = 4;  // TM = 64
  static constexpr int GD = 1;  // DK2 = 16 (with 32, the shared memory exceeds 48 KiB)
};
constexpr int kTileThreads = 256;
constexpr int kTN = 64;   // other points per tile
constexpr int kRN = 4;    // columns per thread
constexpr int kDK1 = 16;  // coordinates per distance slice
constexpr int kPad1 = 2;  // distance-slice row padding: conflict-free transposing stores

// One kernel evaluation, the coefficients read from the by-value array with
// compile-time indices (a runtime index would copy the parameter to local memory).
template <class A>
__device__ __forceinline__ void eval_pair(int kernel, A s, const Coefs<A>& cv, int nbw, A inv_d, A& k, A& w) {
  if (kernel == kMmdRbf || kernel == kMmdImq) {
    const bool rbf = kernel == kMmdRbf;
    k = A(0);
    w = A(0);
    auto term = [&](A c) {
      if (rbf) {
        const A e = mmd::exp_neg(-c * s);
        k += e;
        w -= c * e;
      } else {
        const A u = mmd::rsqrt(A(1) + c * s);
        k += u;
        w -= c * u * u * u;
      }
    };
    if (cv.dev) {
      for (int b = 0; b < nbw; ++b) term(cv.dev[b]);
    } else {
#pragma unroll
      for (int b = 0; b < kMaxByValue; ++b)
        if (b < nbw) term(cv.c[b]);
    }
    if (rbf) w *= A(2);  // (DIV.8), as mmd::rbf
  } else if (kernel == kMmdPolynomial) {
    mmd::polynomial(s, inv_d, k, w);
  } else {
    mmd::energy(s, k, w);
  }
}

// ---- pre-pass (D > 4): the points centred on their pooled mean, and squared norms ----
// Distance kernels are translation invariant; the tiles' r2 = |a|^2 + |b|^2 - 2 a.b is
// taken on centred coordinates (as the CPU's blocked body), which shrinks the
// cancellation to ~eps |z - mean|^2. The mean is a fixed-order float64 reduction:
// chunks of kMeanChunk points summed in order (mean_partial), then per coordinate a
// strided sum and a fixed tree (mean_finish). No host synchronisation: capturable.
constexpr int kMeanChunk = 128;  // points per partial sum
constexpr int kPrepThreads = 128;

template <class S>
__global__ void mean_partial(const S* __restrict__ x, const S* __restrict__ y, int64_t N, int64_t M, int64_t D,
                             double* partial) {
  const int64_t c = blockIdx.x, total = N + M, p0 = c * kMeanChunk;
  const int64_t p1 = p0 + kMeanChunk < total ? p0 + kMeanChunk : total;
  for (int64_t d = threadIdx.x; d < D; d += kPrepThreads) {
    double s = 0.0;
    for (int64_t p = p0; p < p1; ++p) s += static_cast<double>(p < N ? load(x, p * D + d) : load(y, (p - N) * D + d));
    partial[c * D + d] = s;
  }
}

__global__ void mean_finish(const double* partial, int64_t chunks, int64_t D, int64_t total, double* mean) {
  __shared__ double sh[kSumThreads];
  for (int64_t d = blockIdx.x; d < D; d += gridDim.x) {
    double acc = 0.0;
    for (int64_t c = threadIdx.x; c < chunks; c += kSumThreads) acc += partial[c * D + d];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kSumThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) mean[d] = sh[0] / static_cast<double>(total);
    __syncthreads();  // sh is reused for the next coordinate
  }
}

// One warp per point (x rows first, then y): zc = compute-type (z - mean) (z itself
// without a mean: the polynomial), nrm = |zc|^2 summed in float64 (lane-strided, then
// an xor butterfly: fixed order) and rounded once.
template <class S>
__global__ void centre(const S* __restrict__ x, const S* __restrict__ y, int64_t N, int64_t M, int64_t D,
                       const double* __restrict__ mean, compute_t<S>* zc, compute_t<S>* nrm) {
  using A = compute_t<S>;
  const int lane = threadIdx.x % 32;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * (kPrepThreads / 32) + threadIdx.x / 32;
  if (p >= N + M) return;  // the whole warp: p is uniform in it
  const S* src = p < N ? x + p * D : y + (p - N) * D;
  double q = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const A v = mean ? static_cast<A>(static_cast<double>(load(src, d)) - mean[d]) : load(src, d);
    zc[p * D + d] = v;
    q += static_cast<double>(v) * static_cast<double>(v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
  if (lane == 0) nrm[p] = static_cast<A>(q);
}

// The exact squared distance of two input rows (near pairs of the tiles).
template <class S>
__device__ __forceinline__ compute_t<S> exact_r2(const S* a, const S* b, int64_t D) {
  using A = compute_t<S>;
  A s = A(0);
#pragma unroll 4
  for (int64_t d = 0; d < D; ++d) {
    const A df = load(a, d) - load(b, d);
    s += df * df;
  }
  return s;
}

// A pair is "near" when its expanded r2 < kNearPair (|a|^2 + |b|^2) (centred): there the
// expansion's rounding (~eps (|a|^2 + |b|^2)) is a large part of r2, and the pair is
// re-evaluated from the differences of the input rows. As the CPU (mmd_cpu.cpp).
constexpr double kNearPair = 1.0 / 16.0;

// The tiles of TM points: x tiles first, then y tiles (each population's last tile may be
// ragged). Tile t's side, first point and population size.
struct RowTile {
  int side;
  int64_t row0, n;
};
__device__ __forceinline__ RowTile tile_of(const RowCtx& r, int64_t t, int tm) {
  const int64_t bx = (r.N + tm - 1) / tm;
  return t < bx ? RowTile{0, t * tm, r.N} : RowTile{1, (t - bx) * tm, r.M};
}
__host__ __device__ inline int64_t tile_count(int64_t N, int64_t M, int64_t tm) {
  return (N + tm - 1) / tm + (M + tm - 1) / tm;
}

// The schedule of tile pairs (issue 16, item 7: every pair evaluated once). With T tiles,
// the sweep at offset k (0 <= k <= T / 2) gives tile b the pair (b, (b + k) mod T): over
// the sweeps each unordered pair {I, J} comes exactly once, I == J at k = 0 and, for even
// T, the pairs at k = T / 2 twice (kept for b < T / 2 only). Within a sweep every tile is
// the row tile of exactly one pair and the column tile of exactly one other, so the block
// of tile b owns the value and gradient rows of its tile, and the gradients of the column
// tile go to a buffer of its own (colbuf) that add_cols then adds to their rows, in
// sweep order: no two blocks write one accumulator, and every sum has a fixed order.
__host__ __device__ inline bool pair_live(int64_t b, int64_t k, int64_t T) {
  return !(2 * k == T && b >= k);
}

// Per block b, for each sweep k in [k0, k1) (its pair (b, c)) and each chunk of kTN
// points of tile c, in order:
//  1. the dot products of the TM x kTN pairs (centred points for distance kernels),
//     accumulated over D in registers from shared-memory slices of kDK1 coordinates
//     (each value reused RM or kRN times).
//  2. r2 from the norms (near pairs from the input rows' differences), k and w per
//     pair; the row sums of k, weighted so that each unordered pair counts once (the
//     diagonal tile: its upper triangle twice and its diagonal once; another tile of the
//     same side: twice) (16-lane shuffle, fixed order) into the row's float64 value;
//     gw w kept in shared memory (XOR-swizzled: conflict-free stores).
//  3. The row tile's gradient (when its side's is requested): slices of DK2 coordinates
//     of the chunk's points in shared memory, sum_q gw w_pq (a_p - b_q) (or gw w_pq b_q)
//     over the kTN points in float registers, added to the row's float64 accumulators
//     (the float sums live only during this step: keeping them over several chunks
//     spilled registers).
//  4. The column tile's gradient (k > 0, its side's requested): the same product
//     transposed, sum_p gw w_pq (b_q - a_p) (or gw w_pq a_p) over the TM rows staged in
//     kTN-row slices, stored to the block's colbuf slot of sweep k (float64).
// Every float64 accumulator (rowv[p], gacc[p][d], a colbuf entry) is written by one
// thread only, in the fixed sweep order: the result is bitwise repeatable, and the value
// does not depend on which gradients are requested (the value-only call runs all sweeps
// in one launch, k1 = T / 2 + 1; with gradients, a few sweeps per launch, then add_cols).
// A pair's facts, kept in shared memory (see rows_tiled).
template <class A>
struct PairSh {
  int64_t row0, end;  // the column tile's points [row0, end)
  double vw;          // the value's weight
  A gw;               // the gradients' weight
  int side;           // the column tile's population
  bool same, col_grad;
};
template <class S>
__global__ void __launch_bounds__(kTileThreads, 2)
    rows_tiled(RowCtx r, const S* __restrict__ x, const S* __restrict__ y, const compute_t<S>* __restrict__ zc,
               const compute_t<S>* __restrict__ nrm, Coefs<compute_t<S>> cv, double* rowv, double* gacc, double* colbuf,
               int k0, int k1, bool grad_x, bool grad_y) {
  using A = compute_t<S>;
  constexpr int RM = TileShape<A>::RM, GD = TileShape<A>::GD;
  constexpr int TM = 16 * RM, DK2 = 16 * GD, CM = kTN / 16;
  // Union: the distance slices (phase 1) live where the kernel weights go (phase 2).
  constexpr int kSlice = kDK1 * (TM + kPad1) + kDK1 * (kTN + kPad1);
  constexpr int kW = kTN * TM;
  static_assert(kSlice <= kW, "distance slices fit in the weight tile");
  static_assert(TM % kTN == 0, "the rows stage in kTN-row slices for the column gradient");
  __shared__ A wsh[kW];
  __shared__ A bsh[kTN * DK2];
  __shared__ PairSh<A> pair_sh;
  A* ash = wsh;                        // [kDK1][TM + kPad1]
  A* csh = wsh + kDK1 * (TM + kPad1);  // [kDK1][kTN + kPad1]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int b = blockIdx.x, T = gridDim.x;
  const RowTile rt = tile_of(r, b, TM);
  const S* rsrc = rt.side == 0 ? x : y;
  const int64_t D = r.D;
  const A* zrow = zc + (rt.side == 0 ? 0 : r.N) * D;
  const A* nrow = nrm + (rt.side == 0 ? 0 : r.N);
  const A near_frac = static_cast<A>(kNearPair);
  const A inv_d = A(1) / static_cast<A>(D);
  const bool dist = r.kernel != kMmdPolynomial;
  const bool my_grad = gacc && (rt.side == 0 ? grad_x : grad_y);
  const int64_t nslices = (D + DK2 - 1) / DK2;
  // The first sweep starts the block's rows: value (tx == 0) and gradient accumulators at 0.
  for (int i = 0; k0 == 0 && i < RM; ++i) {
    const int64_t row = rt.row0 + ty + 16 * i;
    if (row >= rt.n) continue;
    const int64_t p = rt.side == 0 ? row : r.N + row;
    if (tx == 0) rowv[p] = 0.0;
    if (my_grad)
      for (int64_t d = tx; d < D; d += 16) gacc[p * D + d] = 0.0;
  }
  for (int k = k0; k < k1; ++k) {
    if (!pair_live(b, k, T)) continue;
    const int64_t c = static_cast<int64_t>(b) + k;  // (b + k) mod T, k <= T / 2
    const RowTile ct = tile_of(r, c < T ? c : c - T, TM);
    const bool same = ct.side == rt.side;
    const double vw = same ? (rt.side == 0 ? r.wx : r.wy) : r.wc;
    const bool col_grad = colbuf && k > 0 && (ct.side == 0 ? grad_x : grad_y);
    if (vw == 0.0 && !my_grad && !col_grad) continue;
    // The pair's facts go through shared memory, re-read after each barrier: so they hold
    // no registers through the products (128 registers, no spills).
    __syncthreads();  // the previous pair's readers are done
    if (threadIdx.x == 0) {
      pair_sh.row0 = ct.row0;
      pair_sh.end = ct.row0 + TM < ct.n ? ct.row0 + TM : ct.n;
      pair_sh.vw = vw;
      pair_sh.gw = static_cast<A>(same ? 2.0 * (rt.side == 0 ? r.wx : r.wy) : r.wc);
      pair_sh.side = ct.side;
      pair_sh.same = same;
      pair_sh.col_grad = col_grad;
    }
    __syncthreads();
#pragma unroll 1
    for (int ch = 0; ch < TM / kTN; ++ch) {
      const auto q0 = [&] { return pair_sh.row0 + ch * kTN; };
      const auto cend = [&] { return pair_sh.end; };
      const auto csrc = [&] { return pair_sh.side == 0 ? x : y; };
      if (q0() >= cend()) break;
      // 1. distances (or dot products), accumulated over D.
      A acc[RM][kRN];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < kRN; ++j) acc[i][j] = A(0);
      for (int64_t d0 = 0; d0 < D; d0 += kDK1) {
        __syncthreads();  // the previous users of the union are done
        for (int e = threadIdx.x; e < TM * kDK1; e += kTileThreads) {
          const int rr = e / kDK1, dd = e % kDK1;
          const int64_t row = rt.row0 + rr, d = d0 + dd;
          ash[dd * (TM + kPad1) + rr] = row < rt.n && d < D ? zrow[row * D + d] : A(0);
        }
        for (int e = threadIdx.x; e < kTN * kDK1; e += kTileThreads) {
          const int qq = e / kDK1, dd = e % kDK1;
          const int64_t q = q0() + qq, d = d0 + dd;
          csh[dd * (kTN + kPad1) + qq] = q < cend() && d < D ? zc[((pair_sh.side == 0 ? 0 : r.N) + q) * D + d] : A(0);
        }
        __syncthreads();
#pragma unroll 2
        for (int dd = 0; dd < kDK1; ++dd) {
          A av[RM], bv[kRN];
#pragma unroll
          for (int i = 0; i < RM; ++i) av[i] = ash[dd * (TM + kPad1) + ty + 16 * i];
#pragma unroll
          for (int j = 0; j < kRN; ++j) bv[j] = csh[dd * (kTN + kPad1) + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < RM; ++i)
#pragma unroll
            for (int j = 0; j < kRN; ++j) acc[i][j] += av[i] * bv[j];
        }
      }
      __syncthreads();  // the slices are dead: the weights overwrite them
                        // wsh[q][row ^ 2 (q % 16)]: the stores of a warp (rows ty, ty + 1; q = tx + 16 j) hit
                        // 32 distinct banks; the reads of a column are broadcasts. Each thread first parks
                        // its own sums there and reads them back (no other thread touches them yet), so the
                        // kernel evaluation below is a rolled loop over rows (small code, no local memory).
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < kRN; ++j) {
          const int q = tx + 16 * j, row = ty + 16 * i;
          wsh[q * TM + (row ^ (2 * (q % 16)))] = acc[i][j];
        }
      // 2. kernel values and weights. Distance kernels: r2 = |a|^2 + |b|^2 - 2 a.b,
      // clamped at 0 (rounding), exactly 0 from a point to itself; near pairs from the
      // input rows' differences (exact for coincident points: the energy kernel's w = 0).
#pragma unroll 1
      for (int i = 0; i < RM; ++i) {
        const int row = ty + 16 * i;
        const int64_t grow = rt.row0 + row;
        const A na = dist && grow < rt.n ? nrow[grow] : A(0);
        A vs = A(0);
#pragma unroll
        for (int j = 0; j < kRN; ++j) {
          const int q = tx + 16 * j;
          const int64_t gq = q0() + q;
          A* slot = &wsh[q * TM + (row ^ (2 * (q % 16)))];
          A kv = A(0), w = A(0);
          if (grow < rt.n && gq < cend() && !(k == 0 && r.unbiased && gq == grow)) {
            A sv = *slot;
            if (dist) {
              const A rr = na + nrm[(pair_sh.side == 0 ? 0 : r.N) + gq];
              sv = rr - A(2) * sv;
              sv = sv < A(0) ? A(0) : sv;  // a distance is never negative (NaN stays NaN)
              if (k == 0 && gq == grow)
                sv = A(0);
              else if (sv < near_frac * rr)
                sv = exact_r2(rsrc + grow * D, csrc() + gq * D, D);
            }
            eval_pair<A>(r.kernel, sv, cv, r.nbw, inv_d, kv, w);
          }
          // each unordered pair once: the diagonal tile's upper triangle twice and its
          // diagonal once, another tile of the same side twice, a cross pair once
          vs += k == 0 ? (gq > grow ? A(2) * kv : (gq == grow ? kv : A(0))) : (pair_sh.same ? A(2) * kv : kv);
          *slot = pair_sh.gw * w;
        }
        // Sum over the 16 lanes of this row (xor butterfly: every lane gets the same bits).
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) vs += __shfl_xor_sync(0xffffffffu, vs, o);
        if (tx == 0 && grow < rt.n && pair_sh.vw != 0.0)
          rowv[rt.side == 0 ? grow : r.N + grow] += pair_sh.vw * static_cast<double>(vs);
      }
      // 3. the row tile's gradient, slice by slice of DK2 coordinates.
      for (int64_t sl = 0; my_grad && sl < nslices; ++sl) {
        const int64_t dbase = sl * DK2;
        __syncthreads();  // the weights are all written; the previous slice's readers are done
        for (int e = threadIdx.x; e < kTN * DK2; e += kTileThreads) {
          const int qq = e / DK2, dd = e % DK2;
          const int64_t q = q0() + qq, d = dbase + dd;
          bsh[e] = q < cend() && d < D ? load(csrc(), q * D + d) : A(0);
        }
        __syncthreads();
        A av[RM][GD], gs[RM][GD];
#pragma unroll
        for (int i = 0; i < RM; ++i)
#pragma unroll
          for (int j = 0; j < GD; ++j) {
            const int64_t row = rt.row0 + ty + 16 * i, d = dbase + tx + 16 * j;
            av[i][j] = dist && row < rt.n && d < D ? load(rsrc, row * D + d) : A(0);
            gs[i][j] = A(0);
          }
#pragma unroll 1  // unrolled twice, the kernel spilled registers (nvcc 13, sm_90)
        for (int q = 0; q < kTN; ++q) {
          A wv[RM], bv[GD];
#pragma unroll
          for (int i = 0; i < RM; ++i) wv[i] = wsh[q * TM + ((ty + 16 * i) ^ (2 * (q % 16)))];
#pragma unroll
          for (int j = 0; j < GD; ++j) bv[j] = bsh[q * DK2 + tx + 16 * j];
          if (dist) {
#pragma unroll
            for (int i = 0; i < RM; ++i)
#pragma unroll
              for (int j = 0; j < GD; ++j) gs[i][j] += wv[i] * (av[i][j] - bv[j]);
          } else {
#pragma unroll
            for (int i = 0; i < RM; ++i)
#pragma unroll
              for (int j = 0; j < GD; ++j) gs[i][j] += wv[i] * bv[j];
          }
        }
#pragma unroll
        for (int i = 0; i < RM; ++i)
#pragma unroll
          for (int j = 0; j < GD; ++j) {
            const int64_t row = rt.row0 + ty + 16 * i, d = dbase + tx + 16 * j;
            if (row < rt.n && d < D) gacc[(rt.side == 0 ? row : r.N + row) * D + d] += static_cast<double>(gs[i][j]);
          }
      }
      // 4. the column tile's gradient: thread (ty, tx) owns the chunk's points ty + 16 i
      // (i < CM) and coordinates tx + 16 j; the rows stream through bsh kTN at a time.
      // Its reads of w (column q = ty + 16 i, so q % 16 == ty) are broadcasts over tx.
      for (int64_t sl = 0; pair_sh.col_grad && sl < nslices; ++sl) {
        const int64_t dbase = sl * DK2;
        A bq[CM][GD], gc[CM][GD];
#pragma unroll
        for (int i = 0; i < CM; ++i)
#pragma unroll
          for (int j = 0; j < GD; ++j) {
            const int64_t q = q0() + ty + 16 * i, d = dbase + tx + 16 * j;
            bq[i][j] = dist && q < cend() && d < D ? load(csrc(), q * D + d) : A(0);
            gc[i][j] = A(0);
          }
#pragma unroll 1
        for (int rh = 0; rh < TM; rh += kTN) {
          __syncthreads();  // the weights are all written; bsh's previous readers are done
          for (int e = threadIdx.x; e < kTN * DK2; e += kTileThreads) {
            const int pp = e / DK2, dd = e % DK2;
            const int64_t row = rt.row0 + rh + pp, d = dbase + dd;
            bsh[e] = row < rt.n && d < D ? load(rsrc, row * D + d) : A(0);
          }
          __syncthreads();
#pragma unroll 2
          for (int pp = 0; pp < kTN; ++pp) {
            A wv[CM], av[GD];
#pragma unroll
            for (int i = 0; i < CM; ++i) wv[i] = wsh[(ty + 16 * i) * TM + ((rh + pp) ^ (2 * ty))];
#pragma unroll
            for (int j = 0; j < GD; ++j) av[j] = bsh[pp * DK2 + tx + 16 * j];
            if (dist) {
#pragma unroll
              for (int i = 0; i < CM; ++i)
#pragma unroll
                for (int j = 0; j < GD; ++j) gc[i][j] += wv[i] * (bq[i][j] - av[j]);
            } else {
#pragma unroll
              for (int i = 0; i < CM; ++i)
#pragma unroll
                for (int j = 0; j < GD; ++j) gc[i][j] += wv[i] * av[j];
            }
          }
        }
#pragma unroll
        for (int i = 0; i < CM; ++i)
#pragma unroll
          for (int j = 0; j < GD; ++j) {
            const int64_t q = q0() + ty + 16 * i, d = dbase + tx + 16 * j;
            if (q < cend() && d < D)
              colbuf[((static_cast<int64_t>(k - k0) * T + b) * TM + (q - pair_sh.row0)) * D + d] =
                  static_cast<double>(gc[i][j]);
          }
      }
    }
  }
}

// After the sweeps [k0, k1): each point's column gradients, added to its row in sweep
// order (thread e owns one coordinate of one point: no two threads write one accumulator).
template <class A>
__global__ void add_cols(RowCtx r, const double* __restrict__ colbuf, double* gacc, int64_t k0, int64_t k1, bool grad_x,
                         bool grad_y) {
  constexpr int TM = 16 * TileShape<A>::RM;
  const int64_t T = tile_count(r.N, r.M, TM), total = (r.N + r.M) * r.D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e / r.D, d = e % r.D;
    const int side = p < r.N ? 0 : 1;
    if (!(side == 0 ? grad_x : grad_y)) continue;
    const int64_t row = side == 0 ? p : p - r.N;
    const int64_t c = (side == 0 ? 0 : (r.N + TM - 1) / TM) + row / TM;  // the point's tile
    double g = gacc[e];
    for (int64_t k = k0 > 0 ? k0 : 1; k < k1; ++k) {
      const int64_t b = (c - k + T) % T;  // the row tile whose sweep-k pair had c as its column
      if (pair_live(b, k, T)) g += colbuf[(((k - k0) * T + b) * TM + row % TM) * r.D + d];
    }
    gacc[e] = g;
  }
}

template <class S>
__global__ void write_grads(RowCtx r, const double* gacc, S* gx, S* gy) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nx = r.N * r.D, total = (r.N + r.M) * r.D;
  if (e >= total) return;
  if (e < nx) {
    if (gx) store(gx, e, r.grad_scale * gacc[e]);
  } else if (gy) {
    store(gy, e - nx, r.grad_scale * gacc[e]);
  }
}

// Linear estimator: thread i owns the pairs (x_2i, x_2i+1), (y_2i, y_2i+1),
// (x_2i, y_2i+1), (x_2i+1, y_2i) and the four points' gradients.
template <class S>
__global__ void linear_pairs(RowCtx r, const S* __restrict__ x, const S* __restrict__ y, Coefs<compute_t<S>> cv,
                             double* rowv, S* gx, S* gy) {
  using A = compute_t<S>;
  const A* c = cv.ptr();
  const int64_t n = r.N / 2;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t D = r.D;
  const A inv_d = A(1) / static_cast<A>(D);
  const bool dist = r.kernel != kMmdPolynomial;
  const S* pts[4] = {x + 2 * i * D, x + (2 * i + 1) * D, y + 2 * i * D, y + (2 * i + 1) * D};
  // (p, q, sign): indices into pts
  const int pp[4] = {0, 2, 0, 1}, qq[4] = {1, 3, 3, 2};
  const double sg[4] = {1.0, 1.0, -1.0, -1.0};
  A w[4];
  double v = 0.0;
  for (int t = 0; t < 4; ++t) {
    A s = 0;
    for (int64_t d = 0; d < D; ++d) {
      const A a = load(pts[pp[t]], d), b = load(pts[qq[t]], d);
      s += dist ? (a - b) * (a - b) : a * b;
    }
    A k;
    mmd::eval<A>(r.kernel, s, c, r.nbw, inv_d, k, w[t]);
    v += sg[t] * static_cast<double>(k);
  }
  rowv[i] = v;
  const double gs = r.grad_scale / static_cast<double>(n);
  S* outs[4] = {gx ? gx + 2 * i * D : nullptr, gx ? gx + (2 * i + 1) * D : nullptr, gy ? gy + 2 * i * D : nullptr,
                gy ? gy + (2 * i + 1) * D : nullptr};
  for (int64_t d = 0; d < D; ++d) {
    double g[4] = {0.0, 0.0, 0.0, 0.0};
    for (int t = 0; t < 4; ++t) {
      const A a = load(pts[pp[t]], d), b = load(pts[qq[t]], d);
      g[pp[t]] += sg[t] * static_cast<double>(w[t] * (dist ? a - b : b));
      g[qq[t]] += sg[t] * static_cast<double>(w[t] * (dist ? b - a : a));
    }
    for (int q = 0; q < 4; ++q)
      if (outs[q]) store(outs[q], d, gs * g[q]);
  }
}

// One block: out = scale * sum rowv, thread t summing t, t + 256, ... in order, then a fixed tree.
template <class S>
__global__ void sum_rows(const double* rowv, int64_t n, double scale, S* out) {
  __shared__ double sh[kSumThreads];
  double acc = 0.0;
  for (int64_t e = threadIdx.x; e < n; e += kSumThreads) acc += rowv[e];
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kSumThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) store(out, 0, scale * sh[0]);
}

template <class S>
void mmd_s(const MmdArgs& a, cudaStream_t stream) {
  using A = compute_t<S>;
  RowCtx r{};
  r.kernel = a.kernel;
  r.unbiased = a.estimator == kMmdUnbiased;
  r.N = a.N;
  r.M = a.M;
  r.D = a.D;
  r.grad_scale = a.grad_scale;
  mmd::estimator_weights(a.estimator, a.N, a.M, r.wx, r.wy, r.wc);
  std::vector<A> cs;
  if (a.kernel == kMmdRbf || a.kernel == kMmdImq)
    for (int s = 0; s < a.nbw; ++s) cs.push_back(static_cast<A>(mmd::coef(a.kernel, a.bandwidths[s])));
  if (cs.empty()) cs.push_back(A(0));
  r.nbw = static_cast<int>(cs.size());
  const bool linear = a.estimator == kMmdLinear;
  const int64_t rows = linear ? a.N / 2 : a.N + a.M;
  const bool generic = !linear && a.D > 4;
  const bool grad = a.grad_x || a.grad_y;
  const int64_t nacc = generic && grad ? (a.N + a.M) * a.D : 0;
  // Generic path: the pooled mean (distance kernels) and its partial sums, float64; the
  // centred points and their squared norms in the compute type.
  const bool centred = generic && a.kernel != kMmdPolynomial;
  const int64_t chunks = centred ? (a.N + a.M + kMeanChunk - 1) / kMeanChunk : 0;
  const int64_t nmean = centred ? (chunks + 1) * a.D : 0;
  const int64_t nzc = generic ? (a.N + a.M) * (a.D + 1) : 0;
  // Generic path with gradients: the column gradients of up to `sweeps` sweeps per launch
  // (rows_tiled), one slot of T TM-point tiles each, float64. More sweeps per launch mean
  // fewer launches (each costs a few microseconds, and a sweep of a 16k-point problem only
  // tens of them), within a budget of 256 MiB. One sweep is the floor: where a single slot
  // ((N + M) D doubles, rounded up to whole tiles) exceeds the budget, it is allocated anyway,
  // so the gradient's scratch is then about twice nacc (N = M = 1e6, D = 512: 8 GB on top).
  constexpr int64_t tm = 16 * TileShape<A>::RM;
  const int64_t T = generic ? tile_count(a.N, a.M, tm) : 0;
  const int64_t nsweeps = T / 2 + 1;
  const int64_t slot = T * tm * a.D;
  const int64_t sweeps = nacc ? std::max<int64_t>(1, std::min<int64_t>({4, nsweeps, (int64_t{1} << 25) / slot})) : 0;
  const int64_t ncol = sweeps * slot;
  // One allocation: coefficients, row values, float64 gradient rows, mean (generic path),
  // then the compute-type centred points (all offsets multiples of 8 bytes).
  const bool by_value = cs.size() <= static_cast<size_t>(kMaxByValue);
  Coefs<A> cv{};
  for (size_t s = 0; by_value && s < cs.size(); ++s) cv.c[s] = cs[s];
  if (!by_value) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    check_mmd(cudaStreamIsCapturing(stream, &capturing), "capture status");
    if (capturing != cudaStreamCaptureStatusNone)
      throw std::invalid_argument("mmd2: more than " + std::to_string(kMaxByValue) +
                                  " bandwidths cannot be captured in a CUDA graph");
  }
  const size_t cbytes = by_value ? 0 : ((cs.size() * sizeof(A) + 15) / 16) * 16;
  const size_t bytes = cbytes + sizeof(double) * (rows + nacc + nmean + ncol) + sizeof(A) * nzc;
  const Scratch scratch(bytes, stream);
  char* buf = scratch.as<char>();
  double* rowv = reinterpret_cast<double*>(buf + cbytes);
  double* gacc = nacc ? rowv + rows : nullptr;
  double* mean = nmean ? rowv + rows + nacc : nullptr;
  double* partial = nmean ? mean + a.D : nullptr;
  double* colbuf = ncol ? rowv + rows + nacc + nmean : nullptr;
  A* zc = nzc ? reinterpret_cast<A*>(rowv + rows + nacc + nmean + ncol) : nullptr;
  A* nrm = nzc ? zc + (a.N + a.M) * a.D : nullptr;
  if (!by_value) {
    cv.dev = reinterpret_cast<A*>(buf);
    check_mmd(cudaMemcpyAsync(buf, cs.data(), cs.size() * sizeof(A), cudaMemcpyHostToDevice, stream), "copy");
  }
  const Coefs<A>& c = cv;
  S* gx = static_cast<S*>(a.grad_x);
  S* gy = static_cast<S*>(a.grad_y);
  const S* x = static_cast<const S*>(a.x);
  const S* y = static_cast<const S*>(a.y);
  double scale = 1.0;
  if (linear) {
    scale = 1.0 / static_cast<double>(a.N / 2);
    if (gx) check_mmd(cudaMemsetAsync(gx, 0, sizeof(S) * a.N * a.D, stream), "memset");  // an odd last point
    if (gy) check_mmd(cudaMemsetAsync(gy, 0, sizeof(S) * a.M * a.D, stream), "memset");
    if (rows > 0) linear_pairs<S><<<grid_exact(rows, 128), 128, 0, stream>>>(r, x, y, c, rowv, gx, gy);
  } else {
    // rows = N + M >= 2 here (the bindings refuse empty inputs).
    const unsigned blocks = grid_exact(rows, kRowThreads);
    const unsigned tiled_blocks = generic ? grid_exact(T, 1) : 0;
    switch (generic ? 0 : static_cast<int>(a.D)) {
      case 1:
        rows_small<S, 1><<<blocks, kRowThreads, 0, stream>>>(r, x, y, c, rowv, gx, gy);
        break;
      case 2:
        rows_small<S, 2><<<blocks, kRowThreads, 0, stream>>>(r, x, y, c, rowv, gx, gy);
        break;
      case 3:
        rows_small<S, 3><<<blocks, kRowThreads, 0, stream>>>(r, x, y, c, rowv, gx, gy);
        break;
      case 4:
        rows_small<S, 4><<<blocks, kRowThreads, 0, stream>>>(r, x, y, c, rowv, gx, gy);
        break;
      default:
        if (centred) {
          mean_partial<S><<<grid_exact(a.N + a.M, kMeanChunk), kPrepThreads, 0, stream>>>(x, y, a.N, a.M, a.D, partial);
          check_mmd(cudaGetLastError(), "mean launch");
          mean_finish<<<grid_blocks(a.D, 1), kSumThreads, 0, stream>>>(partial, chunks, a.D, a.N + a.M, mean);
          check_mmd(cudaGetLastError(), "mean launch");
        }
        centre<S>
            <<<grid_exact(a.N + a.M, kPrepThreads / 32), kPrepThreads, 0, stream>>>(x, y, a.N, a.M, a.D, mean, zc, nrm);
        check_mmd(cudaGetLastError(), "centre launch");
        if (!gacc) {  // value only: every sweep in one launch (no column gradients to hand over)
          rows_tiled<S><<<tiled_blocks, kTileThreads, 0, stream>>>(r, x, y, zc, nrm, c, rowv, nullptr, nullptr, 0,
                                                                   static_cast<int>(nsweeps), false, false);
        } else {
          for (int64_t k0 = 0; k0 < nsweeps; k0 += sweeps) {
            const int64_t k1 = std::min(nsweeps, k0 + sweeps);
            rows_tiled<S><<<tiled_blocks, kTileThreads, 0, stream>>>(r, x, y, zc, nrm, c, rowv, gacc, colbuf,
                                                                     static_cast<int>(k0), static_cast<int>(k1),
                                                                     gx != nullptr, gy != nullptr);
            check_mmd(cudaGetLastError(), "tiles launch");
            add_cols<A><<<grid_blocks((a.N + a.M) * a.D, 256), 256, 0, stream>>>(r, colbuf, gacc, k0, k1, gx != nullptr,
                                                                                 gy != nullptr);
          }
          check_mmd(cudaGetLastError(), "column launch");
          const int64_t total = (a.N + a.M) * a.D;
          write_grads<S><<<grid_exact(total, 256), 256, 0, stream>>>(r, gacc, gx, gy);
        }
        break;
    }
  }
  check_mmd(cudaGetLastError(), "launch");
  sum_rows<S><<<1, kSumThreads, 0, stream>>>(rowv, rows, scale, static_cast<S*>(a.out_value));
  check_mmd(cudaGetLastError(), "sum launch");
}

}  // namespace

void mmd(const MmdArgs& a, void* stream) {
  cudaStream_t st_ = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32:
      mmd_s<float>(a, st_);
      return;
    case kFloat64:
      mmd_s<double>(a, st_);
      return;
    case kFloat16:
      mmd_s<__half>(a, st_);
      return;
    case kBFloat16:
      mmd_s<__nv_bfloat16>(a, st_);
      return;
    default:
      throw std::invalid_argument("genloss CUDA mmd: unsupported dtype");
  }
}

}  // namespace cuda
}  // namespace genloss
