// knn_cpu.cpp — CPU kernels of the tiled k-nearest-neighbour kernel of prdc; one build per instruction set
// (GENLOSS_ISA names it), as mmd_cpu.cpp.
//
// Two passes over tiles of kTI rows x kTJ columns, the N x M distance matrix never stored:
//  1. radii (MET.10): for each point, a running sorted list of its k+1 smallest squared distances within
//     its own set (the self distance, exactly 0, is one of them, as in the prdc package), kept per row
//     block; the (k+1)-th is the squared radius. Memory O(threads * kTI * k) beyond the 2 radius arrays.
//  2. counts (MET.11-MET.13): every (real, fake) pair once, d2 <= r2 decides membership; per-thread
//     byte flags for the fakes, integer totals for the rest.
// Work units are row blocks (a thread owns its rows' lists), and everything kept is an order statistic
// or an integer count: the result is the same bits for any thread count without a fixed reduction order.
// A column tile is transposed into a D x kTJ float64 buffer so the inner loop runs lanes over columns,
// and d2 is summed over d in order, t = double(a_d) - double(b_d), acc += t * t (no FMA contraction:
// -ffp-contract=off): the exact differences give self distances of exactly 0 and make every d2
// reproducible by a NumPy loop over d (knn.h).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_config.h"
#include "genloss/common.h"
#include "knn.h"

#ifndef GENLOSS_ISA
#error "GENLOSS_ISA must name the instruction set of this translation unit"
#endif

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

namespace {

constexpr int64_t kTI = 64;   // rows per work unit
constexpr int64_t kTJ = 256;  // columns per tile: a D x kTJ float64 column tile stays in L2 for D <= 128
constexpr int kRB = 4;        // register block: kRB rows x kCB columns of accumulators
constexpr int kCB = 8;

int64_t round_up(int64_t a, int64_t b) {
  return (a + b - 1) / b * b;
}

// Columns [j0, j0 + nc) of Y as float64, transposed: colT[d * kTJ + q]; padding columns are 0 (their
// distances are computed and ignored, so the register block never needs a remainder in q).
template <class T>
void load_columns(const T* Y, int64_t j0, int64_t nc, int64_t D, double* colT) {
  const int64_t ncp = round_up(nc, kCB);
  for (int64_t q = 0; q < nc; ++q) {
    const T* y = Y + (j0 + q) * D;
    for (int64_t d = 0; d < D; ++d) colT[d * kTJ + q] = static_cast<double>(y[d]);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t q = nc; q < ncp; ++q) colT[d * kTJ + q] = 0.0;
}

// d2 of R rows starting at X row i against kCB columns of the tile starting at q0.
template <class T, int R>
void block(const T* X, int64_t i, int64_t D, const double* colT, int64_t q0, double* d2) {
  double acc[R][kCB] = {};
  for (int64_t d = 0; d < D; ++d) {
    const double* c = colT + d * kTJ + q0;
    for (int r = 0; r < R; ++r) {
      const double xv = static_cast<double>(X[(i + r) * D + d]);
#pragma omp simd
      for (int q = 0; q < kCB; ++q) {
        const double t = xv - c[q];
        acc[r][q] += t * t;  // (MET.10) in d order; mul then add, never fused
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kCB; ++q) d2[r * kTJ + q0 + q] = acc[r][q];
}

// For the rows [i0, i0 + ni) of X: every column tile of Y in order, visit(j0, nc, d2) with d2 the
// ni x kTJ tile of squared distances (row stride kTJ).
template <class T, class Visit>
void row_block(const T* X, int64_t i0, int64_t ni, const T* Y, int64_t m, int64_t D, double* colT, double* d2,
               Visit&& visit) {
  for (int64_t j0 = 0; j0 < m; j0 += kTJ) {
    const int64_t nc = std::min(kTJ, m - j0), ncp = round_up(nc, kCB);
    load_columns(Y, j0, nc, D, colT);
    int64_t r = 0;
    for (; r + kRB <= ni; r += kRB)
      for (int64_t q = 0; q < ncp; q += kCB) block<T, kRB>(X, i0 + r, D, colT, q, d2 + r * kTJ);
    for (; r < ni; ++r)
      for (int64_t q = 0; q < ncp; q += kCB) block<T, 1>(X, i0 + r, D, colT, q, d2 + r * kTJ);
    visit(j0, nc, d2);
  }
}

bool parallel(int64_t n, int64_t m, int64_t D) {
  return static_cast<double>(n) * static_cast<double>(m) * static_cast<double>(D) >= 65536.0;
}

// (MET.10) r2[i] = the (k+1)-th smallest d2(x_i, x_j) over all j, self included.
template <class T>
void radii(const T* X, int64_t n, int64_t D, int64_t k, double* r2) {
  const int64_t kk = k + 1;
  const int64_t blocks = (n + kTI - 1) / kTI;
#pragma omp parallel num_threads(threads()) if (parallel(n, n, D))
  {
    std::vector<double> colT(D * kTJ), d2(kTI * kTJ), best(kTI * kk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kTI, ni = std::min(kTI, n - i0);
      std::fill(best.begin(), best.end(), std::numeric_limits<double>::infinity());
      row_block(X, i0, ni, X, n, D, colT.data(), d2.data(), [&](int64_t, int64_t nc, const double* t) {
        for (int64_t r = 0; r < ni; ++r) {
          double* L = best.data() + r * kk;  // ascending; L[kk - 1] the current (k+1)-th smallest
          const double* row = t + r * kTJ;
          for (int64_t q = 0; q < nc; ++q) {
            const double v = row[q];
            if (!(v < L[kk - 1])) continue;  // equal values leave the order statistic unchanged
            int64_t p = kk - 1;
            for (; p > 0 && L[p - 1] > v; --p) L[p] = L[p - 1];
            L[p] = v;
          }
        }
      });
      for (int64_t r = 0; r < ni; ++r) r2[i0 + r] = best[r * kk + kk - 1];
    }
  }
}

// (MET.11-MET.13) counts[0] = #{j: some i with d2(f_j, r_i) <= rr2_i}, counts[1] = #{i: some j with
// d2(r_i, f_j) <= fr2_j}, counts[2] = #{(i, j): d2 <= rr2_i}, counts[3] = #{i: some j with d2 <= rr2_i}.
template <class T>
void counts(const T* Rl, int64_t n, const T* F, int64_t m, int64_t D, const double* rr2, const double* fr2,
            int64_t* out) {
  const int64_t blocks = (n + kTI - 1) / kTI;
  std::vector<unsigned char> fake_hit(m, 0);
  int64_t recall = 0, pairs = 0, coverage = 0;
#pragma omp parallel num_threads(threads()) if (parallel(n, m, D))
  {
    std::vector<double> colT(D * kTJ), d2(kTI * kTJ);
    std::vector<unsigned char> hit(m, 0), recalled(kTI), covered(kTI);
    int64_t rc = 0, pr = 0, cv = 0;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kTI, ni = std::min(kTI, n - i0);
      std::fill(recalled.begin(), recalled.end(), 0);
      std::fill(covered.begin(), covered.end(), 0);
      row_block(Rl, i0, ni, F, m, D, colT.data(), d2.data(), [&](int64_t j0, int64_t nc, const double* t) {
        for (int64_t r = 0; r < ni; ++r) {
          const double rad = rr2[i0 + r];
          const double* row = t + r * kTJ;
          int64_t c = 0;
          unsigned char rec = 0;
          for (int64_t q = 0; q < nc; ++q) {
            const unsigned char in_real = row[q] <= rad;  // (MET.11) the <= tie rule
            hit[j0 + q] |= in_real;
            c += in_real;
            rec |= static_cast<unsigned char>(row[q] <= fr2[j0 + q]);
          }
          pr += c;
          covered[r] |= static_cast<unsigned char>(c > 0);
          recalled[r] |= rec;
        }
      });
      for (int64_t r = 0; r < ni; ++r) {
        rc += recalled[r];
        cv += covered[r];
      }
    }
#pragma omp critical
    {  // integer sums and ORs: the same for any thread count and merge order
      recall += rc;
      pairs += pr;
      coverage += cv;
      for (int64_t j = 0; j < m; ++j) fake_hit[j] |= hit[j];
    }
  }
  int64_t precision = 0;
  for (int64_t j = 0; j < m; ++j) precision += fake_hit[j];
  out[0] = precision;
  out[1] = recall;
  out[2] = pairs;
  out[3] = coverage;
}

template <class T>
void run(const KnnArgs& a) {
  const T* real = static_cast<const T*>(a.real);
  const T* fake = static_cast<const T*>(a.fake);
  radii(real, a.N, a.D, a.k, a.real_r2);
  radii(fake, a.M, a.D, a.k, a.fake_r2);
  counts(real, a.N, fake, a.M, a.D, a.real_r2, a.fake_r2, a.counts);
}

}  // namespace

void knn_prdc(const KnnArgs& a) {
  if (a.dtype == kFloat64)
    run<double>(a);
  else
    run<float>(a);
}

}  // namespace GENLOSS_ISA
}  // namespace cpu
}  // namespace genloss
