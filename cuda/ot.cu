// ot.cu — optimal transport on CUDA: the Sinkhorn loop of sinkhorn_divergence and the exact
// assignment of ot_coupling (float64 only, as the CPU kernels in cpp/src/ot_cpu.cpp).
//
// Assignment (MET.26): the CPU's shortest-augmenting-path solver, ported to ONE thread block so
// that it runs in two launches (the cost matrix, then the solver), with no host synchronisation
// (CUDA-graph capturable). The B x B cost |x0_i - x1_j|^2 is computed as the CPU computes it
// (differences summed over d in order, __dsub_rn/__dmul_rn/__dadd_rn: never contracted into an
// FMA; the CPU objects build with -ffp-contract=off), so it is the same bits. The searches then
// run one after the other as on the CPU; within a Dijkstra step the elementwise update of every
// column (the reduced cost (minval - u_i) + C_ij - v_j, the comparison with the column's
// shortest path, the path entry) is spread over the threads, each the same float64 operation as
// on the CPU, and the column of least slack is a block reduction of (value, column) pairs under
// the lexicographic order: the smallest value, ties to the LOWEST column, which is exactly what
// the CPU's scan finds (a strict < over ascending columns keeps the first minimum). That order
// is total and the reduction tree is fixed, so the result does not depend on the thread count or
// the schedule. Everything after the choice (the path bookkeeping, the dual updates of the
// scanned rows and columns, each element updated once by the same expression, and the path
// flip) is the CPU's code on the same values. Hence the same permutation, bit for bit of every
// dual on the way. The CPU's fallbacks when no slack is finite (costs overflowed to inf) are
// reproduced too (the first unscanned column; a -inf slack's first -inf entry of its 64-column
// block). A search longer than B steps (possible only with non-finite data, which the Python
// layer refuses unless its checks are off) is abandoned: that row keeps -1 instead of looping.
//
// Sinkhorn (MET.20-MET.24): the CPU's sequence of updates (annealing steps, then alternating x-y
// updates and averaged self updates, stopping when no potential moves by more than tol * eps or
// after max_iter rounds, GeomLoss's final self step, the envelope gradients), driven from the
// host. Each softmin is one warp per row of the first cloud: the lanes walk the other cloud's
// points (the cost recomputed on the fly from the differences: O(N + M) memory, never N x M),
// each keeps a streaming log-sum-exp, and the 32 partial (max, sum) pairs are combined by a
// fixed shuffle tree; deterministic, but not the CPU's summation order, so values and gradients
// agree with the CPU to rounding (tests/tolerances.py), not bitwise, and the number of rounds may
// differ by one where the largest change sits at tol * eps. The convergence test reads the two
// largest changes (one 16-byte copy) back to the host once per round: the loop refuses CUDA
// graph capture (as the torch op does). No floating-point atomics anywhere.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "genloss/ot.h"
#include "scratch.cuh"

namespace genloss {
namespace cuda {
namespace {

constexpr int kAssignThreads = 1024;  // the solver's one block
constexpr int kWarps = kAssignThreads / 32;
constexpr int64_t kScanBlock = 64;  // the CPU's column block (its -inf fallback looks inside one)
constexpr int kRowWarps = 8;        // softmin / gradient rows per block (one warp each)
constexpr int kRowThreads = 32 * kRowWarps;
constexpr int kFlatThreads = 256;
constexpr int kSumThreads = 1024;
constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------ assignment (MET.26)

// cost[i * B + j] = sum_d (x0_id - x1_jd)^2, in the CPU's order and rounding.
__global__ void assign_cost(const double* __restrict__ x0, const double* __restrict__ x1, int64_t B, int64_t D,
                            double* __restrict__ cost) {
  const int64_t total = B * B;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / B, j = k - i * B;
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double t = __dsub_rn(x0[i * D + d], x1[j * D + d]);
      s = __dadd_rn(s, __dmul_rn(t, t));
    }
    cost[k] = s;
  }
}

// The least-slack candidate of a step: the smallest value, ties to the lowest column; and the
// lowest column whose shortest path is not -inf (the CPU's "first unscanned" fallback).
struct Pick {
  double val;
  int64_t col;
  int64_t free_col;
};

constexpr int64_t kNone = INT64_MAX;

__device__ __forceinline__ Pick better_of(const Pick& a, const Pick& b) {
  Pick r;
  const bool take_b = b.val < a.val || (b.val == a.val && b.col < a.col);
  r.val = take_b ? b.val : a.val;
  r.col = take_b ? b.col : a.col;
  r.free_col = b.free_col < a.free_col ? b.free_col : a.free_col;
  return r;
}

__device__ __forceinline__ Pick shfl_pick(const Pick& p, int offset) {
  Pick q;
  q.val = __shfl_down_sync(kFull, p.val, offset);
  q.col = __shfl_down_sync(kFull, p.col, offset);
  q.free_col = __shfl_down_sync(kFull, p.free_col, offset);
  return q;
}

struct SolverState {
  int64_t i;      // the row being scanned
  int64_t sink;   // -1: searching; >= 0: the free column reached; -2: abandoned
  int64_t nrows;  // rows of this search (rows[0] = cur)
  int64_t ncols;  // columns scanned by this search
  int64_t steps;  // guard against a search that cannot end (non-finite data only)
  double minval;  // the shortest path length of the last scanned column
};

// The CPU's assignment (cpu::assignment) in one block. Scratch: u, v, spc, fin (B doubles each),
// path, row4col, col4row, rows, cols (B int64 each).
__global__ void __launch_bounds__(kAssignThreads)
    assign_solve(const double* __restrict__ cost, int64_t B, double* u, double* v, double* spc, double* fin,
                 int64_t* path, int64_t* row4col, int64_t* col4row, int64_t* rows, int64_t* cols, int64_t* perm) {
  __shared__ Pick warp_best[kWarps];
  __shared__ SolverState st;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  for (int64_t j = tid; j < B; j += kAssignThreads) {
    u[j] = 0.0;
    v[j] = 0.0;
    path[j] = 0;
    row4col[j] = -1;
    col4row[j] = -1;
  }
  __syncthreads();
  for (int64_t cur = 0; cur < B; ++cur) {
    for (int64_t j = tid; j < B; j += kAssignThreads) spc[j] = inf;
    __syncthreads();  // every thread is done with the previous search's state
    if (tid == 0) st = SolverState{cur, -1, 0, 0, 0, 0.0};
    __syncthreads();
    while (true) {
      const int64_t i = st.i;
      if (tid == 0) rows[st.nrows++] = i;
      // base + C_ij - v_j, left to right, as the CPU: r = base + crow[j] - vv[j]
      const double base = __dsub_rn(st.minval, u[i]);
      const double* crow = cost + i * B;
      Pick mine{inf, kNone, kNone};
      for (int64_t j = tid; j < B; j += kAssignThreads) {  // ascending: strict < keeps the lowest column
        const double r = __dsub_rn(__dadd_rn(base, crow[j]), v[j]);
        const double s = spc[j];
        const bool better = r < s;
        const double now = better ? r : s;
        if (better) {
          spc[j] = r;
          path[j] = i;
        }
        const double m = s == -inf ? inf : now;  // a scanned column never wins
        if (m < mine.val) mine.val = m, mine.col = j;
        if (now != -inf && j < mine.free_col) mine.free_col = j;
      }
      for (int off = 16; off > 0; off >>= 1) mine = better_of(mine, shfl_pick(mine, off));
      if (lane == 0) warp_best[warp] = mine;
      __syncthreads();  // also: every spc / path write of this step is done
      if (warp == 0) {
        Pick p = warp_best[lane];  // kWarps == 32
        for (int off = 16; off > 0; off >>= 1) p = better_of(p, shfl_pick(p, off));
        if (lane == 0) {
          double lowest = p.val;
          int64_t j = -1;
          if (lowest < inf) {  // the CPU: the first block holding the minimum, its first entry equal to it
            j = p.col;
            if (lowest == -inf) {  // a -inf slack: the block's first -inf entry (a scanned one too)
              const int64_t jb = p.col / kScanBlock * kScanBlock;
              for (int64_t k = jb; k < p.col; ++k)
                if (spc[k] == lowest) {
                  j = k;
                  break;
                }
            }
          } else {  // no finite slack: the first unscanned column
            j = p.free_col;
            if (j != kNone) lowest = spc[j];
          }
          if (j == kNone || j < 0 || ++st.steps > B) {  // no column left: non-finite data only
            st.sink = -2;
          } else {
            st.minval = lowest;
            fin[j] = lowest;
            spc[j] = -inf;
            cols[st.ncols++] = j;
            if (row4col[j] < 0)
              st.sink = j;
            else
              st.i = row4col[j];
          }
        }
      }
      __syncthreads();
      if (st.sink != -1) break;
    }
    if (st.sink < 0) continue;  // abandoned (uniform: st is shared and stable here)
    const double minval = st.minval;
    // the dual update of the scanned rows and columns, each element once, the CPU's expressions
    if (tid == 0) u[cur] = __dadd_rn(u[cur], minval);
    for (int64_t k = 1 + tid; k < st.nrows; k += kAssignThreads) {
      const int64_t r = rows[k];
      u[r] = __dadd_rn(u[r], __dsub_rn(minval, fin[col4row[r]]));
    }
    for (int64_t k = tid; k < st.ncols; k += kAssignThreads) {
      const int64_t j = cols[k];
      v[j] = __dsub_rn(v[j], __dsub_rn(minval, fin[j]));
    }
    __syncthreads();
    if (tid == 0) {  // flip the augmenting path back to row cur
      int64_t j = st.sink;
      for (int64_t n = 0; n <= B; ++n) {
        const int64_t r = path[j];
        row4col[j] = r;
        const int64_t t = col4row[r];
        col4row[r] = j;
        j = t;
        if (r == cur || j < 0) break;
      }
    }
    __syncthreads();
  }
  for (int64_t j = tid; j < B; j += kAssignThreads) perm[j] = col4row[j];
}

// ------------------------------------------------------------------ Sinkhorn (MET.20-MET.24)

// C = r^p / p from r2 = r^2, as the CPU's cost_of.  (MET.20)
__device__ __forceinline__ double cost_of(double r2, double p) {
  return p == 2.0 ? 0.5 * r2 : p == 1.0 ? sqrt(r2) : pow(r2, 0.5 * p) / p;
}

__device__ __forceinline__ double sqdist(const double* a, const double* b, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = __dsub_rn(a[d], b[d]);
    s = __dadd_rn(s, __dmul_rn(t, t));
  }
  return s;
}

struct Cloud {
  const double* rows;  // (n, D)
  int64_t n;
};

// out_i = -e log sum_j exp(h_j - C(a_i, b_j) / e), h_j = lw + pot_j / e (lw alone when pot is
// null). One warp per row; lane l takes the columns l, l + 32, ... with a streaming
// log-sum-exp; the lanes' (max, sum) pairs are merged by a fixed shuffle tree.  (MET.21)
__global__ void __launch_bounds__(kRowThreads) softmin_rows(Cloud A, Cloud Bc, int64_t D, double p, double e, double lw,
                                                            const double* __restrict__ pot, double* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (i >= A.n) return;  // whole warps leave together
  const double inv_e = 1.0 / e;
  const double* a = A.rows + i * D;
  double mx = -INFINITY, sm = 0.0;
  for (int64_t j = lane; j < Bc.n; j += 32) {
    const double h = pot ? lw + pot[j] / e : lw;
    const double val = h - cost_of(sqdist(a, Bc.rows + j * D, D), p) * inv_e;
    if (val > mx) {
      sm = (mx == -INFINITY ? 0.0 : sm * exp(mx - val)) + 1.0;
      mx = val;
    } else {
      sm += exp(val - mx);  // NaN propagates
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const double om = __shfl_down_sync(kFull, mx, off), os = __shfl_down_sync(kFull, sm, off);
    const double top = om > mx ? om : mx;
    if (top != -INFINITY) {  // (both -inf: an empty lane pair, nothing to add)
      sm = (mx == -INFINITY ? 0.0 : sm * exp(mx - top)) + (om == -INFINITY ? 0.0 : os * exp(om - top));
      mx = top;
    }
  }
  if (lane == 0) out[i] = -e * (mx + log(sm));
}

// sum_j P_ij |a_i - b_j|^{p-2} (a_i - b_j) accumulated into acc (N, D), then out += coef * acc;
// P_ij = exp(la + lb + (f_i + g_j - C_ij) / e), 0 where a_i == b_j (p != 2). One warp per row: the
// lanes compute the weights of 32 columns at a time (kept in shared memory), then split the
// dimensions, each lane summing its dims over those 32 columns in order.  (MET.24)
__global__ void __launch_bounds__(kRowThreads)
    transport_grad_rows(Cloud A, Cloud Bc, int64_t D, double p, double e, const double* __restrict__ f,
                        const double* __restrict__ g, double la, double lb, double coef, double* __restrict__ acc,
                        double* __restrict__ out) {
  __shared__ double wsh[kRowWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp;
  if (i >= A.n) return;  // whole warps leave together (no block-wide barrier below)
  const double inv_e = 1.0 / e;
  const double* a = A.rows + i * D;
  double* ai = acc + i * D;
  const double base = la + lb + f[i] * inv_e;
  for (int64_t d = lane; d < D; d += 32) ai[d] = 0.0;
  for (int64_t j0 = 0; j0 < Bc.n; j0 += 32) {
    const int64_t j = j0 + lane;
    double w = 0.0;
    if (j < Bc.n) {
      const double r2 = sqdist(a, Bc.rows + j * D, D);
      const double plan = exp(base + (g[j] - cost_of(r2, p)) * inv_e);
      w = p == 2.0 ? plan : r2 > 0.0 ? plan * pow(r2, 0.5 * p - 1.0) : 0.0;
    }
    wsh[warp][lane] = w;
    __syncwarp();
    const int64_t kn = Bc.n - j0 < 32 ? Bc.n - j0 : 32;
    for (int64_t d = lane; d < D; d += 32) {
      const double ad = a[d];
      double s = 0.0;
      for (int64_t k = 0; k < kn; ++k) s += wsh[warp][k] * (ad - Bc.rows[(j0 + k) * D + d]);
      ai[d] += s;
    }
    __syncwarp();
  }
  for (int64_t d = lane; d < D; d += 32) out[i * D + d] += coef * ai[d];
}

__device__ __forceinline__ double max_nan(double c, double d) {  // NaN propagates (stops the loop)
  return d > c || d != d ? d : c;
}

// out = max(max_i |a_i - b_i|, max_j |c_j - d_j|), one block.
__global__ void __launch_bounds__(kSumThreads)
    max_change2(const double* a, const double* b, int64_t n, const double* c, const double* d, int64_t m, double* out) {
  __shared__ double part[kSumThreads / 32];
  double x = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += kSumThreads) x = max_nan(x, fabs(a[k] - b[k]));
  for (int64_t k = threadIdx.x; k < m; k += kSumThreads) x = max_nan(x, fabs(c[k] - d[k]));
  for (int off = 16; off > 0; off >>= 1) x = max_nan(x, __shfl_down_sync(kFull, x, off));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
  __syncthreads();
  if (threadIdx.x < 32) {
    x = part[threadIdx.x];
    for (int off = 16; off > 0; off >>= 1) x = max_nan(x, __shfl_down_sync(kFull, x, off));
    if (threadIdx.x == 0) *out = x;
  }
}

// v = 0.5 (v + t)
__global__ void average(double* v, const double* t, int64_t n) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x)
    v[k] = 0.5 * (v[k] + t[k]);
}

// Fixed-order block sum of (1/n) v over n entries, added with sign to the thread's total.
__device__ double block_mean(const double* v, int64_t n, double* part) {
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += kSumThreads) s += v[k] / double(n);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(kFull, s, off);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x < 32) {
    t = part[threadIdx.x];
    for (int off = 16; off > 0; off >>= 1) t += __shfl_down_sync(kFull, t, off);
  }
  __syncthreads();  // part is reused by the next call
  return t;         // valid in thread 0
}

// value = mean f + mean g (- mean fa - mean gb).  (MET.23)
__global__ void __launch_bounds__(kSumThreads) sinkhorn_value(const double* f, int64_t N, const double* g, int64_t M,
                                                              const double* fa, const double* gb, double* value) {
  __shared__ double part[kSumThreads / 32];
  double s = block_mean(f, N, part);
  s += block_mean(g, M, part);
  if (fa) {
    s -= block_mean(fa, N, part);
    s -= block_mean(gb, M, part);
  }
  if (threadIdx.x == 0) *value = s;
}

__global__ void set_i64(int64_t* p, int64_t v) {
  *p = v;
}

class Sinkhorn {
 public:
  Sinkhorn(const SinkhornArgs& a, cudaStream_t s) : a_(a), s_(s) {}

  void softmin(const Cloud& A, const Cloud& B, double e, double lw, const double* pot, double* out) const {
    softmin_rows<<<grid_exact(A.n, kRowWarps), kRowThreads, 0, s_>>>(A, B, a_.D, a_.p, e, lw, pot, out);
    check_cuda(cudaGetLastError(), "sinkhorn softmin launch");
  }
  void avg(double* v, const double* t, int64_t n) const {
    average<<<grid_blocks(n, kFlatThreads), kFlatThreads, 0, s_>>>(v, t, n);
    check_cuda(cudaGetLastError(), "sinkhorn average launch");
  }
  void change(const double* a, const double* b, int64_t n, const double* c, const double* d, int64_t m,
              double* out) const {
    max_change2<<<1, kSumThreads, 0, s_>>>(a, b, n, c, d, m, out);
    check_cuda(cudaGetLastError(), "sinkhorn change launch");
  }
  void grad(const Cloud& A, const Cloud& B, double e, const double* f, const double* g, double la, double lb,
            double coef, double* acc, double* out) const {
    transport_grad_rows<<<grid_exact(A.n, kRowWarps), kRowThreads, 0, s_>>>(A, B, a_.D, a_.p, e, f, g, la, lb, coef,
                                                                            acc, out);
    check_cuda(cudaGetLastError(), "sinkhorn gradient launch");
  }

 private:
  const SinkhornArgs& a_;
  cudaStream_t s_;
};

}  // namespace

void assignment(const AssignArgs& a, void* stream) {
  const int64_t B = a.B, D = a.D;
  if (B <= 0) return;
  if (D <= 0) throw std::invalid_argument("assignment: D must be >= 1");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const size_t nb = static_cast<size_t>(B);
  Scratch scratch((nb * nb + 4 * nb) * sizeof(double) + 5 * nb * sizeof(int64_t), s);
  double* cost = scratch.as<double>();
  double *u = cost + nb * nb, *v = u + nb, *spc = v + nb, *fin = spc + nb;
  int64_t* path = reinterpret_cast<int64_t*>(fin + nb);
  int64_t *row4col = path + nb, *col4row = row4col + nb, *rows = col4row + nb, *cols = rows + nb;
  assign_cost<<<grid_blocks(B * B, kFlatThreads), kFlatThreads, 0, s>>>(a.x0, a.x1, B, D, cost);
  check_cuda(cudaGetLastError(), "assignment cost launch");
  assign_solve<<<1, kAssignThreads, 0, s>>>(cost, B, u, v, spc, fin, path, row4col, col4row, rows, cols, a.perm);
  check_cuda(cudaGetLastError(), "assignment solver launch");
}

void sinkhorn(const SinkhornArgs& a, void* stream) {
  const int64_t N = a.N, M = a.M, D = a.D;
  if (N <= 0 || M <= 0 || D <= 0 || a.n_eps < 1) throw std::invalid_argument("sinkhorn: empty inputs");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(s, &cap), "sinkhorn capture query");
  if (cap != cudaStreamCaptureStatusNone)
    throw std::invalid_argument(
        "sinkhorn: the iterations stop when the potentials converge (a test read on the host), which CUDA graph "
        "capture forbids");
  const size_t n = static_cast<size_t>(N), m = static_cast<size_t>(M), nm = n > m ? n : m;
  Scratch scratch((3 * n + 3 * m + 2 + nm * static_cast<size_t>(D)) * sizeof(double), s);
  double* f = scratch.as<double>();
  double *fa = f + n, *ft = fa + n, *g = ft + n, *gb = g + m, *gt = gb + m, *chg = gt + m, *acc = chg + 2;
  const Cloud X{a.x, N}, Y{a.y, M};
  const double la = -std::log(double(N)), lb = -std::log(double(M));
  const Sinkhorn k(a, s);
  double e = a.eps[0];
  k.softmin(X, Y, e, lb, nullptr, f);
  k.softmin(Y, X, e, la, nullptr, g);
  if (a.debias) {
    k.softmin(X, X, e, la, nullptr, fa);
    k.softmin(Y, Y, e, lb, nullptr, gb);
  }
  for (int64_t q = 0; q + 1 < a.n_eps; ++q) {  // (MET.22) one averaged step per annealing scale
    e = a.eps[q];
    k.softmin(X, Y, e, lb, g, ft);
    k.softmin(Y, X, e, la, f, gt);
    k.avg(f, ft, N);
    k.avg(g, gt, M);
    if (a.debias) {
      k.softmin(X, X, e, la, fa, ft);
      k.softmin(Y, Y, e, lb, gb, gt);
      k.avg(fa, ft, N);
      k.avg(gb, gt, M);
    }
  }
  e = a.eps[a.n_eps - 1];
  int64_t rounds = 0;
  bool self_done = !a.debias;
  while (rounds < a.max_iter) {  // (MET.21) alternating x-y updates, averaged self updates
    ++rounds;
    k.softmin(X, Y, e, lb, g, ft);
    k.softmin(Y, X, e, la, ft, gt);
    k.change(ft, f, N, gt, g, M, chg);
    std::swap(f, ft);
    std::swap(g, gt);
    const bool self_round = !self_done;
    if (self_round) {
      k.softmin(X, X, e, la, fa, ft);
      k.softmin(Y, Y, e, lb, gb, gt);
      k.change(ft, fa, N, gt, gb, M, chg + 1);
      k.avg(fa, ft, N);
      k.avg(gb, gt, M);
    }
    double host[2] = {0.0, 0.0};  // the round's largest changes: one copy, one wait
    check_cuda(cudaMemcpyAsync(host, chg, (self_round ? 2 : 1) * sizeof(double), cudaMemcpyDeviceToHost, s),
               "sinkhorn change read-back");
    check_cuda(cudaStreamSynchronize(s), "sinkhorn round");
    if (self_round) self_done = !(host[1] > a.tol * e);
    if (!(host[0] > a.tol * e) && self_done) break;  // NaN stops too
  }
  if (a.rounds) {
    set_i64<<<1, 1, 0, s>>>(a.rounds, rounds);
    check_cuda(cudaGetLastError(), "sinkhorn rounds launch");
  }
  if (a.change && rounds > 0)  // chg[0]: the last round's largest x-y change, on the device
    check_cuda(cudaMemcpyAsync(a.change, chg, sizeof(double), cudaMemcpyDeviceToDevice, s), "sinkhorn change copy");
  if (a.debias) {  // GeomLoss's final plain step of the self potentials, then (MET.23)
    k.softmin(X, X, e, la, fa, ft);
    k.softmin(Y, Y, e, lb, gb, gt);
    std::swap(fa, ft);
    std::swap(gb, gt);
  }
  sinkhorn_value<<<1, kSumThreads, 0, s>>>(f, N, g, M, a.debias ? fa : nullptr, a.debias ? gb : nullptr, a.value);
  check_cuda(cudaGetLastError(), "sinkhorn value launch");
  if (a.f) check_cuda(cudaMemcpyAsync(a.f, f, n * sizeof(double), cudaMemcpyDeviceToDevice, s), "sinkhorn f copy");
  if (a.g) check_cuda(cudaMemcpyAsync(a.g, g, m * sizeof(double), cudaMemcpyDeviceToDevice, s), "sinkhorn g copy");
  if (a.grad_x) {  // (MET.24) envelope theorem: the plans of the converged potentials
    check_cuda(cudaMemsetAsync(a.grad_x, 0, n * D * sizeof(double), s), "sinkhorn grad_x fill");
    k.grad(X, Y, e, f, g, la, lb, 1.0, acc, a.grad_x);
    if (a.debias) k.grad(X, X, e, fa, fa, la, la, -1.0, acc, a.grad_x);
  }
  if (a.grad_y) {
    check_cuda(cudaMemsetAsync(a.grad_y, 0, m * D * sizeof(double), s), "sinkhorn grad_y fill");
    k.grad(Y, X, e, g, f, lb, la, 1.0, acc, a.grad_y);
    if (a.debias) k.grad(Y, Y, e, gb, gb, lb, lb, -1.0, acc, a.grad_y);
  }
}

}  // namespace cuda
}  // namespace genloss
