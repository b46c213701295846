// ot_cpu.cpp — CPU kernels of optimal transport (sinkhorn_divergence, ot_coupling); one build per
// instruction set (GENLOSS_ISA names it), as mmd_cpu.cpp.
//
// Sinkhorn: the step-by-step twin of genloss.reference.metrics.sinkhorn_loop (MET.21, MET.22).
// The N x M cost matrix is never stored: every softmin recomputes C on the fly for a tile of
// kRows rows against a block of kCols columns (differences, not the |a|^2 + |b|^2 - 2 a.b
// expansion, so near pairs keep their digits) and folds it into a streaming log-sum-exp per row.
// Memory beyond the inputs: their transposes and the potentials, O((N + M) D). Rows are
// independent, so the result is the same bits for any thread count.
// The soft-min's inner loops: for D <= 3 one fused pass per tile computes the scores and their
// row maxima (scores_fixed), then one vectorised exp pass per row; blocks whose scores all lie
// more than 708 under the row's running maximum add exact zeros and are skipped.
// Assignment: the shortest-augmenting-path Hungarian algorithm with row and column potentials
// (Crouse's form of Jonker-Volgenant, scipy's), on the float64 B x B cost, its column scan
// branch-free and vectorised.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_config.h"
#include "genloss/ot.h"
#include "isa.h"

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

namespace {

constexpr int64_t kRows = 4;    // rows sharing each load of a column block
constexpr int64_t kCols = 512;  // columns per block: kRows x kCols doubles stay in L1
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kScanBlock = 64;  // columns per block of the assignment's least-slack scan

// e^x in float64 for x <= 709, inline so the column loops vectorise (libm's exp is a call):
// x = n ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by its Taylor series to r^13 (truncation
// < 1e-17 relative), 2^n from the exponent bits. 0 below -708 (the select discards the
// garbage of those lanes); NaN stays NaN.
inline double exp_f64(double x) {
  constexpr double kMagic = 6755399441055744.0 + 1023.0;  // 1.5 2^52 + bias: low bits hold n + 1023
  const double nf = x * 1.4426950408889634 + kMagic;
  const double n = nf - kMagic;
  double r = x - n * 0.6931471805598903;  // ln 2, high part (exact times n)
  r = r - n * 5.497923018708371e-14;      // ln 2, low part
  double q = 1.0 / 6227020800.0;          // 1/13!
  q = madd(q, r, 1.0 / 479001600.0);
  q = madd(q, r, 1.0 / 39916800.0);
  q = madd(q, r, 1.0 / 3628800.0);
  q = madd(q, r, 1.0 / 362880.0);
  q = madd(q, r, 1.0 / 40320.0);
  q = madd(q, r, 1.0 / 5040.0);
  q = madd(q, r, 1.0 / 720.0);
  q = madd(q, r, 1.0 / 120.0);
  q = madd(q, r, 1.0 / 24.0);
  q = madd(q, r, 1.0 / 6.0);
  q = madd(q, r, 0.5);
  q = madd(q, r, 1.0);
  q = madd(q, r, 1.0);
  const double scale = __builtin_bit_cast(double, __builtin_bit_cast(uint64_t, nf) << 52);
  return x < -708.0 ? 0.0 : q * scale;
}

// One point cloud: its rows (n, D) and their transpose (D, n) for the column loops.
struct Cloud {
  const double* rows;
  std::vector<double> t;
  int64_t n;
};

Cloud make_cloud(const double* rows, int64_t n, int64_t D) {
  Cloud c{rows, std::vector<double>(static_cast<size_t>(n * D)), n};
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) c.t[d * n + i] = rows[i * D + d];
  return c;
}

// buf[r][j] = |a_{i0+r} - b_{j0+j}|^2, r < rn, j < jn, by differences.
void sqdist_block(const Cloud& A, const Cloud& B, int64_t D, int64_t i0, int64_t rn, int64_t j0, int64_t jn,
                  double (*buf)[kCols]) {
  for (int64_t r = 0; r < rn; ++r) std::fill(buf[r], buf[r] + jn, 0.0);
  for (int64_t d = 0; d < D; ++d) {
    const double* bt = B.t.data() + d * B.n + j0;
    for (int64_t r = 0; r < rn; ++r) {
      const double ad = A.rows[(i0 + r) * D + d];
      double* row = buf[r];
#pragma omp simd
      for (int64_t j = 0; j < jn; ++j) {
        const double t = ad - bt[j];
        row[j] += t * t;
      }
    }
  }
}

// C = r^p / p from r2 = r^2; p == 2 and p == 1 without pow.  (MET.20)
inline double cost_of(double r2, double p) {
  return p == 2.0 ? 0.5 * r2 : p == 1.0 ? std::sqrt(r2) : std::pow(r2, 0.5 * p) / p;
}

void costs(double* row, int64_t jn, double p) {
  if (p == 2.0) {
#pragma omp simd
    for (int64_t j = 0; j < jn; ++j) row[j] *= 0.5;
  } else {
    for (int64_t j = 0; j < jn; ++j) row[j] = cost_of(row[j], p);
  }
}

bool parallel(int64_t n, int64_t m, int64_t D) {
  return n * m * D >= kParallelMin;
}

// buf[r][j] = h_j - C(a_{i0+r}, b_{j0+j}) / e for a whole tile (kRows rows), in one pass over the
// columns, for a dimension DD and a power P (2 or 1: no pow) known at compile time: the column's
// coordinates and h_j are loaded once for the kRows rows, and each row's maximum is taken in the
// same pass. The same operations in the same order as sqdist_block + costs, so the same bits.
// Returns the row maxima in bmax.  (MET.20, MET.21)
template <int DD, int P>
void scores_fixed(const Cloud& A, const Cloud& B, int64_t i0, int64_t j0, int64_t jn, double inv_e, const double* h,
                  double (*buf)[kCols], double* bmax) {
  static_assert(kRows == 4, "the four row maxima below");
  double a[kRows][DD];
  for (int r = 0; r < kRows; ++r)
    for (int d = 0; d < DD; ++d) a[r][d] = A.rows[(i0 + r) * DD + d];
  const double* bt[DD];
  for (int d = 0; d < DD; ++d) bt[d] = B.t.data() + d * B.n + j0;
  const double* hj = h + j0;
  double m0 = -kInf, m1 = -kInf, m2 = -kInf, m3 = -kInf;
#pragma omp simd reduction(max : m0, m1, m2, m3)
  for (int64_t j = 0; j < jn; ++j) {
    double v[kRows];
    for (int r = 0; r < kRows; ++r) {
      double s = 0.0;
      for (int d = 0; d < DD; ++d) {
        const double t = a[r][d] - bt[d][j];
        s += t * t;
      }
      v[r] = hj[j] - (P == 2 ? 0.5 * s : std::sqrt(s)) * inv_e;
      buf[r][j] = v[r];
    }
    m0 = std::max(m0, v[0]);
    m1 = std::max(m1, v[1]);
    m2 = std::max(m2, v[2]);
    m3 = std::max(m3, v[3]);
  }
  bmax[0] = m0, bmax[1] = m1, bmax[2] = m2, bmax[3] = m3;
}

using ScoresFn = void (*)(const Cloud&, const Cloud&, int64_t, int64_t, int64_t, double, const double*,
                          double (*)[kCols], double*);

// The fused pass for D <= 3 and p in {1, 2} (point clouds in the plane and in space), else null.
ScoresFn fixed_scores(int64_t D, double p) {
  static constexpr ScoresFn table[3][2] = {{scores_fixed<1, 1>, scores_fixed<1, 2>},
                                           {scores_fixed<2, 1>, scores_fixed<2, 2>},
                                           {scores_fixed<3, 1>, scores_fixed<3, 2>}};
  if (D < 1 || D > 3 || (p != 1.0 && p != 2.0)) return nullptr;
  return table[D - 1][p == 2.0 ? 1 : 0];
}

// The general pass: squared distances by sqdist_block, then the costs, the scores and the maxima.
void scores_general(const Cloud& A, const Cloud& B, int64_t D, double p, int64_t i0, int64_t rn, int64_t j0, int64_t jn,
                    double inv_e, const double* h, double (*buf)[kCols], double* bmax) {
  sqdist_block(A, B, D, i0, rn, j0, jn, buf);
  for (int64_t r = 0; r < rn; ++r) {
    double* v = buf[r];
    costs(v, jn, p);
    double bm = -kInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < jn; ++j) {
      v[j] = h[j0 + j] - v[j] * inv_e;
      bm = std::max(bm, v[j]);
    }
    bmax[r] = bm;
  }
}

// Below this, e^(v - max) is exactly 0 in exp_f64: a block whose scores all lie this far under
// the row's running maximum adds nothing, and its exponentials are skipped (the same bits).
constexpr double kExpZero = -708.0;

// out_i = -e log sum_j exp(h_j - C(a_i, b_j) / e), one streaming log-sum-exp per row.  (MET.21)
void softmin(const Cloud& A, const Cloud& B, int64_t D, double p, double e, const double* h, double* out) {
  const int64_t n = A.n, m = B.n, tiles = (n + kRows - 1) / kRows;
  const double inv_e = 1.0 / e;
  const ScoresFn fixed = fixed_scores(D, p);
#pragma omp parallel for schedule(static) num_threads(threads()) if (parallel(n, m, D))
  for (int64_t tile = 0; tile < tiles; ++tile) {
    alignas(64) double buf[kRows][kCols];
    const int64_t i0 = tile * kRows, rn = std::min(kRows, n - i0);
    double mx[kRows], sm[kRows], bmax[kRows];
    for (int64_t r = 0; r < rn; ++r) mx[r] = -kInf, sm[r] = 0.0;
    for (int64_t j0 = 0; j0 < m; j0 += kCols) {
      const int64_t jn = std::min(kCols, m - j0);
      if (fixed && rn == kRows)
        fixed(A, B, i0, j0, jn, inv_e, h, buf, bmax);
      else
        scores_general(A, B, D, p, i0, rn, j0, jn, inv_e, h, buf, bmax);
      for (int64_t r = 0; r < rn; ++r) {
        const double bm = bmax[r];
        if (bm > mx[r]) {  // rescale the running sum to the new maximum
          sm[r] = mx[r] == -kInf ? 0.0 : sm[r] * std::exp(mx[r] - bm);
          mx[r] = bm;
        }
        const double top = mx[r];
        if (bm - top < kExpZero) continue;  // every term 0 (NaN is not skipped)
        const double* v = buf[r];
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < jn; ++j) s += exp_f64(v[j] - top);
        sm[r] += s;
      }
    }
    for (int64_t r = 0; r < rn; ++r) out[i0 + r] = -e * (mx[r] + std::log(sm[r]));
  }
}

// out_i += coef sum_j P_ij |a_i - b_j|^{p-2} (a_i - b_j),
// P_ij = exp(la + lb + (f_i + g_j - C_ij) / e), 0 where a_i == b_j.  (MET.24)
void transport_grad(const Cloud& A, const Cloud& B, int64_t D, double p, double e, const double* f, const double* g,
                    double la, double lb, double coef, double* out) {
  const int64_t n = A.n, m = B.n, tiles = (n + kRows - 1) / kRows;
  const double inv_e = 1.0 / e;
#pragma omp parallel for schedule(static) num_threads(threads()) if (parallel(n, m, D))
  for (int64_t tile = 0; tile < tiles; ++tile) {
    alignas(64) double buf[kRows][kCols];
    const int64_t i0 = tile * kRows, rn = std::min(kRows, n - i0);
    for (int64_t j0 = 0; j0 < m; j0 += kCols) {
      const int64_t jn = std::min(kCols, m - j0);
      sqdist_block(A, B, D, i0, rn, j0, jn, buf);
      for (int64_t r = 0; r < rn; ++r) {
        double* w = buf[r];
        const double base = la + lb + f[i0 + r] * inv_e;
        for (int64_t j = 0; j < jn; ++j) {
          const double r2 = w[j];
          const double plan = exp_f64(base + (g[j0 + j] - cost_of(r2, p)) * inv_e);
          w[j] = p == 2.0 ? plan : r2 > 0.0 ? plan * std::pow(r2, 0.5 * p - 1.0) : 0.0;
        }
        const double* ar = A.rows + (i0 + r) * D;
        for (int64_t d = 0; d < D; ++d) {
          const double* bt = B.t.data() + d * m + j0;
          const double ad = ar[d];
          double s = 0.0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < jn; ++j) s += w[j] * (ad - bt[j]);  // differences: no cancellation
          out[(i0 + r) * D + d] += coef * s;
        }
      }
    }
  }
}

double max_change(const std::vector<double>& a, const std::vector<double>& b) {
  double c = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    c = d > c || std::isnan(d) ? d : c;  // NaN propagates (stops the loop)
  }
  return c;
}

}  // namespace

void sinkhorn(const SinkhornArgs& a) {
  const int64_t N = a.N, M = a.M, D = a.D;
  const Cloud X = make_cloud(a.x, N, D), Y = make_cloud(a.y, M, D);
  const double la = -std::log(double(N)), lb = -std::log(double(M));
  using Vec = std::vector<double>;
  Vec f(N), g(M), fa(N), gb(M), ft(N), gt(M), hx(N), hy(M);
  // h = log w + potential / e: the column weights of a softmin
  auto logw = [](Vec& h, double lw, const Vec* pot, double e) {
    for (size_t i = 0; i < h.size(); ++i) h[i] = lw + (pot ? (*pot)[i] / e : 0.0);
  };
  auto avg = [](Vec& v, const Vec& t) {
    for (size_t i = 0; i < v.size(); ++i) v[i] = 0.5 * (v[i] + t[i]);
  };
  double e = a.eps[0];
  logw(hy, lb, nullptr, e);
  logw(hx, la, nullptr, e);
  softmin(X, Y, D, a.p, e, hy.data(), f.data());
  softmin(Y, X, D, a.p, e, hx.data(), g.data());
  if (a.debias) {
    softmin(X, X, D, a.p, e, hx.data(), fa.data());
    softmin(Y, Y, D, a.p, e, hy.data(), gb.data());
  }
  for (int64_t k = 0; k + 1 < a.n_eps; ++k) {  // (MET.22) one averaged step per annealing scale
    e = a.eps[k];
    logw(hy, lb, &g, e);
    logw(hx, la, &f, e);
    softmin(X, Y, D, a.p, e, hy.data(), ft.data());
    softmin(Y, X, D, a.p, e, hx.data(), gt.data());
    avg(f, ft);
    avg(g, gt);
    if (a.debias) {
      logw(hx, la, &fa, e);
      logw(hy, lb, &gb, e);
      softmin(X, X, D, a.p, e, hx.data(), ft.data());
      softmin(Y, Y, D, a.p, e, hy.data(), gt.data());
      avg(fa, ft);
      avg(gb, gt);
    }
  }
  e = a.eps[a.n_eps - 1];
  int64_t rounds = 0;
  double last_change = 0.0;
  bool self_done = !a.debias;
  while (rounds < a.max_iter) {  // (MET.21) alternating x-y updates, averaged self updates
    ++rounds;
    logw(hy, lb, &g, e);
    softmin(X, Y, D, a.p, e, hy.data(), ft.data());
    logw(hx, la, &ft, e);
    softmin(Y, X, D, a.p, e, hx.data(), gt.data());
    const double change = std::max(max_change(ft, f), max_change(gt, g));
    last_change = change;
    f.swap(ft);
    g.swap(gt);
    if (!self_done) {  // the self problems converge at rate <= 1/2: usually first, then left alone
      logw(hx, la, &fa, e);
      logw(hy, lb, &gb, e);
      softmin(X, X, D, a.p, e, hx.data(), ft.data());
      softmin(Y, Y, D, a.p, e, hy.data(), gt.data());
      self_done = !(std::max(max_change(ft, fa), max_change(gt, gb)) > a.tol * e);
      avg(fa, ft);
      avg(gb, gt);
    }
    if (!(change > a.tol * e) && self_done) break;  // NaN stops too
  }
  if (a.rounds) *a.rounds = rounds;
  if (a.change) *a.change = last_change;
  double value = 0.0;
  for (int64_t i = 0; i < N; ++i) value += f[i] / double(N);
  for (int64_t j = 0; j < M; ++j) value += g[j] / double(M);
  if (a.debias) {  // GeomLoss's final plain step of the self potentials, then (MET.23)
    logw(hx, la, &fa, e);
    logw(hy, lb, &gb, e);
    softmin(X, X, D, a.p, e, hx.data(), ft.data());
    softmin(Y, Y, D, a.p, e, hy.data(), gt.data());
    fa.swap(ft);
    gb.swap(gt);
    for (int64_t i = 0; i < N; ++i) value -= fa[i] / double(N);
    for (int64_t j = 0; j < M; ++j) value -= gb[j] / double(M);
  }
  *a.value = value;
  if (a.f) std::copy(f.begin(), f.end(), a.f);
  if (a.g) std::copy(g.begin(), g.end(), a.g);
  if (a.grad_x) {  // (MET.24) envelope theorem: the plans of the converged potentials
    std::fill(a.grad_x, a.grad_x + N * D, 0.0);
    transport_grad(X, Y, D, a.p, e, f.data(), g.data(), la, lb, 1.0, a.grad_x);
    if (a.debias) transport_grad(X, X, D, a.p, e, fa.data(), fa.data(), la, la, -1.0, a.grad_x);
  }
  if (a.grad_y) {
    std::fill(a.grad_y, a.grad_y + M * D, 0.0);
    transport_grad(Y, X, D, a.p, e, g.data(), f.data(), lb, la, 1.0, a.grad_y);
    if (a.debias) transport_grad(Y, Y, D, a.p, e, gb.data(), gb.data(), lb, lb, -1.0, a.grad_y);
  }
}

// Shortest augmenting paths (Crouse 2016's form of Jonker-Volgenant, scipy's algorithm) with
// row and column potentials u, v: row `cur` joins the matching by a Dijkstra search over the
// reduced costs C_ij - u_i - v_j >= 0, the duals of the scanned rows and columns are updated
// once at the end of the search, then the path is flipped. Each search step scans every column
// in one branch-free pass (scanned columns masked, not removed), so the compiler vectorises it;
// the column of least slack is the first one (lowest index) of the first block holding the
// minimum: ties go to the lowest column, the same every call.  (MET.26, MET.32)
void assignment(const AssignArgs& args) {
  const double *x0 = args.x0, *x1 = args.x1;
  const int64_t B = args.B, D = args.D;
  int64_t* perm = args.perm;
  const size_t nb = static_cast<size_t>(B);
  std::vector<double> cost(nb * nb), x1t(nb * static_cast<size_t>(D));
  for (int64_t j = 0; j < B; ++j)
    for (int64_t d = 0; d < D; ++d) x1t[d * B + j] = x1[j * D + d];
  for (int64_t i = 0; i < B; ++i) {  // |x0_i - x1_j|^2 by differences, summed over d in order
    double* row = cost.data() + i * B;
    std::fill(row, row + B, 0.0);
    for (int64_t d = 0; d < D; ++d) {
      const double a = x0[i * D + d];
      const double* bt = x1t.data() + d * B;
#pragma omp simd
      for (int64_t j = 0; j < B; ++j) {
        const double t = a - bt[j];
        row[j] += t * t;
      }
    }
  }
  std::vector<double> u(nb, 0.0), v(nb, 0.0), spc(nb), fin(nb);
  std::vector<int64_t> path(nb, 0), row4col(nb, -1), col4row(nb, -1), rows, cols;
  rows.reserve(nb);
  cols.reserve(nb);
  for (int64_t cur = 0; cur < B; ++cur) {
    // spc: the shortest path length to each column so far; -inf once the column is scanned
    // (its length is then final, kept in fin), so that no later row improves it
    std::fill(spc.begin(), spc.end(), kInf);
    rows.clear();
    cols.clear();
    int64_t i = cur, sink = -1;
    double minval = 0.0;
    while (sink < 0) {
      rows.push_back(i);
      const double base = minval - u[i];
      const double* crow = cost.data() + i * B;
      double* sp = spc.data();
      const double* vv = v.data();
      int64_t* pa = path.data();
      double lowest = kInf;
      int64_t jb = -1;
      for (int64_t j0 = 0; j0 < B; j0 += kScanBlock) {
        const int64_t j1 = std::min(B, j0 + kScanBlock);
        double bm = kInf;
#pragma omp simd reduction(min : bm)
        for (int64_t j = j0; j < j1; ++j) {
          const double r = base + crow[j] - vv[j];
          const double s = sp[j];
          const bool better = r < s;
          sp[j] = better ? r : s;
          pa[j] = better ? i : pa[j];
          bm = std::min(bm, s == -kInf ? kInf : (better ? r : s));
        }
        if (bm < lowest) lowest = bm, jb = j0;  // strict: the first block holding the minimum
      }
      int64_t j = -1;
      if (jb >= 0) {
        for (int64_t k = jb; k < std::min(B, jb + kScanBlock); ++k)
          if (spc[k] == lowest) {
            j = k;
            break;
          }
      } else {  // no finite slack (costs overflowed to inf): take the first unscanned column
        for (int64_t k = 0; k < B && j < 0; ++k)
          if (spc[k] != -kInf) j = k;
        lowest = spc[j];
      }
      minval = lowest;
      fin[j] = lowest;
      spc[j] = -kInf;
      cols.push_back(j);
      if (row4col[j] < 0)
        sink = j;
      else
        i = row4col[j];
    }
    u[cur] += minval;  // the dual update of the scanned rows and columns, once per search  (MET.32)
    for (size_t k = 1; k < rows.size(); ++k) u[rows[k]] += minval - fin[col4row[rows[k]]];
    for (const int64_t j : cols) v[j] -= minval - fin[j];
    for (int64_t j = sink;;) {  // flip the augmenting path back to row cur
      const int64_t r = path[j];
      row4col[j] = r;
      std::swap(col4row[r], j);
      if (r == cur) break;
    }
  }
  std::copy(col4row.begin(), col4row.end(), perm);
}

}  // namespace GENLOSS_ISA
}  // namespace cpu
}  // namespace genloss
