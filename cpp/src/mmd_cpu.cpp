// mmd_cpu.cpp — the tiled MMD^2 kernel on the CPU, value and both gradients in
// one pass, O((N + M) D) memory. Compiled once per instruction set like
// cpu_kernels.cpp (CMake foreach), picked at run time by cpu_dispatch.cpp.
//
// Work: the pairs are cut into kMmdTile x kMmdTile tiles: the upper triangle of
// the x-x blocks (K_xx is symmetric: an off-diagonal tile counts twice and feeds
// the gradients of both its row and its column points), the same for y-y, and
// every x-y tile. The tile list is cut into P contiguous partitions of roughly
// equal work, P a function of the sizes only (never of the thread count); each
// partition sums its tiles in list order into its own float64 accumulators, and
// the partitions are combined in partition order. So the bits of the result are
// the same for any thread count and on every run.                      (DIV.11)
// A tile's row sums give the gradient of its row points, its column sums (off the
// diagonal) that of its column points, weighted as in (DIV.9).
//
// Two tile bodies:
//  * D <= 4 ("direct"): coordinates transposed (D x n), lanes over j, the
//    differences a_d - b_d computed once and reused for the distance and the
//    gradient (no cancellation), inline vector exp (genloss/mmd.h).
//  * D > 4 ("blocked"): GEMM-like. Points centred on the pooled mean (distance
//    kernels are translation invariant; centring shrinks |a|^2 + |b|^2 - 2 a.b
//    cancellation), dot tile by a register-blocked micro-kernel, r2 clamped at 0,
//    then the gradient sums x_i sum_j w_ij - sum_j w_ij z_j by two more GEMMs.
//    Its limit, as for any expansion (torch.cdist's mm path, KeOps' sqdist on
//    |x|^2 terms): the absolute error of r2 is ~eps |z - mean|^2, so pairs that
//    are close compared with sqrt(eps) times the data's spread (float32: 1e-4
//    of it) lose digits of k and of the gradient. D <= 4 never does.
// Inside a tile the compute type is the input type (float or double); each tile
// row (<= 256 terms) is flushed to the float64 accumulators.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_config.h"
#include "genloss/mmd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"  // the GENLOSS_ISA guard, kVecBytes, madd

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

namespace {

constexpr int64_t kT = kMmdTile;
// Internal kernel id: rbf with exactly one bandwidth (the common case) gets its own
// instantiation so the bandwidth loop disappears from the inner loop.
constexpr int kRbf1 = 4;
// Largest dimension handled by the direct body.
constexpr int kDirectMaxD = 4;
// Partitions: at most this many, and their float64 gradient accumulators stay
// under kAccBudget bytes (O((N + M) D) memory whatever the sizes).
constexpr int64_t kMaxParts = 16;
constexpr int64_t kAccBudget = int64_t(48) << 20;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

struct Tile {
  int si, sj;      // sides: 0 = x, 1 = y
  int64_t bi, bj;  // block indices
  bool diag;       // same side, same block: the full square, rows only
  double vcoef;    // value weight (estimator weight x multiplicity)
  double gscale;   // gradient weight of the row (and column) sums
  double work;
};

template <class T>
struct Ctx {
  int kernel;
  bool dist;
  bool unbiased;
  int64_t D, Dp;
  int64_t n[2], np[2];
  std::vector<T> cs;
  std::vector<T> cs2;  // rbf: c log2(e), the exponent in base 2 (exp2_neg)
  // Factor the flushed gradient sums carry: rbf with one bandwidth sums k' = e
  // per pair and applies w = -2 c e at the flush (one multiply less per pair).
  double wscale = 1.0;
  T inv_d;
  std::vector<T> zt[2];   // D x np, transposed (both bodies)
  std::vector<T> zr[2];   // np x Dp, rows (blocked body)
  std::vector<T> nrm[2];  // np, squared norms (blocked body)
  // The inputs as given, (n, D) rows: the near pairs' differences (blocked body) are taken
  // from them, not from the centred copies, whose rounding (~eps |z|) would swamp them.
  const T* raw[2] = {nullptr, nullptr};
};

template <int KER, class T>
GENLOSS_HD void kern(T s, const T* c, int nbw, T inv_d, T& k, T& w) {
  if constexpr (KER == kRbf1) {
    // c is c' = c log2(e) here; w = -2 c e, its factor -2 c applied at the flush.
    const T e = mmd::exp2_neg(-c[0] * s);
    k = e;
    w = e;  // (DIV.8), times wscale
  } else if constexpr (KER == kMmdRbf) {
    mmd::rbf(s, c, nbw, k, w);
  } else if constexpr (KER == kMmdImq) {
    mmd::imq(s, c, nbw, k, w);
  } else if constexpr (KER == kMmdPolynomial) {
    mmd::polynomial(s, inv_d, k, w);
  } else {
    mmd::energy(s, k, w);
  }
}

// Kernels with a runtime number of bandwidths (rbf with several, imq) run in
// passes over a tile row so every loop vectorises: r2 into a buffer, one pass per
// bandwidth accumulating k and w, then the fused gradient pass reads them.
template <int KER>
constexpr bool kMultiPass = KER == kMmdRbf || KER == kMmdImq;

template <int KER, class T>
void bandwidth_passes(const T* sb, int64_t n, const T* c, const T* c2, int nbw, T* kb, T* wb) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    kb[j] = T(0);
    wb[j] = T(0);
  }
  for (int q = 0; q < nbw; ++q) {
    const T cq = c[q];
    if constexpr (KER == kMmdRbf) {
      const T cq2 = c2[q];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {  // (DIV.8)
        const T e = mmd::exp2_neg(-cq2 * sb[j]);
        kb[j] += e;
        wb[j] -= T(2) * cq * e;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {  // (DIV.8)
        const T u = T(1) / gl_sqrt(T(1) + cq * sb[j]);
        kb[j] += u;
        wb[j] -= cq * u * u * u;
      }
    }
  }
}

// ---- direct body (D <= 4) ----------------------------------------------------
template <int DIM, int KER, bool COL, bool MASK, class T>
double tile_direct(const Ctx<T>& cx, const Tile& t, double* gacc, bool grad, T* col, T* buf) {
  constexpr bool kDist = KER != kMmdPolynomial;
  const int64_t ldx = cx.np[t.si], ldz = cx.np[t.sj];
  const T* X = cx.zt[t.si].data();
  const T* Z = cx.zt[t.sj].data();
  const int64_t i0 = t.bi * kT, j0 = t.bj * kT;
  const int64_t ni = std::min(kT, cx.n[t.si] - i0), nj = std::min(kT, cx.n[t.sj] - j0);
  const int njp = static_cast<int>(round_up(nj, 16)), nj32 = static_cast<int>(nj);
  const bool skip = t.diag && cx.unbiased;
  const T* c = KER == kRbf1 ? cx.cs2.data() : cx.cs.data();  // kern<kRbf1> takes c log2(e)
  const double gs = t.gscale * cx.wscale;
  const int nbw = static_cast<int>(cx.cs.size());
  const T inv_d = cx.inv_d;
  const T* z0 = Z + j0;
  const T* z1 = DIM > 1 ? Z + ldz + j0 : z0;
  const T* z2 = DIM > 2 ? Z + 2 * ldz + j0 : z0;
  const T* z3 = DIM > 3 ? Z + 3 * ldz + j0 : z0;
  T* c0 = col;
  T* c1 = col + kT;
  T* c2 = col + 2 * kT;
  T* c3 = col + 3 * kT;
  if (COL) std::fill(col, col + DIM * kT, T(0));
  const int64_t offi = t.si == 0 ? 0 : cx.n[0];
  const int64_t offj = t.sj == 0 ? 0 : cx.n[0];
  const int64_t D = cx.D;
  double val = 0.0;
  for (int64_t ii = 0; ii < ni; ++ii) {
    const int64_t i = i0 + ii;
    const T x0 = X[i];
    const T x1 = DIM > 1 ? X[ldx + i] : T(0);
    const T x2 = DIM > 2 ? X[2 * ldx + i] : T(0);
    const T x3 = DIM > 3 ? X[3 * ldx + i] : T(0);
    const int jskip = skip ? static_cast<int>(ii) : -1;
    T* kb = buf;
    T* wb = buf + kT;
    if constexpr (kMultiPass<KER>) {
      T* sb = buf + 2 * kT;
#pragma omp simd
      for (int jj = 0; jj < njp; ++jj) {
        T s = (x0 - z0[jj]) * (x0 - z0[jj]);
        if constexpr (DIM > 1) s += (x1 - z1[jj]) * (x1 - z1[jj]);
        if constexpr (DIM > 2) s += (x2 - z2[jj]) * (x2 - z2[jj]);
        if constexpr (DIM > 3) s += (x3 - z3[jj]) * (x3 - z3[jj]);
        sb[jj] = s;
      }
      bandwidth_passes<KER>(sb, njp, c, cx.cs2.data(), nbw, kb, wb);
    }
    T v = 0, g0 = 0, g1 = 0, g2 = 0, g3 = 0;
#pragma omp simd reduction(+ : v, g0, g1, g2, g3)
    for (int jj = 0; jj < njp; ++jj) {
      T d0, d1 = 0, d2 = 0, d3 = 0, s;
      if constexpr (kDist) {
        d0 = x0 - z0[jj];
        s = d0 * d0;
        if constexpr (DIM > 1) {
          d1 = x1 - z1[jj];
          s += d1 * d1;
        }
        if constexpr (DIM > 2) {
          d2 = x2 - z2[jj];
          s += d2 * d2;
        }
        if constexpr (DIM > 3) {
          d3 = x3 - z3[jj];
          s += d3 * d3;
        }
      } else {
        d0 = z0[jj];
        s = x0 * d0;
        if constexpr (DIM > 1) {
          d1 = z1[jj];
          s += x1 * d1;
        }
        if constexpr (DIM > 2) {
          d2 = z2[jj];
          s += x2 * d2;
        }
        if constexpr (DIM > 3) {
          d3 = z3[jj];
          s += x3 * d3;
        }
      }
      T k, w;
      if constexpr (kMultiPass<KER>) {
        (void)s;
        k = kb[jj];
        w = wb[jj];
      } else {
        kern<KER>(s, c, nbw, inv_d, k, w);
      }
      if constexpr (MASK) {  // padding columns and, unbiased, the diagonal
        const bool ok = jj < nj32 && jj != jskip;
        k = ok ? k : T(0);
        w = ok ? w : T(0);
      }
      v += k;
      // row i: w (x_i - z_j) for distance kernels, w z_j for the polynomial
      g0 += w * d0;
      if constexpr (DIM > 1) g1 += w * d1;
      if constexpr (DIM > 2) g2 += w * d2;
      if constexpr (DIM > 3) g3 += w * d3;
      if constexpr (COL) {
        // column j: w (z_j - x_i) for distance kernels, w x_i for the polynomial
        if constexpr (kDist) {
          c0[jj] -= w * d0;
          if constexpr (DIM > 1) c1[jj] -= w * d1;
          if constexpr (DIM > 2) c2[jj] -= w * d2;
          if constexpr (DIM > 3) c3[jj] -= w * d3;
        } else {
          c0[jj] += w * x0;
          if constexpr (DIM > 1) c1[jj] += w * x1;
          if constexpr (DIM > 2) c2[jj] += w * x2;
          if constexpr (DIM > 3) c3[jj] += w * x3;
        }
      }
    }
    val += static_cast<double>(v);
    if (grad) {
      double* gr = gacc + (offi + i) * D;
      const T gg[4] = {g0, g1, g2, g3};
      for (int d = 0; d < DIM; ++d) gr[d] += gs * static_cast<double>(gg[d]);
    }
  }
  if (COL) {
    for (int64_t jj = 0; jj < nj; ++jj) {
      double* gc = gacc + (offj + j0 + jj) * D;
      for (int d = 0; d < DIM; ++d) gc[d] += gs * static_cast<double>(col[d * kT + jj]);
    }
  }
  return val;
}

// ---- blocked body (D > 4) ----------------------------------------------------
// The micro-kernel's vectors are the build's own registers (kVecBytes: zmm, ymm, xmm). A GCC
// vector wider than the instruction set's is lowered piecewise through memory: 64-byte
// vectors on the AVX2 build ran this GEMM at 1.6 GFLOP/s against 12.6 with 32-byte ones
// (one core, bench/README.md "MMD on AVX2"), and made mmd2 with D > 4 slower than torch there.
// The vector width changes no result: each C entry sums its k terms in order either way.
template <class T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes), aligned(4)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes), aligned(8)));
};
// gemm_acc's column step, two vectors: the padding of the tile's columns and of D.
template <class T>
constexpr int64_t kPanel = 2 * kVecBytes / static_cast<int64_t>(sizeof(T));

// C[m, n] += sum_k A(m, k) B[k, n], A(m, k) = A[m * am + k * ak], B and C row-major.
// m a multiple of 4, n a multiple of kPanel (2 vectors). 4 x 2 vector accumulators in
// registers (8 of the 16 ymm / xmm registers of AVX2 / SSE2, of the 32 zmm of AVX-512);
// the k order is fixed.
template <class T>
void gemm_acc(int64_t m, int64_t n, int64_t kk, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb, T* C,
              int64_t ldc) {
  using V = typename VecOf<T>::type;
  constexpr int64_t L = kVecBytes / sizeof(T);
  for (int64_t i = 0; i < m; i += 4) {
    for (int64_t j = 0; j < n; j += 2 * L) {
      V c[4][2];
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) std::memcpy(&c[r][h], C + (i + r) * ldc + j + h * L, sizeof(V));
      const T* a0 = A + i * am;
      for (int64_t k = 0; k < kk; ++k) {
        V b0, b1;
        std::memcpy(&b0, B + k * ldb + j, sizeof(V));
        std::memcpy(&b1, B + k * ldb + j + L, sizeof(V));
        const T* ak_ = a0 + k * ak;
        const T s0 = ak_[0], s1 = ak_[am], s2 = ak_[2 * am], s3 = ak_[3 * am];
        c[0][0] += s0 * b0;
        c[0][1] += s0 * b1;
        c[1][0] += s1 * b0;
        c[1][1] += s1 * b1;
        c[2][0] += s2 * b0;
        c[2][1] += s2 * b1;
        c[3][0] += s3 * b0;
        c[3][1] += s3 * b1;
      }
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) std::memcpy(C + (i + r) * ldc + j + h * L, &c[r][h], sizeof(V));
    }
  }
}

template <class T>
struct Scratch {
  std::vector<T> G, V, U, Wr, Wc, buf;
  explicit Scratch(int64_t Dp) : G(kT * kT), V(kT * Dp), U(kT * Dp), Wr(kT), Wc(kT), buf(3 * kT) {}
};

// Blocked body: a pair is "near" when r2 < kNearPair (|a|^2 + |b|^2) (centred
// coordinates). Outside that set the relative rounding error of the expansion's
// r2 is at most ~(D + 3) eps / kNearPair; inside it (coincident points: r2 is all
// rounding) the pair is evaluated from its differences. Data spread in D > 4 has
// few such pairs (r2 / (|a|^2 + |b|^2) ~ 1 for most pairs).          (DIV.11)
constexpr double kNearPair = 1.0 / 16.0;

// The near pairs of one tile row (flag nf[jj] != 0, jj != jskip), from the
// differences a - z_j of the INPUT coordinates (a: the row point's, Z: the tile's
// first column point's, rows of D; exact for close points, Sterbenz): their kernel
// values (the returned sum, in column order) and, with gr (the row point's float64
// gradient) and gc (that of the tile's first column point), gs w (a - z_j) into the
// row and -gs w (a - z_j) into column j. The tile's GEMM parts carry w = 0 for them.
template <int KER, class T>
double near_pairs(const Ctx<T>& cx, const T* a, const T* Z, int64_t nj, int64_t jskip, const T* nf, const T* c, int nbw,
                  T inv_d, double gs, double* gr, double* gc) {
  const int64_t D = cx.D;
  double v = 0.0;
  for (int64_t jj = 0; jj < nj; ++jj) {
    if (nf[jj] == T(0) || jj == jskip) continue;
    const T* z = Z + jj * D;
    T r2 = 0;
    for (int64_t d = 0; d < D; ++d) r2 += (a[d] - z[d]) * (a[d] - z[d]);
    T k, w;
    kern<KER>(r2, c, nbw, inv_d, k, w);
    v += static_cast<double>(k);
    if (!gr) continue;
    const double gw = gs * static_cast<double>(w);
    for (int64_t d = 0; d < D; ++d) {
      const double t = gw * static_cast<double>(a[d] - z[d]);
      gr[d] += t;
      if (gc) gc[jj * D + d] -= t;
    }
  }
  return v;
}

template <int KER, class T>
double tile_blocked(const Ctx<T>& cx, const Tile& t, double* gacc, bool grad, Scratch<T>& s) {
  constexpr bool kDist = KER != kMmdPolynomial;
  const int64_t D = cx.D, Dp = cx.Dp;
  const int64_t i0 = t.bi * kT, j0 = t.bj * kT;
  const int64_t ni = std::min(kT, cx.n[t.si] - i0), nj = std::min(kT, cx.n[t.sj] - j0);
  const int64_t ni4 = round_up(ni, 4), nj4 = round_up(nj, 4);
  const int64_t njv = round_up(nj, kPanel<T>);
  const T* Xr = cx.zr[t.si].data() + i0 * Dp;
  const T* Zr = cx.zr[t.sj].data() + j0 * Dp;
  const T* Zt = cx.zt[t.sj].data() + j0;
  const T* nx = cx.nrm[t.si].data() + i0;
  const T* nz = cx.nrm[t.sj].data() + j0;
  const bool col = grad && !t.diag;
  const bool skip = t.diag && cx.unbiased;
  const T* c = KER == kRbf1 ? cx.cs2.data() : cx.cs.data();  // kern<kRbf1> takes c log2(e)
  const double gs = t.gscale * cx.wscale;
  const int nbw = static_cast<int>(cx.cs.size());
  const T inv_d = cx.inv_d;
  T* G = s.G.data();
  // G = X Z^T: dot products of the tile.
  std::fill(G, G + ni4 * kT, T(0));
  gemm_acc<T>(ni4, njv, D, Xr, Dp, 1, Zt, cx.np[t.sj], G, kT);
  // Kernel values; G becomes the weights w.
  T* Wc = s.Wc.data();
  if (col) std::fill(Wc, Wc + kT, T(0));
  const int64_t offi = t.si == 0 ? 0 : cx.n[0];
  const int64_t offj = t.sj == 0 ? 0 : cx.n[0];
  double val = 0.0;
  for (int64_t ii = 0; ii < ni4; ++ii) {
    T* g = G + ii * kT;
    const T ni_ = nx[ii];
    const bool rowok = ii < ni;
    const int64_t jskip = skip ? ii : -1;
    const int64_t jdiag = t.diag ? ii : -1;
    T v = 0, ws = 0, nnear = 0;
    T* kb = s.buf.data();
    T* wb = kb + kT;
    // Near pairs (distance kernels, flag nf = 1): the GEMM parts leave them out
    // and near_pairs() takes them from the exact differences.
    T* nf = kb + 2 * kT;
    const T near_frac = static_cast<T>(kNearPair);
    if constexpr (kMultiPass<KER>) {
#pragma omp simd
      for (int64_t jj = 0; jj < njv; ++jj) {
        const T r = ni_ + nz[jj];
        T sv = r - T(2) * g[jj];
        sv = sv < T(0) ? T(0) : sv;  // NaN stays NaN
        nf[jj] = jj != jdiag && sv < near_frac * r ? T(1) : T(0);
        g[jj] = jj == jdiag ? T(0) : sv;
      }
      bandwidth_passes<KER>(g, njv, c, cx.cs2.data(), nbw, kb, wb);
    }
#pragma omp simd reduction(+ : v, ws, nnear)
    for (int64_t jj = 0; jj < njv; ++jj) {
      T sv;
      bool near = false;
      if constexpr (kMultiPass<KER>) {
        sv = T(0);
        near = nf[jj] != T(0);
      } else if constexpr (kDist) {
        const T r = ni_ + nz[jj];
        sv = r - T(2) * g[jj];
        sv = sv < T(0) ? T(0) : sv;    // cancellation: a distance is never negative (NaN stays)
        sv = jj == jdiag ? T(0) : sv;  // and exactly 0 from a point to itself
        near = jj != jdiag && sv < near_frac * r;
        nf[jj] = near ? T(1) : T(0);
      } else {
        sv = g[jj];
      }
      T k, w;
      if constexpr (kMultiPass<KER>) {
        (void)sv;
        k = kb[jj];
        w = wb[jj];
      } else {
        kern<KER>(sv, c, nbw, inv_d, k, w);
      }
      const bool ok = rowok && jj < nj && jj != jskip;
      k = ok && !near ? k : T(0);
      w = ok && !near ? w : T(0);
      nnear += ok && near ? T(1) : T(0);
      v += k;
      ws += w;
      g[jj] = w;
    }
    double vnear = 0.0;
    if (kDist && nnear > T(0))
      vnear = near_pairs<KER>(cx, cx.raw[t.si] + (i0 + ii) * D, cx.raw[t.sj] + j0 * D, nj, jskip, nf, c, nbw, inv_d,
                              grad ? gs : 0.0, grad ? gacc + (offi + i0 + ii) * D : nullptr,
                              col ? gacc + (offj + j0) * D : nullptr);
    val += static_cast<double>(v) + vnear;
    s.Wr[ii] = ws;
    if (col) {
#pragma omp simd
      for (int64_t jj = 0; jj < njv; ++jj) Wc[jj] += g[jj];
    }
  }
  if (!grad) return val;
  // V = W Z: sum_j w_ij z_j; row gradient x_i W_i - V_i (distance) or V_i.
  T* V = s.V.data();
  std::fill(V, V + ni4 * Dp, T(0));
  gemm_acc<T>(ni4, Dp, nj4, G, kT, 1, Zr, Dp, V, Dp);
  for (int64_t ii = 0; ii < ni; ++ii) {
    double* gr = gacc + (offi + i0 + ii) * D;
    const T* xi = Xr + ii * Dp;
    const T* vi = V + ii * Dp;
    for (int64_t d = 0; d < D; ++d) {
      const T r = kDist ? xi[d] * s.Wr[ii] - vi[d] : vi[d];
      gr[d] += gs * static_cast<double>(r);
    }
  }
  if (!col) return val;
  // U = W^T X: sum_i w_ij x_i; column gradient z_j W'_j - U_j (distance) or U_j.
  T* U = s.U.data();
  std::fill(U, U + nj4 * Dp, T(0));
  gemm_acc<T>(nj4, Dp, ni4, G, 1, kT, Xr, Dp, U, Dp);
  for (int64_t jj = 0; jj < nj; ++jj) {
    double* gc = gacc + (offj + j0 + jj) * D;
    const T* zj = Zr + jj * Dp;
    const T* uj = U + jj * Dp;
    for (int64_t d = 0; d < D; ++d) {
      const T r = kDist ? zj[d] * Wc[jj] - uj[d] : uj[d];
      gc[d] += gs * static_cast<double>(r);
    }
  }
  return val;
}

// ---- one tile, dispatched on (D, kernel) ------------------------------------
template <int KER, class T>
double tile_k(const Ctx<T>& cx, const Tile& t, double* gacc, bool grad, T* col, T* buf, Scratch<T>* s) {
  const bool c = grad && !t.diag;
  // Full off-diagonal tiles (most of them) run without the lane masks.
  const bool mask = t.diag || (t.bj + 1) * kT > cx.n[t.sj];
  switch (cx.D) {
#define GENLOSS_DIM(n)                                                          \
  case n:                                                                       \
    if (mask)                                                                   \
      return c ? tile_direct<n, KER, true, true>(cx, t, gacc, grad, col, buf)   \
               : tile_direct<n, KER, false, true>(cx, t, gacc, grad, col, buf); \
    return c ? tile_direct<n, KER, true, false>(cx, t, gacc, grad, col, buf)    \
             : tile_direct<n, KER, false, false>(cx, t, gacc, grad, col, buf);
    GENLOSS_DIM(1)
    GENLOSS_DIM(2)
    GENLOSS_DIM(3)
    GENLOSS_DIM(4)
#undef GENLOSS_DIM
    default:
      return tile_blocked<KER>(cx, t, gacc, grad, *s);
  }
}

template <class T>
double tile(const Ctx<T>& cx, const Tile& t, double* gacc, bool grad, T* col, T* buf, Scratch<T>* s) {
  switch (cx.kernel) {
    case kRbf1:
      return tile_k<kRbf1>(cx, t, gacc, grad, col, buf, s);
    case kMmdRbf:
      return tile_k<kMmdRbf>(cx, t, gacc, grad, col, buf, s);
    case kMmdImq:
      return tile_k<kMmdImq>(cx, t, gacc, grad, col, buf, s);
    case kMmdPolynomial:
      return tile_k<kMmdPolynomial>(cx, t, gacc, grad, col, buf, s);
    default:
      return tile_k<kMmdEnergy>(cx, t, gacc, grad, col, buf, s);
  }
}

// ---- the linear-time estimator (O(N D), one pass, fixed order) ---------------
template <class T>
void linear(const MmdArgs& a, const Ctx<T>& cx) {
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* gx = static_cast<T*>(a.grad_x);
  T* gy = static_cast<T*>(a.grad_y);
  const int64_t D = a.D, n = a.N / 2;
  const double s = 1.0 / static_cast<double>(n);
  if (gx) std::fill(gx, gx + a.N * D, T(0));
  if (gy) std::fill(gy, gy + a.M * D, T(0));
  const T* c = cx.cs.data();
  const int nbw = static_cast<int>(cx.cs.size());
  const bool dist = cx.dist;
  double total = 0.0;
  // pair (p, q, sign): k(p, q) enters with the sign; gradient w.r.t. p and q.
  auto pair = [&](const T* p, const T* q, T* gp, T* gq, double sign) {
    T sv = 0;
    for (int64_t d = 0; d < D; ++d) sv += dist ? (p[d] - q[d]) * (p[d] - q[d]) : p[d] * q[d];
    T k, w;
    mmd::eval<T>(cx.kernel == kRbf1 ? int(kMmdRbf) : cx.kernel, sv, c, nbw, cx.inv_d, k, w);
    total += sign * static_cast<double>(k);
    const T g = static_cast<T>(sign * s * a.grad_scale) * w;
    for (int64_t d = 0; d < D; ++d) {
      if (gp) gp[d] += g * (dist ? p[d] - q[d] : q[d]);
      if (gq) gq[d] += g * (dist ? q[d] - p[d] : p[d]);
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = 2 * i * D, o = (2 * i + 1) * D;
    pair(x + e, x + o, gx ? gx + e : nullptr, gx ? gx + o : nullptr, 1.0);
    pair(y + e, y + o, gy ? gy + e : nullptr, gy ? gy + o : nullptr, 1.0);
    pair(x + e, y + o, gx ? gx + e : nullptr, gy ? gy + o : nullptr, -1.0);
    pair(x + o, y + e, gx ? gx + o : nullptr, gy ? gy + e : nullptr, -1.0);
  }
  static_cast<T*>(a.out_value)[0] = static_cast<T>(s * total);
}

template <class T>
void mmd_t(const MmdArgs& a) {
  Ctx<T> cx;
  cx.kernel = a.kernel;
  cx.dist = a.kernel != kMmdPolynomial;
  cx.unbiased = a.estimator == kMmdUnbiased;
  cx.D = a.D;
  cx.inv_d = static_cast<T>(1.0 / static_cast<double>(a.D));
  if (a.kernel == kMmdRbf || a.kernel == kMmdImq)
    for (int s = 0; s < a.nbw; ++s) {
      const double c = mmd::coef(a.kernel, a.bandwidths[s]);
      cx.cs.push_back(static_cast<T>(c));
      cx.cs2.push_back(static_cast<T>(c * mmd::kLog2e));
    }
  if (a.kernel == kMmdRbf && a.nbw == 1) {
    cx.kernel = kRbf1;
    cx.wscale = -2.0 * mmd::coef(a.kernel, a.bandwidths[0]);
  }
  if (cx.cs.empty()) {
    cx.cs.push_back(T(0));
    cx.cs2.push_back(T(0));
  }
  if (a.estimator == kMmdLinear) {
    linear<T>(a, cx);
    return;
  }
  const int64_t D = a.D;
  const bool direct = D <= kDirectMaxD;
  cx.Dp = round_up(D, kPanel<T>);
  cx.n[0] = a.N;
  cx.n[1] = a.M;
  const T* src[2] = {static_cast<const T*>(a.x), static_cast<const T*>(a.y)};
  cx.raw[0] = src[0];
  cx.raw[1] = src[1];
  // Pooled mean (blocked body, distance kernels): the distances do not change.
  std::vector<double> mean(D, 0.0);
  if (!direct && cx.dist) {
    for (int s = 0; s < 2; ++s)
      for (int64_t i = 0; i < cx.n[s]; ++i)
        for (int64_t d = 0; d < D; ++d) mean[d] += static_cast<double>(src[s][i * D + d]);
    for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<double>(a.N + a.M);
  }
  for (int s = 0; s < 2; ++s) {
    const int64_t n = cx.n[s], np = round_up(n, kT);
    cx.np[s] = np;
    cx.zt[s].assign(D * np, T(0));
    const T* z = src[s];
    if (direct) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < D; ++d) cx.zt[s][d * np + i] = z[i * D + d];
    } else {
      cx.zr[s].assign(np * cx.Dp, T(0));
      cx.nrm[s].assign(np, T(0));
      for (int64_t i = 0; i < n; ++i) {
        double q = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const T v = static_cast<T>(static_cast<double>(z[i * D + d]) - mean[d]);
          cx.zt[s][d * np + i] = v;
          cx.zr[s][i * cx.Dp + d] = v;
          q += static_cast<double>(v) * static_cast<double>(v);
        }
        cx.nrm[s][i] = static_cast<T>(q);
      }
    }
  }
  double ca, cb, cc;
  mmd::estimator_weights(a.estimator, a.N, a.M, ca, cb, cc);
  // The tile list, in a fixed order: x-x triangle, y-y triangle, x-y rectangle.
  std::vector<Tile> tiles;
  const int64_t B[2] = {ceil_div(a.N, kT), ceil_div(a.M, kT)};
  tiles.reserve(B[0] * (B[0] + 1) / 2 + B[1] * (B[1] + 1) / 2 + B[0] * B[1]);  // no growth: 1x, not 3x
  auto size_of = [&](int s, int64_t b) { return static_cast<double>(std::min(kT, cx.n[s] - b * kT)); };
  for (int s = 0; s < 2; ++s) {
    const double w = s == 0 ? ca : cb;
    for (int64_t bi = 0; bi < B[s]; ++bi)
      for (int64_t bj = bi; bj < B[s]; ++bj) {
        const bool dg = bi == bj;
        tiles.push_back({s, s, bi, bj, dg, (dg ? 1.0 : 2.0) * w, 2.0 * w, size_of(s, bi) * size_of(s, bj)});
      }
  }
  for (int64_t bi = 0; bi < B[0]; ++bi)
    for (int64_t bj = 0; bj < B[1]; ++bj)
      tiles.push_back({0, 1, bi, bj, false, cc, cc, size_of(0, bi) * size_of(1, bj)});
  const bool grad = a.grad_x || a.grad_y;
  const int64_t nacc = (a.N + a.M) * D;
  int64_t P = std::min<int64_t>(kMaxParts, static_cast<int64_t>(tiles.size()));
  if (grad) P = std::max<int64_t>(1, std::min<int64_t>(P, kAccBudget / (nacc * 8)));
  double total_work = 0.0;
  for (const Tile& t : tiles) total_work += t.work;
  std::vector<int64_t> first(P + 1, static_cast<int64_t>(tiles.size()));
  {
    double cum = 0.0;
    int64_t p = 0;
    first[0] = 0;
    for (int64_t q = 0; q < static_cast<int64_t>(tiles.size()); ++q) {
      while (p + 1 < P && cum >= total_work * static_cast<double>(p + 1) / static_cast<double>(P)) first[++p] = q;
      cum += tiles[q].work;
    }
    while (p + 1 <= P) first[++p] = static_cast<int64_t>(tiles.size());
  }
  // Not value-initialised: each partition zeroes its own slice in the parallel
  // region (no serial memset of P (N + M) D doubles; pages first touched by
  // the thread that uses them).
  std::unique_ptr<double[]> acc(grad ? new double[P * nacc] : nullptr);
  std::vector<double> pval(P, 0.0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads()) if (total_work >= 65536.0)
  for (int64_t p = 0; p < P; ++p) {
    double* g = grad ? acc.get() + p * nacc : nullptr;
    if (g) std::fill(g, g + nacc, 0.0);
    std::vector<T> col(direct ? kDirectMaxD * kT : 0), buf(direct ? 3 * kT : 0);
    std::vector<Scratch<T>> sc;
    if (!direct) sc.emplace_back(cx.Dp);
    double v = 0.0;
    for (int64_t q = first[p]; q < first[p + 1]; ++q) {
      const Tile& t = tiles[q];
      v += t.vcoef * tile<T>(cx, t, g, grad, col.data(), buf.data(), direct ? nullptr : sc.data());
    }
    pval[p] = v;
  }
  double value = 0.0;
  for (int64_t p = 0; p < P; ++p) value += pval[p];
  static_cast<T*>(a.out_value)[0] = static_cast<T>(value);
  if (!grad) return;
  T* outs[2] = {static_cast<T*>(a.grad_x), static_cast<T*>(a.grad_y)};
  for (int s = 0; s < 2; ++s) {
    if (!outs[s]) continue;
    const int64_t off = s == 0 ? 0 : a.N * D, cnt = cx.n[s] * D;
    T* o = outs[s];
#pragma omp parallel for schedule(static) num_threads(threads()) if (cnt * P >= 65536)
    for (int64_t e = 0; e < cnt; ++e) {
      double r = 0.0;
      for (int64_t p = 0; p < P; ++p) r += acc[p * nacc + off + e];
      o[e] = static_cast<T>(a.grad_scale * r);
    }
  }
}

}  // namespace

void mmd(const MmdArgs& a) {
  if (a.dtype == kFloat32)
    mmd_t<float>(a);
  else
    mmd_t<double>(a);
}

}  // namespace GENLOSS_ISA
}  // namespace cpu
}  // namespace genloss
