// mmd.cu — the MMD^2 kernel on CUDA: value and both gradients in one pass,
// O((N + M) D) memory, deterministic (no floating-point atomics).
//
// One thread owns one point p (x rows first, then y rows) and walks every other
// point in tiles staged in shared memory, in a fixed order; it accumulates its
// row of the kernel sums (value) and its own gradient, so no two threads ever
// write the same address. The row values are then summed by one block with a
// fixed tree. This trades the CPU engine's use of symmetry (each pair of K_xx
// once) for the absence of atomics: every pair of K_xx / K_yy is evaluated twice,
// once by each of its points. float16/bfloat16 are stored, float32 computed;
// each tile's float sums are flushed to float64 accumulators.
//
// Row p = x_i (a = x_i):  value_p = a_w sum_{b in x} k(a, b) + c sum_{b in y} k(a, b)
//                          grad_p  = 2 a_w sum_{b in x} dk/da + c sum_{b in y} dk/da
// Row p = y_j:            value_p = b_w sum_{b in y} k(a, b)       (the cross term is in x's rows)
//                          grad_p  = 2 b_w sum_{b in y} dk/da + c sum_{b in x} dk/da
// (diagonal b == a skipped for the unbiased estimator), with dk/da = w (a - b) for
// distance kernels and w b for the polynomial (genloss/mmd.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// The other point b of side `side`, index q.
template <class S>
__device__ __forceinline__ const S* point(const S* x, const S* y, const RowCtx& r, int side, int64_t q) {
  return side == 0 ? x + q * r.D : y + q * r.D;
}

// Small D: coordinates and gradient in registers; tiles of other points in shared memory.
template <class S, int DIM>
__global__ void rows_small(RowCtx r, const S* __restrict__ x, const S* __restrict__ y, Coefs<typename Acc<S>::type> cv,
                           double* rowv, S* gx, S* gy) {
  using A = typename Acc<S>::type;
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
  for (int side = 0; side < 2; ++side) {
    const int64_t n = side == 0 ? r.N : r.M;
    const bool same = side == my_side;
    const double vw = same ? (my_side == 0 ? r.wx : r.wy) : (my_side == 0 ? r.wc : 0.0);
    const double gw = same ? 2.0 * (my_side == 0 ? r.wx : r.wy) : r.wc;
    const S* src = side == 0 ? x : y;
    for (int64_t q0 = 0; q0 < n; q0 += kTileB) {
      const int64_t nb = n - q0 < kTileB ? n - q0 : kTileB;
      __syncthreads();
      for (int e = threadIdx.x; e < kTileB * DIM; e += kRowThreads) {
        const int64_t q = q0 + e / DIM;
        tile[e / DIM][e % DIM] = q < n ? load(src, q * DIM + e % DIM) : A(0);
      }
      __syncthreads();
      A vs = 0, gs[DIM];
      for (int d = 0; d < DIM; ++d) gs[d] = 0;
      for (int b = 0; b < nb; ++b) {
        if (same && r.unbiased && q0 + b == me) continue;
        A s = 0;
        for (int d = 0; d < DIM; ++d) s += dist ? (a[d] - tile[b][d]) * (a[d] - tile[b][d]) : a[d] * tile[b][d];
        A k, w;
        mmd::eval<A>(r.kernel, s, c, r.nbw, inv_d, k, w);
        vs += k;
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

// Any D: the kernel weights of a tile of other points in shared memory, then the
// gradient sums coordinate by coordinate into the thread's own float64 row.
template <class S>
__global__ void rows_any(RowCtx r, const S* __restrict__ x, const S* __restrict__ y, Coefs<typename Acc<S>::type> cv,
                         double* rowv, double* gacc) {
  using A = typename Acc<S>::type;
  const A* c = cv.ptr();
  __shared__ A wsh[kTileB][kRowThreads];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  const int64_t total = r.N + r.M;
  const bool live = p < total;
  const int my_side = live && p >= r.N ? 1 : 0;
  const int64_t me = my_side == 0 ? p : p - r.N;
  const S* a = live ? point(x, y, r, my_side, me) : x;
  const A inv_d = A(1) / static_cast<A>(r.D);
  const bool dist = r.kernel != kMmdPolynomial;
  const int64_t D = r.D;
  double* gr = gacc ? gacc + (live ? p : 0) * D : nullptr;
  if (gr && live)
    for (int64_t d = 0; d < D; ++d) gr[d] = 0.0;
  double value = 0.0;
  for (int side = 0; side < 2; ++side) {
    const int64_t n = side == 0 ? r.N : r.M;
    const bool same = side == my_side;
    const double vw = same ? (my_side == 0 ? r.wx : r.wy) : (my_side == 0 ? r.wc : 0.0);
    const double gw = same ? 2.0 * (my_side == 0 ? r.wx : r.wy) : r.wc;
    for (int64_t q0 = 0; q0 < n; q0 += kTileB) {
      const int64_t nb = n - q0 < kTileB ? n - q0 : kTileB;
      A vs = 0;
      for (int b = 0; b < nb; ++b) {
        A w = 0;
        if (live && !(same && r.unbiased && q0 + b == me)) {
          const S* pb = point(x, y, r, side, q0 + b);
          A s = 0;
          for (int64_t d = 0; d < D; ++d) {
            const A ad = load(a, d), bd = load(pb, d);
            s += dist ? (ad - bd) * (ad - bd) : ad * bd;
          }
          A k;
          mmd::eval<A>(r.kernel, s, c, r.nbw, inv_d, k, w);
          vs += k;
        }
        wsh[b][threadIdx.x] = w;
      }
      value += vw * static_cast<double>(vs);
      if (gr && live) {
        for (int64_t d = 0; d < D; ++d) {
          const A ad = load(a, d);
          A gs = 0;
          for (int b = 0; b < nb; ++b) {
            const A bd = load(point(x, y, r, side, q0 + b), d);
            gs += wsh[b][threadIdx.x] * (dist ? ad - bd : bd);
          }
          gr[d] += gw * static_cast<double>(gs);
        }
      }
    }
  }
  if (live) rowv[p] = value;
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
__global__ void linear_pairs(RowCtx r, const S* __restrict__ x, const S* __restrict__ y,
                             Coefs<typename Acc<S>::type> cv, double* rowv, S* gx, S* gy) {
  using A = typename Acc<S>::type;
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
  using A = typename Acc<S>::type;
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
  // One allocation: coefficients, row values, float64 gradient rows (generic path).
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
  const size_t bytes = cbytes + sizeof(double) * (rows + nacc);
  const Scratch scratch(bytes, stream);
  char* buf = scratch.as<char>();
  double* rowv = reinterpret_cast<double*>(buf + cbytes);
  double* gacc = nacc ? rowv + rows : nullptr;
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
        rows_any<S><<<blocks, kRowThreads, 0, stream>>>(r, x, y, c, rowv, gacc);
        if (gacc) {
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
