// engine.cu — the ONE CUDA engine: the same primitives as the CPU engine
// (cpp/include/genloss/engine.h) for any functor of ops/*.h, float32/float64
// and float16/bfloat16 storage with float32 compute and accumulation.
//
// Determinism: a block reduces a fixed chunk of kChunk elements with a fixed
// shared-memory tree, partials are combined per row by one block with the same
// tree, and rows by one more block. No floating-point atomics anywhere, so the
// result is bitwise the same on every run. Every launch goes on the caller's
// stream (torch's current stream), never the default one.
//
// Scratch (partial sums, per-row values) comes from the call's workspace, allocated by
// the caller's own allocator for the bytes each kind's *_scratch function reports (see
// cuda/scratch.cuh and engine.h): no cudaMalloc per call, no host sync, capturable.
// row_lse is a warp per row, col_sum several threads per column over row slices,
// gmm's value an online log-sum-exp per point (no N x K array unless a gradient or the
// responsibilities are asked for); each combines its partials in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "genloss/cuda_info.h"
#include "genloss/engine.h"
#include "scratch.cuh"
#include "storage.cuh"

namespace genloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kChunk % kThreads == 0, "a chunk is a whole number of thread strides");

// Fixed-shape tree over the kThreads values of a block (deterministic): each warp by
// shuffles (offsets 16, 8, 4, 2, 1), then warp 0 over the warps' sums the same way.
// Two barriers, not the nine of a shared-memory tree. Every thread of the block calls it.
__device__ double block_sum(double v, double* sh) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double r = lane < kWarps ? sh[lane] : 0.0;  // every warp reads: no second barrier to publish
  for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
  r = __shfl_sync(0xffffffffu, r, 0);
  __syncthreads();  // sh is reused by the next call
  return r;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Row r's index into the per-row table (r itself without an index array).
__device__ __forceinline__ int64_t table_index(const MapReduceArgs& a, int64_t r) {
  if (!a.index) return r;
  return a.index_type == kInt32 ? static_cast<const int32_t*>(a.index)[r] : static_cast<const int64_t*>(a.index)[r];
}

// Row r's entry of the per-row (float64) table, null without one. The caller checks the
// indices, unless told not to (options(check_data=False), CUDA graph capture): an index
// outside the table then reads row 0, and map_reduce_task makes that row's results NaN.
__device__ __forceinline__ const double* table_row(const MapReduceArgs& a, int64_t r) {
  if (!a.table) return nullptr;
  const int64_t i = table_index(a, r);
  return static_cast<const double*>(a.table) + (i >= 0 && i < a.table_rows ? i : 0) * a.table_stride;
}

// One element k of functor F: value and derivatives from the loaded inputs xs, summed into
// (sv, sd) and written (elementwise output, gradients).
template <class F, class S, bool WG>
__device__ __forceinline__ void element(const MapReduceArgs& a, const Params<compute_t<S>>& p, int64_t k,
                                        compute_t<S> (&xs)[F::arity], compute_t<S> vs, compute_t<S> gs, compute_t<S> go,
                                        compute_t<S>& sv, compute_t<S>& sd) {
  using A = compute_t<S>;
  constexpr int N = F::arity;
  A d[N], v;
  eval_n<F>(xs, p, v, d);
  sv += v;
  if (a.out_elems) store(static_cast<S*>(a.out_elems), k, v * vs);
  if constexpr (WG) {
    sd += d[0];
    for (int q = 0; q < N; ++q)
      if (a.grad[q]) store(static_cast<S*>(a.grad[q]), k, d[q] * gs + go);
  }
}

// Thread's share of one chunk for functor F: elements i, i+256, ... in order. A whole
// chunk (the common case) loads kBatch elements of every input before it computes and
// stores any of them: the stores may alias the inputs as far as the compiler knows, so a
// plain loop keeps ONE load in flight per thread, ~1/3 of the bandwidth (issue 16, item 7).
// The same elements are added in the same order either way: the same bits.
template <class F, class S, bool WG>
__device__ __forceinline__ void chunk_body(const MapReduceArgs& a, const Params<compute_t<S>>& p, int64_t begin,
                                           int64_t len, compute_t<S> vs, compute_t<S> gs, compute_t<S>& sv,
                                           compute_t<S>& sd) {
  using A = compute_t<S>;
  constexpr int N = F::arity;
  const A go = A(grad_offset_of(a));  // (from device memory when offset_from is set)
  // float64 keeps the plain loop (rare on GPUs; each unrolled copy of every functor costs
  // build time, and the build compiles several archs).
  if (sizeof(S) < 8 && len == kChunk) {
    constexpr int kPer = static_cast<int>(kChunk / kThreads);  // 16 elements per thread
    constexpr int kBatch = 4;                                  // loads in flight: 4 * N
    static_assert(kPer % kBatch == 0, "whole batches per chunk");
#pragma unroll 1
    for (int j0 = 0; j0 < kPer; j0 += kBatch) {
      A xs[kBatch][N];
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
#pragma unroll
        for (int q = 0; q < N; ++q)
          xs[j][q] = load(static_cast<const S*>(a.in[q]), begin + threadIdx.x + int64_t(j0 + j) * kThreads);
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
        element<F, S, WG>(a, p, begin + threadIdx.x + int64_t(j0 + j) * kThreads, xs[j], vs, gs, go, sv, sd);
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    A xs[N];
    for (int q = 0; q < N; ++q) xs[q] = load(static_cast<const S*>(a.in[q]), begin + i);
    element<F, S, WG>(a, p, begin + i, xs, vs, gs, go, sv, sd);
  }
}

// One (row, chunk) task of map_reduce_chunks.
template <class F, class S, bool WG>
__device__ __forceinline__ void map_reduce_task(const MapReduceArgs& a, int64_t t, int64_t cols, int64_t cpr,
                                                double* part, double* dpart, double* sh) {
  using A = compute_t<S>;
  const int64_t r = t / cpr, c = t % cpr;
  const int64_t begin = r * cols + c * kChunk;
  const int64_t len = cols - c * kChunk < kChunk ? cols - c * kChunk : kChunk;
  const Params<A> p{A(first_param(a)), A(a.pb), A(a.pc), a.mode, table_row(a, r)};
  A wr = a.row_weight ? load(static_cast<const S*>(a.row_weight), r) : A(1);
  bool bad = false;  // an unchecked index outside the table: NaN, not another row's numbers
  if (a.table && a.index) {
    const int64_t i = table_index(a, r);
    bad = i < 0 || i >= a.table_rows;
    if (bad) wr = A(NAN);  // NaN elementwise outputs and gradients (vs, gs below)
  }
  const A vs = A(a.value_scale) * wr, gs = A(a.grad_scale) * wr;
  A sv = A(0), sd = A(0);
  if constexpr (has_alt<F>::value) {
    if (p.rp && p.rp[F::alt_flag] != 0.0)
      chunk_body<typename F::Alt, S, WG>(a, p, begin, len, vs, gs, sv, sd);
    else
      chunk_body<F, S, WG>(a, p, begin, len, vs, gs, sv, sd);
  } else {
    chunk_body<F, S, WG>(a, p, begin, len, vs, gs, sv, sd);
  }
  const double bs = block_sum(static_cast<double>(sv), sh);
  double bd = 0.0;
  if (WG) bd = block_sum(static_cast<double>(sd), sh);
  if (threadIdx.x == 0) {
    part[t] = bad ? static_cast<double>(NAN) : bs;
    if (WG) dpart[t] = bd * static_cast<double>(wr);
  }
}

// Grid: one block per (row, chunk) task, looping with a grid stride past
// kMaxGridX tasks (2^31 one-chunk rows fit in an H200). Thread t handles elements
// t, t+256, ... of its chunk, in order; the block tree then sums the 256 thread
// partials. A row weight scales the row's elementwise values and gradients here,
// its partials in finalize.
template <class F, class S, bool WG>
__global__ void map_reduce_chunks(MapReduceArgs a, int64_t ntask, int64_t cols, int64_t cpr, double* part,
                                  double* dpart) {
  __shared__ double sh[kThreads];
  // The loop bound is the same for every thread of a block: block_sum's barriers are safe.
  for (int64_t t = blockIdx.x; t < ntask; t += gridDim.x) map_reduce_task<F, S, WG>(a, t, cols, cpr, part, dpart, sh);
}

// One block per row (grid-stride past kMaxGridX rows): sum that row's n partials
// (strided per thread, then tree).
__global__ void sum_segments(const double* in, int64_t rows, int64_t n, double* out) {
  __shared__ double sh[kThreads];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const double* seg = in + row * n;
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) s += seg[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[row] = s;
  }
}

// One block: total over rows, scaled outputs, optional totals for the host.
// Row weights (if any) scale each row sum here; out_rows_raw gets it unweighted.
// V: the value outputs' type, S or float (MapReduceArgs::value_f32).
template <class S, class V = S>
__global__ void finalize(double* rowv, int64_t rows, const double* dparts, int64_t ndp, double value_scale,
                         V* out_value, int accumulate, V* out_rows, double* totals, const S* row_weight = nullptr,
                         S* out_rows_raw = nullptr) {
  using A = compute_t<S>;
  __shared__ double sh[kThreads];
  double s = 0.0, d = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
    if (out_rows_raw) store(out_rows_raw, i, static_cast<A>(value_scale * rowv[i]));
    if (row_weight) rowv[i] *= static_cast<double>(load(row_weight, i));
    s += rowv[i];
  }
  for (int64_t i = threadIdx.x; i < ndp; i += kThreads) d += dparts[i];
  s = block_sum(s, sh);
  d = block_sum(d, sh);
  if (threadIdx.x == 0) {
    if (out_value) {
      const double prev = accumulate ? static_cast<double>(load(out_value, 0)) : 0.0;
      store(out_value, 0, static_cast<A>(prev + value_scale * s));
    }
    if (totals) {
      totals[0] = s;
      totals[1] = d;
    }
  }
  if (out_rows)
    for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
      const double prev = accumulate ? static_cast<double>(load(out_rows, i)) : 0.0;
      store(out_rows, i, static_cast<A>(prev + value_scale * rowv[i]));
    }
}

// map_reduce's task layout: rows of cols elements (one row of everything when no per-row
// output is asked for), cut into cpr chunks each.
struct MrShape {
  int64_t rows, cols, cpr, ntask;
};
MrShape mr_shape(const MapReduceArgs& a) {
  const bool per_row = a.out_rows || a.out_rows_raw || a.table || a.row_weight;
  MrShape m;
  m.rows = per_row ? a.rows : 1;
  m.cols = per_row ? a.cols : a.rows * a.cols;
  m.cpr = ceil_div(m.cols, kChunk);
  m.ntask = m.rows * m.cpr;
  return m;
}
// Partials (2 per task), row sums, the two totals.
size_t mr_scratch_raw(const MrShape& m) {
  return sizeof(double) * static_cast<size_t>(2 * m.ntask + m.rows + 2);
}

template <class F, class S, bool WG>
void map_reduce_t(const MapReduceArgs& a, cudaStream_t st) {
  const MrShape m = mr_shape(a);
  const int64_t rows = m.rows, cols = m.cols, cpr = m.cpr, ntask = m.ntask;
  const Scratch scratch(mr_scratch_raw(m), st);
  double* part = scratch.as<double>();
  double* dpart = part + ntask;
  double* rowv = dpart + ntask;
  // totals_out: the totals stay on the device (no copy, no wait); else scratch for the host copy
  double* dev_totals = a.totals_out ? a.totals_out : rowv + rows;
  // Empty inputs (no task, or no row) launch nothing but finalize, which writes the
  // CPU engine's result: a zero total (or the accumulated value), zero row sums.
  if (ntask > 0) {
    map_reduce_chunks<F, S, WG><<<grid_blocks(ntask, 1), kThreads, 0, st>>>(a, ntask, cols, cpr, part, dpart);
    check_cuda(cudaGetLastError(), "map_reduce launch");
  }
  if (rows > 0) sum_segments<<<grid_blocks(rows, 1), kThreads, 0, st>>>(part, rows, cpr, rowv);
  double* tot = a.totals || a.totals_out ? dev_totals : nullptr;
  const S* rw = static_cast<const S*>(a.row_weight);
  if (a.value_f32)  // a float16/bfloat16 call whose value is float32
    finalize<S, float><<<1, kThreads, 0, st>>>(
        rowv, rows, dpart, WG ? ntask : 0, a.value_scale, static_cast<float*>(a.out_value), a.accumulate,
        static_cast<float*>(a.out_rows), tot, rw, static_cast<S*>(a.out_rows_raw));
  else
    finalize<S><<<1, kThreads, 0, st>>>(rowv, rows, dpart, WG ? ntask : 0, a.value_scale, static_cast<S*>(a.out_value),
                                        a.accumulate, static_cast<S*>(a.out_rows), tot, rw,
                                        static_cast<S*>(a.out_rows_raw));
  check_cuda(cudaGetLastError(), "finalize launch");
  if (a.totals) {
    check_cuda(cudaMemcpyAsync(a.totals, dev_totals, 2 * sizeof(double), cudaMemcpyDeviceToHost, st), "totals");
    check_cuda(cudaStreamSynchronize(st), "sync");
  }
}

template <class F, class S>
void map_reduce_g(const MapReduceArgs& a, cudaStream_t st) {
  bool any = false;  // each gradient may be skipped when not needed
  for (int q = 0; q < F::arity; ++q) any = any || a.grad[q] != nullptr;
  if (any)
    map_reduce_t<F, S, true>(a, st);
  else
    map_reduce_t<F, S, false>(a, st);
}

// Calls fn.template operator()<S>() with S the storage type of the dtype code.
template <class Fn>
void dispatch_storage(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      fn(float{});
      return;
    case kFloat64:
      fn(double{});
      return;
    case kFloat16:
      fn(__half{});
      return;
    case kBFloat16:
      fn(__nv_bfloat16{});
      return;
    default:
      throw std::invalid_argument("genloss CUDA: unsupported dtype");
  }
}

template <class S>
__global__ void row_scale_kernel(RowScaleArgs a) {
  using A = compute_t<S>;
  const int64_t n = a.rows * a.cols;
  const S* x = static_cast<const S*>(a.x);
  const S* coef = static_cast<const S*>(a.coef);
  S* out = static_cast<S*>(a.out);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A c = A(a.scale);
    if (coef) c *= load(coef, i / a.cols);
    A v = x ? c * load(x, i) : c;  // x null: ones (a per-row broadcast)
    if (a.accumulate) v += load(out, i);
    store(out, i, v);
  }
}

// ---- col_sum: several threads per column (issue 16, item 7) ------------------------
// A block is kColX consecutive columns (a warp's coalesced reads) by kColY row strides;
// grid.y cuts the rows into `slices` contiguous slices. Thread (x, y) of slice s sums rows
// s*L + y, s*L + y + kColY, ... (in order, double), the block combines its kColY sums in
// y order, and with several slices a second kernel adds the slices' partials in slice
// order. Every order depends on the shape only: bitwise the same on every run.
constexpr int kColX = 32, kColY = 8;

// Row slices of col_sum: enough blocks to fill the GPU (~1024 in all) with at least 64
// rows a slice, at most 65535 (the grid's y limit). A function of the shape only.
int64_t col_sum_slices(const ColSumArgs& a) {
  if (a.rows <= 0 || a.cols <= 0) return 1;
  const int64_t col_blocks = ceil_div(a.cols, kColX);
  int64_t s = ceil_div(a.rows, 64);
  const int64_t want = ceil_div(1024, col_blocks);
  if (s > want) s = want;
  if (s > 65535) s = 65535;
  return s < 1 ? 1 : s;
}

// part null: one slice, the block writes scale * sum to out; else slice s's sums to part[s, :].
template <class S>
__global__ void col_sum_kernel(ColSumArgs a, int64_t slice_rows, double* part) {
  __shared__ double sh[kColY][kColX];
  const S* x = static_cast<const S*>(a.x);
  const int64_t j = blockIdx.x * int64_t(kColX) + threadIdx.x;
  const int64_t r0 = blockIdx.y * slice_rows;
  const int64_t r1 = r0 + slice_rows < a.rows ? r0 + slice_rows : a.rows;
  double acc = 0.0;
  if (j < a.cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColY) acc += static_cast<double>(load(x, r * a.cols + j));
  sh[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < a.cols) {
    double t = 0.0;
    for (int y = 0; y < kColY; ++y) t += sh[y][threadIdx.x];
    if (part)
      part[blockIdx.y * a.cols + j] = t;
    else
      store(static_cast<S*>(a.out), j, static_cast<compute_t<S>>(a.scale * t));
  }
}

// The slices' partials of each column, in slice order.
template <class S>
__global__ void col_sum_combine(ColSumArgs a, int64_t slices, const double* part) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < a.cols; j += int64_t(gridDim.x) * blockDim.x) {
    double t = 0.0;
    for (int64_t s = 0; s < slices; ++s) t += part[s * a.cols + j];
    store(static_cast<S*>(a.out), j, static_cast<compute_t<S>>(a.scale * t));
  }
}

template <class S>
__global__ void col_broadcast_kernel(ColBroadcastArgs a) {
  using A = compute_t<S>;
  const int64_t n = a.rows * a.cols;
  const S* v = static_cast<const S*>(a.v);
  S* out = static_cast<S*>(a.out);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A o = A(a.scale) * load(v, i % a.cols);
    if (a.accumulate) o += load(out, i);
    store(out, i, o);
  }
}

// ---- row_lse: one warp per row (issue 16, item 7) --------------------------------------
// Lane i takes the row's entries i, i+32, ... (in order) into its own ops::LseRow (the
// math shared with the CPU engine: double statistics). The lanes' maxima are merged by
// an xor butterfly (max with NaN winning is exact: any order gives the same bits), each
// lane then sums exp(x - max) over its entries, and the 32 sums are added by the same
// butterfly (a fixed tree; a + b == b + a, so every lane holds the same bits). Every lane
// finishes the row (the same value, sigma) and writes the gradients of its entries.
// Deterministic: the order depends only on K.                       (GAN.15, GAN.19)
constexpr int kLseWarps = kThreads / 32;  // rows per block

// LseRow::max's rule for two partial maxima: NaN wins, an unseen side is ignored.
__device__ __forceinline__ void max_merge(double& m, bool& seen, double m2, bool seen2) {
  if (!seen2) return;
  if (!seen || m2 != m2 || (m == m && m2 > m)) m = m2;
  seen = true;
}

template <class S>
__device__ void row_lse_warp(const RowLseArgs& a, int64_t r, int lane, double* rowv) {
  const int64_t K = a.K;
  const S* l = static_cast<const S*>(a.logits) + r * K;
  int64_t target = a.index;
  if (a.mode == ops::kLseLabel || a.mode == ops::kLseRealLabel)
    target =
        a.label_type == kInt32 ? static_cast<const int32_t*>(a.labels)[r] : static_cast<const int64_t*>(a.labels)[r];
  ops::LseRow row;
  for (int64_t k = lane; k < K; k += 32) row.max(ops::lse_role(a.mode, k, K, target), static_cast<double>(load(l, k)));
  for (int q = 0; q < 2; ++q)
    for (int o = 16; o > 0; o >>= 1) {
      const double m2 = __shfl_xor_sync(0xffffffffu, row.m[q], o);
      const bool seen2 = __shfl_xor_sync(0xffffffffu, static_cast<int>(row.seen[q]), o) != 0;
      max_merge(row.m[q], row.seen[q], m2, seen2);
    }
  for (int64_t k = lane; k < K; k += 32) row.add(ops::lse_role(a.mode, k, K, target), static_cast<double>(load(l, k)));
  for (int q = 0; q < 2; ++q)
    for (int o = 16; o > 0; o >>= 1) row.s[q] += __shfl_xor_sync(0xffffffffu, row.s[q], o);
  const double v = row.finish(a.mode, K);
  if (lane == 0) rowv[r] = v;
  if (a.grad) {
    S* g = static_cast<S*>(a.grad) + r * K;
    for (int64_t k = lane; k < K; k += 32) {
      const double gk = row.grad(a.mode, ops::lse_role(a.mode, k, K, target), static_cast<double>(load(l, k)));
      store(g, k, static_cast<compute_t<S>>(a.grad_scale * gk));
    }
  }
}

// Warp w of the grid takes rows w, w + (warps in the grid), ...: the loop bound is the
// same for the 32 lanes of a warp, so the full-mask shuffles are safe.
template <class S>
__global__ void row_lse_kernel(RowLseArgs a, double* rowv) {
  const int lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * int64_t(kLseWarps) + (threadIdx.x >> 5);
  for (int64_t r = w; r < a.rows; r += int64_t(gridDim.x) * kLseWarps) row_lse_warp<S>(a, r, lane, rowv);
}

// ---- Gaussian mixtures (VAE.11): three passes, no N x K x D intermediate ----------
constexpr int64_t kGmmChunk = 1024;

// One block: log pi, the per-component constant, mu and 1/variance in double.
template <class S>
__global__ void gmm_prep(GmmArgs a, double* mu, double* iv, double* cst, double* logpi) {
  __shared__ double sh[kThreads];
  const S* lg = static_cast<const S*>(a.logits);
  double m = -INFINITY;
  for (int64_t k = threadIdx.x; k < a.K; k += kThreads) m = fmax(m, static_cast<double>(load(lg, k)));
  sh[threadIdx.x] = m;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  m = sh[0];
  __syncthreads();
  double e = 0.0;
  // ops::lse_shift: a +inf logit is a weight-1 component, not inf - inf = NaN (VAE.11)
  for (int64_t k = threadIdx.x; k < a.K; k += kThreads) e += exp(ops::lse_shift(static_cast<double>(load(lg, k)), m));
  const double log_s = log(block_sum(e, sh));
  for (int64_t k = threadIdx.x; k < a.K; k += kThreads) {
    logpi[k] = ops::lse_shift(static_cast<double>(load(lg, k)), m) - log_s;
    double c = 0.0;
    for (int64_t d = 0; d < a.D; ++d) {
      const double lv = static_cast<double>(load(static_cast<const S*>(a.logvars), k * a.D + d));
      mu[k * a.D + d] = static_cast<double>(load(static_cast<const S*>(a.means), k * a.D + d));
      iv[k * a.D + d] = exp(-lv);
      c += 1.8378770664093453 + lv;
    }
    cst[k] = logpi[k] - 0.5 * c;
  }
}

// One thread per point. The log-likelihood is an ONLINE log-sum-exp over the components
// (a running maximum and a rescaled sum in registers: no K-sized array per point), with
// the CPU's special cases kept (its two-pass form gives NaN when a component is NaN or
// +inf, or when every component is -inf; a -inf component adds exactly 0). When a
// gradient or the responsibilities are asked for, the point's log-probabilities go to
// r (N x K, needed by gmm_params across points) and become responsibilities there; a
// value-only call has no r at all (issue 16, item 5: 5 GB at N = 1e7, K = 64).
template <class S>
__device__ void gmm_point(const GmmArgs& a, int64_t n, const double* mu, const double* iv, const double* cst,
                          double* rowv, double* r) {
  const int64_t K = a.K, D = a.D;
  const S* xn = static_cast<const S*>(a.x) + n * D;
  double* rn = r ? r + n * K : nullptr;
  double m = -INFINITY, s = 0.0;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    double q = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double diff = static_cast<double>(load(xn, d)) - mu[k * D + d];
      q += diff * diff * iv[k * D + d];
    }
    const double lp = cst[k] - 0.5 * q;
    if (rn) rn[k] = lp;
    if (lp == -INFINITY) continue;  // exp(-inf - m) = 0
    if (!(lp < INFINITY)) {         // NaN or +inf: the CPU's exp(lp - m) is NaN
      nan = true;
      continue;
    }
    if (lp > m) {
      s = s * exp(m - lp) + 1.0;  // (m = -inf: 0 * 0 + 1)
      m = lp;
    } else {
      s += exp(lp - m);
    }
  }
  const double ll = nan || m == -INFINITY ? static_cast<double>(NAN) : m + log(s);
  rowv[n] = ll;
  if (!rn) return;
  for (int64_t k = 0; k < K; ++k) {
    rn[k] = exp(rn[k] - ll);
    if (a.resp) store(static_cast<S*>(a.resp) + n * K, k, static_cast<compute_t<S>>(rn[k]));
  }
  if (a.grad_x) {
    const double w =
        a.grad_scale * (a.row_weights ? static_cast<double>(load(static_cast<const S*>(a.row_weights), n)) : 1.0);
    for (int64_t d = 0; d < D; ++d) {
      const double xd = static_cast<double>(load(xn, d));
      double g = 0.0;
      for (int64_t k = 0; k < K; ++k) g += rn[k] * (mu[k * D + d] - xd) * iv[k * D + d];
      store(static_cast<S*>(a.grad_x) + n * D, d, static_cast<compute_t<S>>(w * g));
    }
  }
}

template <class S>
__global__ void gmm_points(GmmArgs a, const double* mu, const double* iv, const double* cst, double* rowv, double* r) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < a.N; n += int64_t(gridDim.x) * blockDim.x)
    gmm_point<S>(a, n, mu, iv, cst, rowv, r);
}

// One block per chunk of points (grid-stride over chunks): partial sums S0[K],
// U[K*D], V[K*D], each entry summed over the chunk's points in order (deterministic).
template <class S>
__global__ void gmm_params(GmmArgs a, const double* mu, const double* r, double* part) {
  const int64_t K = a.K, D = a.D, stride = K + 2 * K * D;
  const S* x = static_cast<const S*>(a.x);
  const S* rw = static_cast<const S*>(a.row_weights);
  const int64_t nch = (a.N + kGmmChunk - 1) / kGmmChunk;
  for (int64_t ch = blockIdx.x; ch < nch; ch += gridDim.x)
    for (int64_t e = threadIdx.x; e < stride; e += blockDim.x) {
      const int64_t n0 = ch * kGmmChunk;
      const int64_t n1 = n0 + kGmmChunk < a.N ? n0 + kGmmChunk : a.N;
      const int64_t kd = e < K ? 0 : (e - K) % (K * D);
      const int64_t k = e < K ? e : kd / D, d = kd % D;
      double acc = 0.0;
      for (int64_t n = n0; n < n1; ++n) {
        const double w = a.grad_scale * (rw ? static_cast<double>(load(rw, n)) : 1.0) * r[n * K + k];
        if (e < K) {
          acc += w;
        } else {
          const double diff = static_cast<double>(load(x, n * D + d)) - mu[kd];
          acc += e < K + K * D ? w * diff : w * diff * diff;
        }
      }
      part[ch * stride + e] = acc;
    }
}

// Each of the stride sums S0[K], U[K*D], V[K*D] once: its chunk partials in chunk order.
__global__ void gmm_totals(const double* part, int64_t nch, int64_t stride, double* tot) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < stride; e += int64_t(gridDim.x) * blockDim.x) {
    double t = 0.0;
    for (int64_t c = 0; c < nch; ++c) t += part[c * stride + e];
    tot[e] = t;
  }
}

// One block: the parameter gradients from the totals. sum_n w_n = sum_k S0_k (the
// responsibilities sum to 1) is computed ONCE, by thread 0 in k order, and shared.
template <class S>
__global__ void gmm_finish(GmmArgs a, const double* tot, const double* iv, const double* logpi) {
  using A = compute_t<S>;
  const int64_t K = a.K, D = a.D;
  __shared__ double wsum;
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int64_t k = 0; k < K; ++k) t += tot[k];
    wsum = t;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < K + K * D; e += blockDim.x) {
    if (e < K) {
      if (a.grad_logits) store(static_cast<S*>(a.grad_logits), e, static_cast<A>(tot[e] - wsum * exp(logpi[e])));
    } else {
      const int64_t kd = e - K;
      const double s0 = tot[kd / D], u = tot[K + kd], v = tot[K + K * D + kd];
      if (a.grad_means) store(static_cast<S*>(a.grad_means), kd, static_cast<A>(u * iv[kd]));
      if (a.grad_logvars) store(static_cast<S*>(a.grad_logvars), kd, static_cast<A>(0.5 * (v * iv[kd] - s0)));
    }
  }
}

// gmm's scratch, in doubles: mu, 1/var (K*D each), the constants and log pi (K each), the
// log-likelihoods (N), the responsibilities (N*K, only when asked for or needed by a
// gradient), the chunk partials and their totals (parameter gradients only).
struct GmmLayout {
  int64_t nch, stride, n_r, n_part, total;
};
GmmLayout gmm_layout(const GmmArgs& a) {
  const int64_t K = a.K, D = a.D, N = a.N;
  const bool pgrad = a.grad_means || a.grad_logvars || a.grad_logits;
  GmmLayout g;
  g.nch = ceil_div(N, kGmmChunk);
  g.stride = K + 2 * K * D;
  g.n_r = pgrad || a.grad_x || a.resp ? N * K : 0;
  g.n_part = pgrad ? (g.nch + 1) * g.stride : 0;
  g.total = 2 * K * D + 2 * K + N + g.n_r + g.n_part;
  return g;
}

unsigned grid_for(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

}  // namespace

bool built() {
  return true;
}

// ---- the call's workspace (engine.h; Scratch in scratch.cuh carves from it) ----------

namespace {
thread_local WorkspaceArena* t_arena = nullptr;
std::atomic<int64_t> g_fallbacks{0};
}  // namespace

WorkspaceArena* current_arena() {
  return t_arena;
}
void note_scratch_fallback() {
  g_fallbacks.fetch_add(1, std::memory_order_relaxed);
}
int64_t scratch_fallbacks() {
  return g_fallbacks.load(std::memory_order_relaxed);
}

Workspace::Workspace(void* base, size_t bytes, ScratchMore more, void* more_ctx) : previous_(t_arena) {
  // Scratch pointers must be kScratchAlign-aligned (torch's and CuPy's blocks are 512-byte
  // aligned: this trims nothing there).
  const uintptr_t p = reinterpret_cast<uintptr_t>(base);
  const uintptr_t q = (p + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
  arena_.more = more;
  arena_.more_ctx = more_ctx;
  if (base != nullptr && q - p <= bytes) {
    arena_.base = reinterpret_cast<char*>(q);
    arena_.size = bytes - (q - p);
  }
  // no workspace and no allocator: every Scratch of this call falls back
  t_arena = (arena_.base != nullptr || more != nullptr) ? &arena_ : nullptr;
}
Workspace::~Workspace() {
  t_arena = previous_;
}

// The size functions: the same arithmetic as each launcher's Scratch (one Scratch alive at
// a time in each kind), rounded as a Scratch rounds.
size_t map_reduce_scratch(const MapReduceArgs& a) {
  return scratch_round(mr_scratch_raw(mr_shape(a)));
}
size_t col_sum_scratch(const ColSumArgs& a) {
  const int64_t slices = col_sum_slices(a);
  if (a.cols == 0 || slices == 1) return 0;  // no Scratch
  return scratch_round(sizeof(double) * static_cast<size_t>(slices * a.cols));
}
size_t row_lse_scratch(const RowLseArgs& a) {
  return scratch_round(sizeof(double) * static_cast<size_t>(a.rows));
}
size_t gmm_scratch(const GmmArgs& a) {
  return scratch_round(sizeof(double) * static_cast<size_t>(gmm_layout(a).total));
}

RuntimeInfo runtime_info() {
  RuntimeInfo r;
  r.runtime_version = CUDART_VERSION;
  if (cudaDriverGetVersion(&r.driver_version) != cudaSuccess) r.driver_version = 0;
  const cudaError_t e = cudaGetDeviceCount(&r.device_count);
  if (e != cudaSuccess) {
    r.device_count = 0;
    r.error = cudaGetErrorString(e);
    (void)cudaGetLastError();  // a probe: leave no sticky error for the next call to find
  }
  return r;
}

DeviceGuard::DeviceGuard(int device) {
  int current = 0;
  check_cuda(cudaGetDevice(&current), "get device");
  if (current != device) {  // cudaSetDevice is not free: skip it in the common case
    check_cuda(cudaSetDevice(device), "set device");
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  // A destructor cannot throw; restoring a device that was current a moment ago
  // fails only with a broken context, which the caller's next CUDA call reports.
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}

void map_reduce(const MapReduceArgs& a, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_storage(a.dtype, [&](auto s) {
    using S = decltype(s);
    switch (a.functor) {
#define GENLOSS_CASE(id, type)    \
  case id:                        \
    map_reduce_g<type, S>(a, st); \
    return;
      GENLOSS_FUNCTORS(GENLOSS_CASE)
#undef GENLOSS_CASE
      default:
        throw std::invalid_argument("genloss CUDA: unknown functor");
    }
  });
}

void row_scale(const RowScaleArgs& a, void* stream) {
  if (a.rows * a.cols == 0) return;  // nothing to write (as on the CPU)
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_storage(a.dtype, [&](auto s) {
    using S = decltype(s);
    row_scale_kernel<S><<<grid_for(a.rows * a.cols), kThreads, 0, st>>>(a);
  });
  check_cuda(cudaGetLastError(), "row_scale launch");
}

void col_sum(const ColSumArgs& a, void* stream) {
  if (a.cols == 0) return;  // no column to write; rows == 0 writes zero sums, as on the CPU
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t slices = col_sum_slices(a);
  const int64_t slice_rows = ceil_div(a.rows, slices);
  const dim3 grid(grid_exact(a.cols, kColX), static_cast<unsigned>(slices));
  const dim3 block(kColX, kColY);
  dispatch_storage(a.dtype, [&](auto s) {
    using S = decltype(s);
    if (slices == 1) {
      col_sum_kernel<S><<<grid, block, 0, st>>>(a, slice_rows, nullptr);
      check_cuda(cudaGetLastError(), "col_sum launch");
      return;
    }
    const Scratch scratch(sizeof(double) * static_cast<size_t>(slices * a.cols), st);
    col_sum_kernel<S><<<grid, block, 0, st>>>(a, slice_rows, scratch.as<double>());
    check_cuda(cudaGetLastError(), "col_sum launch");
    col_sum_combine<S><<<grid_for(a.cols), kThreads, 0, st>>>(a, slices, scratch.as<double>());
    check_cuda(cudaGetLastError(), "col_sum combine launch");
  });
}

void col_broadcast(const ColBroadcastArgs& a, void* stream) {
  if (a.rows * a.cols == 0) return;  // nothing to write (as on the CPU)
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_storage(a.dtype, [&](auto s) {
    using S = decltype(s);
    col_broadcast_kernel<S><<<grid_for(a.rows * a.cols), kThreads, 0, st>>>(a);
  });
  check_cuda(cudaGetLastError(), "col_broadcast launch");
}

// ---- row_map: B per-sample coefficients, float64 math (engine.h row_map_at) -----------
template <class F, class S>
__global__ void row_map_kernel(RowMapArgs a) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < a.rows; r += int64_t(gridDim.x) * blockDim.x)
    row_map_at<F, S>(a, r);
}

void row_map(const RowMapArgs& a, void* stream) {
  if (a.rows == 0) return;  // nothing to write (as on the CPU)
  if (a.dtype != kFloat32 && a.dtype != kFloat64)
    throw std::invalid_argument("genloss CUDA: row_map takes float32 or float64");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_storage(a.dtype, [&](auto s) {
    using S = decltype(s);
    if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
      switch (a.functor) {
#define GENLOSS_CASE(id, type)                                         \
  case id:                                                             \
    row_map_kernel<type, S><<<grid_for(a.rows), kThreads, 0, st>>>(a); \
    return;
        GENLOSS_ROW_FUNCTORS(GENLOSS_CASE)
#undef GENLOSS_CASE
        default:
          throw std::invalid_argument("genloss CUDA: unknown row functor");
      }
    }
  });
  check_cuda(cudaGetLastError(), "row_map launch");
}

void row_lse(const RowLseArgs& a, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Scratch scratch(sizeof(double) * static_cast<size_t>(a.rows), st);
  double* rowv = scratch.as<double>();
  dispatch_storage(a.dtype, [&](auto s) {
    using S = decltype(s);
    if (a.rows > 0) {  // no row: finalize alone writes the zero total, as on the CPU
      row_lse_kernel<S><<<grid_blocks(a.rows, kLseWarps), kThreads, 0, st>>>(a, rowv);
      check_cuda(cudaGetLastError(), "row_lse launch");
    }
    finalize<S><<<1, kThreads, 0, st>>>(rowv, a.rows, nullptr, 0, a.value_scale, static_cast<S*>(a.out_value),
                                        a.accumulate, static_cast<S*>(a.out_rows), nullptr);
    check_cuda(cudaGetLastError(), "finalize launch");
  });
}

void gmm(const GmmArgs& a, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t K = a.K, D = a.D, N = a.N;
  const GmmLayout g = gmm_layout(a);
  const Scratch scratch(sizeof(double) * static_cast<size_t>(g.total), st);
  double* mu = scratch.as<double>();
  double* iv = mu + K * D;
  double* cst = iv + K * D;
  double* logpi = cst + K;
  double* rowv = logpi + K;
  double* r = g.n_r ? rowv + N : nullptr;  // value only: no N x K array
  double* part = rowv + N + g.n_r;
  double* tot = part + g.nch * g.stride;
  dispatch_storage(a.dtype, [&](auto s) {
    using S = decltype(s);
    gmm_prep<S><<<1, kThreads, 0, st>>>(a, mu, iv, cst, logpi);
    if (N > 0) gmm_points<S><<<grid_blocks(N, 128), 128, 0, st>>>(a, mu, iv, cst, rowv, r);
    finalize<S><<<1, kThreads, 0, st>>>(rowv, N, nullptr, 0, a.value_scale, static_cast<S*>(a.out_value), 0,
                                        static_cast<S*>(a.out_rows), nullptr);
    if (g.n_part) {
      if (g.nch > 0) {
        gmm_params<S><<<grid_blocks(g.nch, 1), 128, 0, st>>>(a, mu, r, part);
        gmm_totals<<<grid_blocks(g.stride, kThreads), kThreads, 0, st>>>(part, g.nch, g.stride, tot);
      } else {  // no point: zero totals (the gradients of an empty sum)
        check_cuda(cudaMemsetAsync(tot, 0, sizeof(double) * static_cast<size_t>(g.stride), st), "gmm zero");
      }
      gmm_finish<S><<<1, kThreads, 0, st>>>(a, tot, iv, logpi);
    }
  });
  check_cuda(cudaGetLastError(), "gmm launch");
}

}  // namespace cuda
}  // namespace genloss
