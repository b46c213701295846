// ot_cpu.cpp — CPU kernels of optimal transport (sinkhorn_divergence, ot_coupling); one build per
// instruction set (GENLOSS_ISA names it), as mmd_cpu.cpp.
//
// Sinkhorn: the step-by-step twin of genloss.reference.metrics.sinkhorn_loop (MET.21, MET.22).
// The N x M cost matrix is never stored: every softmin recomputes C on the fly for a tile of
// kRows rows against a block of kCols columns (differences, not the |a|^2 + |b|^2 - 2 a.b
// expansion, so near pairs keep their digits) and folds it into a streaming log-sum-exp per row.
// Memory beyond the inputs: their transposes and the potentials, O((N + M) D). Rows are
// independent, so the result is the same bits for any thread count.
// Assignment: the shortest-augmenting-path Hungarian algorithm with row and column potentials
// (Kuhn-Munkres in the O(B^3) form of Jonker-Volgenant's augmentation), on the float64 B x B cost.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_config.h"
#include "genloss/ot.h"

#ifndef GENLOSS_ISA
#error "GENLOSS_ISA must name the instruction set of this translation unit"
#endif

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

namespace {

constexpr int64_t kRows = 4;    // rows sharing each load of a column block
constexpr int64_t kCols = 512;  // columns per block: kRows x kCols doubles stay in L1
constexpr double kInf = std::numeric_limits<double>::infinity();

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
  q = q * r + 1.0 / 479001600.0;
  q = q * r + 1.0 / 39916800.0;
  q = q * r + 1.0 / 3628800.0;
  q = q * r + 1.0 / 362880.0;
  q = q * r + 1.0 / 40320.0;
  q = q * r + 1.0 / 5040.0;
  q = q * r + 1.0 / 720.0;
  q = q * r + 1.0 / 120.0;
  q = q * r + 1.0 / 24.0;
  q = q * r + 1.0 / 6.0;
  q = q * r + 0.5;
  q = q * r + 1.0;
  q = q * r + 1.0;
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

// out_i = -e log sum_j exp(h_j - C(a_i, b_j) / e), one streaming log-sum-exp per row.  (MET.21)
void softmin(const Cloud& A, const Cloud& B, int64_t D, double p, double e, const double* h, double* out) {
  const int64_t n = A.n, m = B.n, tiles = (n + kRows - 1) / kRows;
  const double inv_e = 1.0 / e;
#pragma omp parallel for schedule(static) num_threads(threads()) if (parallel(n, m, D))
  for (int64_t tile = 0; tile < tiles; ++tile) {
    alignas(64) double buf[kRows][kCols];
    const int64_t i0 = tile * kRows, rn = std::min(kRows, n - i0);
    double mx[kRows], sm[kRows];
    for (int64_t r = 0; r < rn; ++r) mx[r] = -kInf, sm[r] = 0.0;
    for (int64_t j0 = 0; j0 < m; j0 += kCols) {
      const int64_t jn = std::min(kCols, m - j0);
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
        if (bm > mx[r]) {  // rescale the running sum to the new maximum
          sm[r] = mx[r] == -kInf ? 0.0 : sm[r] * std::exp(mx[r] - bm);
          mx[r] = bm;
        }
        const double top = mx[r];
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

void sinkhorn(SinkhornArgs& a) {
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
  a.rounds = 0;
  bool self_done = !a.debias;
  while (a.rounds < a.max_iter) {  // (MET.21) alternating x-y updates, averaged self updates
    ++a.rounds;
    logw(hy, lb, &g, e);
    softmin(X, Y, D, a.p, e, hy.data(), ft.data());
    logw(hx, la, &ft, e);
    softmin(Y, X, D, a.p, e, hx.data(), gt.data());
    const double change = std::max(max_change(ft, f), max_change(gt, g));
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

// Shortest augmenting paths with potentials u (rows), v (columns): row i is added to the
// matching by a Dijkstra-like search over reduced costs C_ij - u_i - v_j >= 0, then the path
// is flipped. Each of the B rows costs O(B^2): O(B^3) in all. Ties in the column of least
// slack go to the lowest index (strict <, columns scanned in increasing order), so the
// result is deterministic.  (MET.26)
void assignment(const double* x0, const double* x1, int64_t B, int64_t D, int64_t* perm) {
  std::vector<double> cost(static_cast<size_t>(B * B));
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < B; ++j) {
      double s = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double t = x0[i * D + d] - x1[j * D + d];
        s += t * t;
      }
      cost[i * B + j] = s;
    }
  // 1-based columns; column 0 is the virtual start of each search.
  std::vector<double> u(B + 1, 0.0), v(B + 1, 0.0), minv(B + 1);
  std::vector<int64_t> match(B + 1, 0), way(B + 1, 0);  // match[j]: the row (1-based) on column j
  std::vector<char> used(B + 1);
  for (int64_t i = 1; i <= B; ++i) {
    match[0] = i;
    int64_t j0 = 0;
    std::fill(minv.begin(), minv.end(), kInf);
    std::fill(used.begin(), used.end(), 0);
    do {
      used[j0] = 1;
      const int64_t i0 = match[j0];
      const double* crow = cost.data() + (i0 - 1) * B;
      double delta = kInf;
      int64_t j1 = 0;
      for (int64_t j = 1; j <= B; ++j) {
        if (used[j]) continue;
        const double cur = crow[j - 1] - u[i0] - v[j];
        if (cur < minv[j]) minv[j] = cur, way[j] = j0;
        if (minv[j] < delta) delta = minv[j], j1 = j;  // strict: the lowest column wins a tie
      }
      for (int64_t j = 0; j <= B; ++j) {
        if (used[j]) {
          u[match[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (match[j0] != 0);
    do {  // flip the augmenting path back to the start
      const int64_t j1 = way[j0];
      match[j0] = match[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  for (int64_t j = 1; j <= B; ++j) perm[match[j] - 1] = j - 1;
}

}  // namespace GENLOSS_ISA
}  // namespace cpu
}  // namespace genloss
