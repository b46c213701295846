// knn_cpu.cpp — CPU kernels of the tiled k-nearest-neighbour kernel of prdc; one build per instruction set
// (GENLOSS_ISA names it), as mmd_cpu.cpp. The math: derivations/metrics.md (MET.10-MET.13, MET.28-MET.31).
//
// The counts and radii are those of the EXACT squared distances d2 of knn.h (float64 sums of squared coordinate
// differences in d order: MET.10), computed at GEMM speed:
//  * bulk (MET.28): each pass centres both sets on one point c (translation leaves d2 unchanged, and centring keeps
//    the norms, hence the rounding, small) and computes the expansion e = (n_x + n_y) - 2 x.y in the input's
//    precision T with a register-blocked R x W micro-kernel (FMA where the ISA has it), as vector_quantize's
//    micro_tile (quant_cpu.cpp, QNT.3). The N x M matrix never exists: a micro-tile is filtered in registers.
//  * bound (MET.29): |e - d2| <= beta_x + beta_y with beta_x = kappa n_x + alpha, kappa = 2((D + 8) u_T +
//    (3D + 8) u_64); a point whose norm is near T's overflow gets beta = NaN, which sends all its pairs to the
//    recheck (every filter below is written so that NaN means "recheck").
//  * exact recheck (MET.30, MET.31): a pair is decided by e only when e is beyond the bound from the radius it is
//    compared with; the others get their exact d2 (the float64 difference formula, bit for bit knn.h's). Pass 1
//    (radii, MET.30) keeps per point the k+1 smallest EXACT d2 seen, and a pair can change a list only if its
//    lower bound e - beta is below that list's current (k+1)-th: only those are rechecked. It uses symmetry
//    (d2(a, b) = d2(b, a) bit for bit): tiles (I, J), J >= I, feed both blocks' lists, half the multiply-adds.
//    Pass 2 (counts, MET.31) decides d2 <= r2 from e where e <= r2 - beta (in) or e > r2 + beta (out), and
//    rechecks the band between.
// So every radius is an exact d2 and every count is the exact computation's: the result equals the float64
// brute force (and the previous all-float64 kernel) bit for bit, including ties and duplicates.
//
// Everything kept is an order statistic (a list is the k+1 smallest exact values whatever order the tiles merge
// in) or an integer count: the result is the same bits for any thread count without a fixed reduction order.
// Memory: N (k+1) + M (k+1) list entries, per pass O(N + M) norms and bounds, per thread one packed row block, one
// packed column tile and a byte per fake.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "cpu_config.h"
#include "genloss/common.h"
#include "isa.h"
#include "knn.h"

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

namespace {

// R x 2 vector accumulators, two panel vectors and a broadcast must fit the vector registers (16 on sse2/avx2, 32 on
// avx512): R = 6 on avx2 spilled an accumulator to the stack (a store-to-load chain in the inner loop).
template <class T>
struct Geo {
  static constexpr int W = 2 * kVecBytes / static_cast<int>(sizeof(T));  // columns per micro-tile: 2 vectors
  static constexpr int R = kVecBytes == 64 ? 8 : 4;                      // rows per micro-tile
  static constexpr int64_t TI = 192;  // rows per work unit (and a radii tile's columns): a multiple of R and W
};

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Columns per tile: a packed D x TJ tile of T stays in L2 (128 KiB), a multiple of W, at most 1024.
template <class T>
int64_t tile_cols(int64_t D) {
  constexpr int64_t W = Geo<T>::W;
  const int64_t fit = (int64_t{131072} / (D * static_cast<int64_t>(sizeof(T)))) / W * W;
  return std::max<int64_t>(W, std::min<int64_t>(1024, fit));
}

bool parallel(int64_t n, int64_t m, int64_t D) {
  return static_cast<double>(n) * static_cast<double>(m) * static_cast<double>(D) >= 65536.0;
}

// (MET.10) the exact squared distance: float64 differences, squares added in d order from 0 (knn.h).
template <class T>
double exact_d2(const T* a, const T* b, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s += t * t;
  }
  return s;
}

// (MET.28) a coordinate centred on c and rounded to T: the one rounding MET.29's mu accounts for (for float32
// inputs the float64 difference is exact but for extreme exponent gaps).
template <class T>
inline T centred(T x, T c) {
  return static_cast<T>(static_cast<double>(x) - static_cast<double>(c));
}

// Outward roundings of the thresholds (MET.30, MET.31): a + b rounded up / a - b rounded down, to T, so that
// "e >= sum_up(r2, beta)" proves e - beta >= r2 for the reals. s = fl(a + b) is within |s| 2^-53 of a + b; widening
// by |s| (2^-51 + eps_T) + the least subnormal of T covers that, the rounding of the widening itself and the
// rounding to T (relative eps_T / 2, absolute half a subnormal). No libm call; inf stays inf, NaN stays NaN
// (inf - inf in diff_down gives NaN: recheck).
template <class T>
constexpr double kOut = 0x1p-51 + static_cast<double>(std::numeric_limits<T>::epsilon());
template <class T>
T sum_up(double a, double b) {
  const double s = a + b;
  return static_cast<T>(s + std::abs(s) * kOut<T> + static_cast<double>(std::numeric_limits<T>::denorm_min()));
}
template <class T>
T diff_down(double a, double b) {
  const double s = a - b;
  return static_cast<T>(s - std::abs(s) * kOut<T> - static_cast<double>(std::numeric_limits<T>::denorm_min()));
}

// The largest of a set of bounds, NaN if any is NaN (one huge point sends the whole tile to the recheck).
double max_beta(const double* b, int64_t n) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(b[i])) return b[i];
    m = std::max(m, b[i]);
  }
  return m;
}

// (MET.28) c = the mean of the rows of X (and of Y if given: the midpoint of both means), float64 in row order
// (serial: the same c for any thread count), rounded to T.
template <class T>
std::vector<T> centre(const T* X, int64_t n, const T* Y, int64_t m, int64_t D) {
  std::vector<double> s(static_cast<size_t>(D), 0.0), t(static_cast<size_t>(D), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) s[d] += static_cast<double>(X[i * D + d]);
  if (Y != nullptr)
    for (int64_t j = 0; j < m; ++j)
      for (int64_t d = 0; d < D; ++d) t[d] += static_cast<double>(Y[j * D + d]);
  std::vector<T> c(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) {
    double v = s[d] / static_cast<double>(n);
    if (Y != nullptr) v = 0.5 * (v + t[d] / static_cast<double>(m));
    c[d] = std::isfinite(v) ? static_cast<T>(v) : T(0);  // any c is correct (MET.29); only the speed depends on it
  }
  return c;
}

// (MET.28, MET.29) n_i = ||x_i - c||^2 of the centred rounded coordinates, summed in float64 and rounded to T, and
// its bound beta_i = kappa n_i + alpha; NaN where n_i could overflow T's expansion (beyond max/16).
template <class T>
void norms(const T* X, int64_t n, int64_t D, const T* c, T* nrm, double* beta) {
  constexpr double uT = std::numeric_limits<T>::epsilon() / 2, u64 = std::numeric_limits<double>::epsilon() / 2;
  const double Dd = static_cast<double>(D);
  const double kappa = 2.0 * ((Dd + 8.0) * uT + (3.0 * Dd + 8.0) * u64);
  const double alpha = (Dd + 4.0) * static_cast<double>(std::numeric_limits<T>::denorm_min());
  const double big = static_cast<double>(std::numeric_limits<T>::max()) / 16.0;
#pragma omp parallel for schedule(static) num_threads(threads()) if (n * D >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = static_cast<double>(centred(X[i * D + d], c[d]));
      s += v * v;
    }
    const bool ok = s <= big;  // false for inf and NaN too
    nrm[i] = ok ? static_cast<T>(s) : T(0);
    beta[i] = ok ? kappa * static_cast<double>(nrm[i]) + alpha : std::numeric_limits<double>::quiet_NaN();
  }
}

// One set seen through one centre: the points, their centred norms and bounds.
template <class T>
struct Side {
  const T* X;
  int64_t n;
  std::vector<T> nrm;
  std::vector<double> beta;
  Side(const T* x, int64_t n_, int64_t D, const T* c) : X(x), n(n_), nrm(n_), beta(n_) {
    norms(X, n, D, c, nrm.data(), beta.data());
  }
};

// Rows [i0, i0 + ni) centred into xb (TI x D, row-major; padding rows 0) with their norms in nrow (padding 0).
template <class T>
void pack_rows(const Side<T>& s, int64_t i0, int64_t ni, int64_t D, const T* c, T* xb, T* nrow) {
  for (int64_t r = 0; r < ni; ++r) {
    const T* x = s.X + (i0 + r) * D;
    T* o = xb + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = centred(x[d], c[d]);
    nrow[r] = s.nrm[i0 + r];
  }
  std::fill(xb + ni * D, xb + Geo<T>::TI * D, T(0));
  std::fill(nrow + ni, nrow + Geo<T>::TI, T(0));
}

// Columns [j0, j0 + nc) centred into panels of W columns, colP[p][d][w] (contiguous per panel: the micro-kernel
// walks d with unit stride), with their norms in ncol; tmp holds D values. Padding columns have coordinates 0 and
// norm +inf, so their e is +inf: never below a finite threshold, and the scalar rechecks skip q >= nc.
template <class T>
void pack_cols(const Side<T>& s, int64_t j0, int64_t nc, int64_t D, const T* c, T* colP, T* ncol, T* tmp) {
  constexpr int W = Geo<T>::W;
  const int64_t ncp = ceil_div(nc, W) * W;
  for (int64_t q = 0; q < ncp; ++q) {
    T* col = colP + (q / W) * D * W + q % W;
    if (q < nc) {
      const T* y = s.X + (j0 + q) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) tmp[d] = centred(y[d], c[d]);
      for (int64_t d = 0; d < D; ++d) col[d * W] = tmp[d];
      ncol[q] = s.nrm[j0 + q];
    } else {
      for (int64_t d = 0; d < D; ++d) col[d * W] = T(0);
      ncol[q] = std::numeric_limits<T>::infinity();
    }
  }
}

// (MET.28) out[r][w] = (n_r + n_w) - 2 sum_d xb[r][d] * panel[d][w]: R rows x W columns in registers.
template <class T, int R, int W>
inline void micro_tile(const T* xb, const T* panel, const T* nrow, const T* ncol, int64_t D, T* out) {
  T acc[R][W];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int w = 0; w < W; ++w) acc[r][w] = T(0);
  }
  for (int64_t d = 0; d < D; ++d) {
    const T* p = panel + d * W;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T xr = xb[r * D + d];
#pragma omp simd
      for (int w = 0; w < W; ++w) acc[r][w] = madd(xr, p[w], acc[r][w]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int w = 0; w < W; ++w) out[r * W + w] = (nrow[r] + ncol[w]) - T(2) * acc[r][w];
  }
}

// Merges the sorted (ascending, +inf padded) list src into dst, both of kk entries: dst = the kk smallest of both.
void merge_smallest(double* dst, const double* src, int64_t kk, double* tmp) {
  int64_t a = 0, b = 0;
  for (int64_t p = 0; p < kk; ++p) tmp[p] = (b >= kk || (a < kk && dst[a] <= src[b])) ? dst[a++] : src[b++];
  std::copy(tmp, tmp + kk, dst);
}

// Inserts v into the ascending list L of kk entries if it is below the (k+1)-th; true if it was.
bool insert_smallest(double* L, int64_t kk, double v) {
  if (!(v < L[kk - 1])) return false;
  int64_t p = kk - 1;
  for (; p > 0 && L[p - 1] > v; --p) L[p] = L[p - 1];
  L[p] = v;
  return true;
}

// (MET.10, MET.30) radii by symmetry: d2(x_i, x_j) = d2(x_j, x_i) bit for bit (the differences only change sign),
// so tiles (I, J) of row blocks with J >= I cover every pair once and feed both lists: half the work of N^2.
// A tile keeps local lists for its rows and its columns, filters with min(its local (k+1)-th, a snapshot of the
// global one) (both upper bounds of the final value: a skipped d2 is at or above the (k+1)-th of values kept), and
// merges them into the global lists under the blocks' locks. The global lists end as the k+1 smallest exact d2 of
// every row whatever the order of the tiles: the same bits for any thread count. Memory: N (k+1) doubles.
template <class T>
void radii(const T* X, int64_t n, int64_t D, int64_t k, double* r2) {
  constexpr int R = Geo<T>::R, W = Geo<T>::W;
  constexpr int64_t TI = Geo<T>::TI;  // rows and columns of a tile (a multiple of R and of W)
  static_assert(TI % W == 0, "a tile's columns are whole panels");
  const int64_t kk = k + 1, B = ceil_div(n, TI);
  const std::vector<T> c = centre<T>(X, n, nullptr, 0, D);
  const Side<T> s(X, n, D, c.data());
  std::vector<double> lists(static_cast<size_t>(n * kk), std::numeric_limits<double>::infinity());
  std::vector<std::mutex> locks(static_cast<size_t>(B));
  constexpr double inf = std::numeric_limits<double>::infinity();
#pragma omp parallel num_threads(threads()) if (parallel(n, n, D))
  {
    std::vector<T> xb(TI * D), nrow(TI), colP(TI * D), ncol(TI), e(R * W), tr(TI), tc(TI), tmp_d(D);
    std::vector<double> Lr(TI * kk), Lc(TI * kk), gr(TI), gc(TI), br(TI), bc(TI), tmp(kk);
    // Diagonal by diagonal (J - I = 0, 1, ...): a block meets its neighbours early, so its lists tighten early.
    for (int64_t delta = 0; delta < B; ++delta) {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t I = 0; I < B - delta; ++I) {
        const int64_t J = I + delta, i0 = I * TI, ni = std::min(TI, n - i0), j0 = J * TI, nc = std::min(TI, n - j0);
        const int64_t ncp = ceil_div(nc, W) * W;
        const bool diag = delta == 0;  // the full square: every ordered pair is a row's, no column side
        pack_rows(s, i0, ni, D, c.data(), xb.data(), nrow.data());
        pack_cols(s, j0, nc, D, c.data(), colP.data(), ncol.data(), tmp_d.data());
        {
          std::lock_guard<std::mutex> g(locks[I]);
          for (int64_t r = 0; r < ni; ++r) gr[r] = lists[(i0 + r) * kk + kk - 1];
        }
        if (!diag) {
          std::lock_guard<std::mutex> g(locks[J]);
          for (int64_t q = 0; q < nc; ++q) gc[q] = lists[(j0 + q) * kk + kk - 1];
        }
        std::fill(Lr.begin(), Lr.end(), inf);
        std::fill(Lc.begin(), Lc.end(), inf);
        const double brmax = max_beta(s.beta.data() + i0, ni), bcmax = max_beta(s.beta.data() + j0, nc);
        for (int64_t r = 0; r < ni; ++r) {
          br[r] = s.beta[i0 + r] + bcmax;
          tr[r] = sum_up<T>(gr[r], br[r]);  // (MET.30) e >= tr: d2 >= the row's (k+1)-th so far
        }
        for (int64_t q = 0; q < ncp; ++q) {
          if (q < nc && !diag) {
            bc[q] = s.beta[j0 + q] + brmax;
            tc[q] = sum_up<T>(gc[q], bc[q]);
          } else {
            tc[q] = -std::numeric_limits<T>::infinity();  // no column side (diagonal tile, padding)
          }
        }
        for (int64_t rr = 0; rr < ni; rr += R) {
          const int64_t nr = std::min<int64_t>(R, ni - rr);
          for (int64_t q0 = 0; q0 < ncp; q0 += W) {
            micro_tile<T, R, W>(xb.data() + rr * D, colP.data() + q0 * D, nrow.data() + rr, ncol.data() + q0, D,
                                e.data());
            const T* tq = tc.data() + q0;
            for (int64_t r = 0; r < nr; ++r) {
              const T* er = e.data() + r * W;
              const T t = tr[rr + r];
              int any = 0;
#pragma omp simd reduction(| : any)
              for (int w = 0; w < W; ++w) any |= !(er[w] >= t) | !(er[w] >= tq[w]);  // NaN: recheck
              if (!any) continue;
              const int64_t lr = rr + r, i = i0 + lr;
              for (int w = 0; w < W; ++w) {
                const int64_t q = q0 + w;
                if (q >= nc) break;
                const bool cr = !(er[w] >= tr[lr]), cc = !diag && !(er[w] >= tc[q]);
                if (!cr && !cc) continue;
                const double v = exact_d2(X + i * D, X + (j0 + q) * D, D);
                double* L = Lr.data() + lr * kk;
                if (cr && v < gr[lr] && insert_smallest(L, kk, v))
                  tr[lr] = sum_up<T>(std::min(gr[lr], L[kk - 1]), br[lr]);
                double* M = Lc.data() + q * kk;
                if (cc && v < gc[q] && insert_smallest(M, kk, v)) tc[q] = sum_up<T>(std::min(gc[q], M[kk - 1]), bc[q]);
              }
            }
          }
        }
        {
          std::lock_guard<std::mutex> g(locks[I]);
          for (int64_t r = 0; r < ni; ++r) merge_smallest(&lists[(i0 + r) * kk], Lr.data() + r * kk, kk, tmp.data());
        }
        if (!diag) {
          std::lock_guard<std::mutex> g(locks[J]);
          for (int64_t q = 0; q < nc; ++q) merge_smallest(&lists[(j0 + q) * kk], Lc.data() + q * kk, kk, tmp.data());
        }
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) r2[i] = lists[i * kk + kk - 1];
}

// (MET.11-MET.13, MET.31) counts[0] = #{j: some i with d2(f_j, r_i) <= rr2_i}, counts[1] = #{i: some j with
// d2(r_i, f_j) <= fr2_j}, counts[2] = #{(i, j): d2 <= rr2_i}, counts[3] = #{i: some j with d2 <= rr2_i}.
template <class T>
void counts(const T* Rl, int64_t n, const T* F, int64_t m, int64_t D, const double* rr2, const double* fr2,
            int64_t* out) {
  constexpr int R = Geo<T>::R, W = Geo<T>::W;
  constexpr int64_t TI = Geo<T>::TI;
  const int64_t TJ = tile_cols<T>(D), blocks = ceil_div(n, TI);
  const std::vector<T> c = centre<T>(Rl, n, F, m, D);
  const Side<T> sr(Rl, n, D, c.data()), sf(F, m, D, c.data());
  std::vector<unsigned char> fake_hit(m, 0);
  int64_t recall = 0, pairs = 0, coverage = 0;
#pragma omp parallel num_threads(threads()) if (parallel(n, m, D))
  {
    std::vector<T> xb(TI * D), nrow(TI), colP(TJ * D), ncol(TJ), e(R * W), tmp_d(D);
    std::vector<T> lowR(TI), highR(TI), lowC(TJ), highC(TJ);
    std::vector<unsigned char> hit(m + TJ, 0), recalled(TI), covered(TI);  // + TJ: padding columns' writes
    int64_t rc = 0, pr = 0, cv = 0;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * TI, ni = std::min(TI, n - i0);
      pack_rows(sr, i0, ni, D, c.data(), xb.data(), nrow.data());
      const double brmax = max_beta(sr.beta.data() + i0, ni);
      std::fill(recalled.begin(), recalled.end(), 0);
      std::fill(covered.begin(), covered.end(), 0);
      for (int64_t j0 = 0; j0 < m; j0 += TJ) {
        const int64_t nc = std::min(TJ, m - j0), ncp = ceil_div(nc, W) * W;
        pack_cols(sf, j0, nc, D, c.data(), colP.data(), ncol.data(), tmp_d.data());
        const double bcmax = max_beta(sf.beta.data() + j0, nc);
        // (MET.31) e <= low: d2 <= r2 for sure; e > high: d2 > r2 for sure; between (or NaN): recheck.
        for (int64_t r = 0; r < ni; ++r) {
          const double bs = sr.beta[i0 + r] + bcmax;
          lowR[r] = diff_down<T>(rr2[i0 + r], bs);
          highR[r] = sum_up<T>(rr2[i0 + r], bs);
        }
        for (int64_t q = 0; q < ncp; ++q) {
          if (q < nc) {
            const double bs = sf.beta[j0 + q] + brmax;
            lowC[q] = diff_down<T>(fr2[j0 + q], bs);
            highC[q] = sum_up<T>(fr2[j0 + q], bs);
          } else {
            lowC[q] = highC[q] = -std::numeric_limits<T>::infinity();  // padding: never inside, never ambiguous
          }
        }
        for (int64_t rr = 0; rr < ni; rr += R) {
          const int64_t nr = std::min<int64_t>(R, ni - rr);
          for (int64_t q0 = 0; q0 < ncp; q0 += W) {
            micro_tile<T, R, W>(xb.data() + rr * D, colP.data() + q0 * D, nrow.data() + rr, ncol.data() + q0, D,
                                e.data());
            const T* lc = lowC.data() + q0;
            const T* hc = highC.data() + q0;
            unsigned char* h = hit.data() + j0 + q0;
            for (int64_t r = 0; r < nr; ++r) {
              const T* er = e.data() + r * W;
              const T lo = lowR[rr + r], hi = highR[rr + r];
              int cnt = 0, rec = 0, amb = 0;
#pragma omp simd reduction(+ : cnt) reduction(| : rec, amb)
              for (int w = 0; w < W; ++w) {
                const T v = er[w];
                const int in = v <= lo;  // (MET.11) the <= tie rule, decided where the bound allows
                cnt += in;
                h[w] |= static_cast<unsigned char>(in);
                rec |= v <= lc[w];
                amb |= (!(v <= lo) & !(v > hi)) | (!(v <= lc[w]) & !(v > hc[w]));
              }
              if (amb) {  // the band: exact d2 for the undecided comparisons of this row segment
                const int64_t i = i0 + rr + r;
                for (int w = 0; w < W; ++w) {
                  const int64_t q = q0 + w;
                  if (q >= nc) break;
                  const T v = er[w];
                  const bool ar = !(v <= lo) && !(v > hi), ac = !(v <= lc[w]) && !(v > hc[w]);
                  if (!ar && !ac) continue;
                  const double d2 = exact_d2(Rl + i * D, F + (j0 + q) * D, D);
                  if (ar && d2 <= rr2[i]) {
                    ++cnt;
                    h[w] = 1;
                  }
                  if (ac && d2 <= fr2[j0 + q]) rec = 1;
                }
              }
              pr += cnt;
              covered[rr + r] |= static_cast<unsigned char>(cnt > 0);
              recalled[rr + r] |= static_cast<unsigned char>(rec != 0);
            }
          }
        }
      }
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
