// quant_cpu.cpp — CPU kernels of the quant family (vector_quantize, vq_ema_update, lfq_entropy_loss); one build per
// instruction set (GENLOSS_ISA names it), as mmd_cpu.cpp. The math: derivations/quant.md (QNT.1-QNT.9).
//
// vector_quantize: a GEMM-like tiled search. The codebook is packed once into panels of W codes (D x W, scaled by
// -2, with ||e_k||^2 beside), each block of rows runs a register-blocked R x W micro-kernel per panel giving
// f_ik = ||e_k||^2 - 2 z_i.e_k, and keeps per row a running (best f, best exact distance, index): O(N D + K D)
// memory, never an N x K matrix. The expansion rounds (|f~ - f| <= (D + 2) u (E^2 + 2 ||z_i|| E), E = max ||e_k||),
// so f alone could pick a worse code on a near tie: every code whose f~ is within twice that bound of the running
// best f~ is rechecked with its exact distance sum_d (z_d - e_d)^2 in float64 (differences of the inputs: no
// cancellation), and the index is the argmin of THAT, ties to the lowest index (codes are scanned in ascending
// order, a later code must be strictly better). The true nearest code always passes the filter (QNT.3), so the
// result is the float64 brute-force argmin. Rows are independent: any thread count gives the same bits.
//
// Segment sums (vq_ema_update, the codebook gradient): a counting sort of the indices (serial, O(N)), then per code
// the sum of its rows in ascending row order, in float64, codes in parallel: the order of every sum is fixed, so
// the bits do not depend on the thread count (no atomics).
//
// lfq_entropy: p(c | z) = prod_j Bernoulli(c_j; sigmoid(2 tau z_j)) (QNT.7). The per-sample entropy is the sum of
// d binary entropies. The codebook mean P(c) = (1/N) sum_i A_i(c_hi) B_i(c_lo) splits the bits into a high and a
// low half (A_i, B_i the product tables of each half, 2^(d/2) entries): the accumulation is a rank-N update of a
// 2^d table (GEMM-like, rows in fixed chunks, chunks in order), and the gradient of H(P) contracts log P with the
// tables the same way (QNT.9): O(N 2^d) time, O(2^d + chunk 2^(d/2)) memory, no N x 2^d tensor.
#include "quant_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_config.h"
#include "isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

namespace {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------------- segment sums
// count[k] = #{i : idx_i = k}; sums[k, :] = sum of those rows of z, in ascending i, float64 (QNT.5).
template <class T, class I>
void segment_sums(const T* z, const I* idx, int64_t N, int64_t K, int64_t D, std::vector<int64_t>& count,
                  std::vector<double>& sums) {
  count.assign(static_cast<size_t>(K), 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = static_cast<int64_t>(idx[i]);
    if (k < 0 || k >= K)
      throw std::invalid_argument("indices must lie in [0, K) with K = " + std::to_string(K) + ", got " +
                                  std::to_string(k) + " at position " + std::to_string(i));
    ++count[static_cast<size_t>(k)];
  }
  std::vector<int64_t> start(static_cast<size_t>(K) + 1, 0);
  for (int64_t k = 0; k < K; ++k) start[k + 1] = start[k] + count[k];
  std::vector<int64_t> order(static_cast<size_t>(N));
  {
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < N; ++i) order[pos[static_cast<size_t>(idx[i])]++] = i;  // stable: rows ascending
  }
  sums.assign(static_cast<size_t>(K * D), 0.0);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads()) if (N * D >= kParallelMin)
  for (int64_t k = 0; k < K; ++k) {
    double* s = sums.data() + k * D;
    for (int64_t j = start[k]; j < start[k + 1]; ++j) {
      const T* zr = z + order[j] * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) s[d] += static_cast<double>(zr[d]);
    }
  }
}

// ---------------------------------------------------------------------------------------------- vector_quantize
template <class T>
struct Geo {
  static constexpr int W = 2 * kVecBytes / static_cast<int>(sizeof(T));      // codes per panel: two vectors
  static constexpr int R = kVecBytes == 64 ? 8 : (kVecBytes == 32 ? 6 : 4);  // rows per micro-tile
  static constexpr int Rb = R * 16;                                          // rows per block (an L1-sized slab)
};

// out[r][w] = nrm[w] + sum_d zb[r][d] * et[d][w], et = -2 e^T of one panel: f = ||e||^2 - 2 z.e (QNT.2).
template <class T, int R, int W>
inline void micro_tile(const T* zb, const T* et, const T* nrm, int64_t D, T* out) {
  T acc[R][W];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int w = 0; w < W; ++w) acc[r][w] = nrm[w];
  }
  for (int64_t d = 0; d < D; ++d) {
    const T* ed = et + d * W;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T zr = zb[r * D + d];
#pragma omp simd
      for (int w = 0; w < W; ++w) acc[r][w] = madd(zr, ed[w], acc[r][w]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int w = 0; w < W; ++w) out[r * W + w] = acc[r][w];
  }
}

template <class T>
double exact_dist(const T* a, const T* b, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s += t * t;
  }
  return s;
}

template <class T>
void vq_impl(const VqArgs& a) {
  constexpr int R = Geo<T>::R, W = Geo<T>::W, Rb = Geo<T>::Rb;
  const T* z = static_cast<const T*>(a.z);
  const T* e = static_cast<const T*>(a.codebook);
  const int64_t N = a.N, K = a.K, D = a.D;
  const int64_t P = ceil_div(K, W);
  // Packed panels: et[p][d][w] = -2 e[pW + w][d] (exact scaling), nrm[p][w] = ||e||^2; padding codes get +inf
  // (never below a threshold).
  std::vector<T> et(static_cast<size_t>(P * D * W)), nrm(static_cast<size_t>(P * W));
  double e2max = 0.0;
#pragma omp parallel for schedule(static) num_threads(threads()) if (K * D >= kParallelMin) reduction(max : e2max)
  for (int64_t p = 0; p < P; ++p) {
    for (int w = 0; w < W; ++w) {
      const int64_t k = p * W + w;
      T* col = et.data() + p * D * W + w;
      if (k < K) {
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double v = static_cast<double>(e[k * D + d]);
          s += v * v;
          col[d * W] = T(-2) * e[k * D + d];
        }
        nrm[p * W + w] = static_cast<T>(s);
        if (s > e2max) e2max = s;  // NaN codes: skipped (their distance is NaN, never chosen)
      } else {
        for (int64_t d = 0; d < D; ++d) col[d * W] = T(0);
        nrm[p * W + w] = std::numeric_limits<T>::infinity();
      }
    }
  }
  const double E = std::sqrt(e2max);
  const double u = std::numeric_limits<T>::epsilon() / 2;
  // (QNT.3) twice the rounding bound of f~, with room for the higher-order terms
  const double bound = 2.5 * static_cast<double>(D + 2) * u;
  // A row whose expansion could leave T's range (|z|, |e| near sqrt of T's largest value, or an
  // infinite code) is searched exactly over every code: there f~ would be inf or NaN and the
  // filter would drop the true nearest code.
  const double f_safe = static_cast<double>(std::numeric_limits<T>::max()) / 16;
  std::vector<double> rowdist(static_cast<size_t>(N));
  const double cz = 2.0 * a.beta / (static_cast<double>(N) * static_cast<double>(D));
  T* zq = static_cast<T*>(a.z_q);
  T* gz = static_cast<T*>(a.grad_z);
  const int64_t nblocks = ceil_div(N, Rb);
  const double work = static_cast<double>(N) * static_cast<double>(K) * static_cast<double>(D);
#pragma omp parallel num_threads(threads()) if (work >= 1 << 20)
  {
    std::vector<T> zb(static_cast<size_t>(Rb * D)), f(static_cast<size_t>(R * W));
    double thr[Rb], best_f[Rb], best_x[Rb], margin[Rb];
    int64_t best_k[Rb];
    bool exact_row[Rb];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t i0 = b * Rb;
      const int nr = static_cast<int>(std::min<int64_t>(Rb, N - i0));
      const int nrp = static_cast<int>(ceil_div(nr, R) * R);
      std::memcpy(zb.data(), z + i0 * D, sizeof(T) * static_cast<size_t>(nr * D));
      std::fill(zb.begin() + nr * D, zb.begin() + nrp * D, T(0));
      for (int r = 0; r < nr; ++r) {
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) s += static_cast<double>(zb[r * D + d]) * static_cast<double>(zb[r * D + d]);
        const double scale = e2max + 2.0 * std::sqrt(s) * E;  // bounds every partial sum of f~
        exact_row[r] = !(scale <= f_safe);
        margin[r] = bound * scale;
        thr[r] = best_f[r] = best_x[r] = std::numeric_limits<double>::infinity();
        best_k[r] = -1;
      }
      for (int64_t p = 0; p < P; ++p) {
        const T* ep = et.data() + p * D * W;
        const T* np_ = nrm.data() + p * W;
        for (int rr = 0; rr < nrp; rr += R) {
          micro_tile<T, R, W>(zb.data() + rr * D, ep, np_, D, f.data());
          for (int r = 0; r < R && rr + r < nr; ++r) {
            const int row = rr + r;
            if (exact_row[row]) continue;
            const T* fr = f.data() + r * W;
            // the threshold in T, rounded up (a superset of the candidates, each rechecked in double below)
            T th0 = static_cast<T>(std::min(thr[row], static_cast<double>(std::numeric_limits<T>::max())));
            if (static_cast<double>(th0) < thr[row]) th0 = std::nextafter(th0, std::numeric_limits<T>::infinity());
            int any = 0;
#pragma omp simd reduction(| : any)
            for (int w = 0; w < W; ++w) any |= static_cast<int>(fr[w] <= th0);
            if (!any) continue;
            for (int w = 0; w < W; ++w) {
              const double fv = static_cast<double>(fr[w]);
              if (!(fv < thr[row])) continue;  // NaN: never a candidate
              const int64_t k = p * W + w;
              const double x = exact_dist(z + (i0 + row) * D, e + k * D, D);  // (QNT.3) the exact recheck
              if (x < best_x[row]) {                                          // ascending k: ties keep the lowest index
                best_x[row] = x;
                best_k[row] = k;
              }
              if (fv < best_f[row]) {
                best_f[row] = fv;
                thr[row] = fv + margin[row];
              }
            }
          }
        }
      }
      for (int r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        for (int64_t c = 0; exact_row[r] && c < K; ++c) {  // the brute force, ascending: ties keep the lowest
          const double x = exact_dist(z + i * D, e + c * D, D);
          if (x < best_x[r]) {
            best_x[r] = x;
            best_k[r] = c;
          }
        }
        int64_t k = best_k[r];
        if (k < 0) {  // every distance NaN (a NaN in z_i): index 0, its NaN distance makes the losses NaN
          k = 0;
          best_x[r] = exact_dist(z + i * D, e, D);
        }
        a.indices[i] = k;
        rowdist[i] = best_x[r];
        std::memcpy(zq + i * D, e + k * D, sizeof(T) * static_cast<size_t>(D));
        if (gz) {
          for (int64_t d = 0; d < D; ++d)  // (QNT.4) d commitment / dz
            gz[i * D + d] =
                static_cast<T>(cz * (static_cast<double>(z[i * D + d]) - static_cast<double>(e[k * D + d])));
        }
      }
    }
  }
  double S = 0.0;  // serial, row order: the same bits for any thread count
  for (int64_t i = 0; i < N; ++i) S += rowdist[i];
  const double mean = S / (static_cast<double>(N) * static_cast<double>(D));
  *static_cast<T*>(a.out_commitment) = static_cast<T>(a.beta * mean);  // (QNT.1)
  *static_cast<T*>(a.out_codebook) = static_cast<T>(mean);
  if (a.grad_codebook) {  // (QNT.4) 2 (count_k e_k - sum_{idx = k} z_i) / (N D)
    std::vector<int64_t> count;
    std::vector<double> sums;
    segment_sums<T, int64_t>(z, a.indices, N, K, D, count, sums);
    T* ge = static_cast<T*>(a.grad_codebook);
    const double c = 2.0 / (static_cast<double>(N) * static_cast<double>(D));
    // A code no row picked gets 0: the loss does not depend on it (0 * e_k would be NaN at an inf or NaN e_k).
    for (int64_t k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d)
        ge[k * D + d] = count[k] == 0
                            ? T(0)
                            : static_cast<T>(c * (static_cast<double>(count[k]) * static_cast<double>(e[k * D + d]) -
                                                  sums[k * D + d]));
  }
}

// ---------------------------------------------------------------------------------------------- vq_ema_update
template <class T, class I>
void ema_impl(const VqEmaArgs& a) {
  const int64_t N = a.N, K = a.K, D = a.D;
  std::vector<int64_t> count;
  std::vector<double> sums;
  segment_sums<T, I>(static_cast<const T*>(a.z), static_cast<const I*>(a.indices), N, K, D, count, sums);
  const T* cs = static_cast<const T*>(a.cluster_size);
  const T* es = static_cast<const T*>(a.embed_sum);
  T* ocs = static_cast<T*>(a.out_cluster_size);
  T* oes = static_cast<T*>(a.out_embed_sum);
  T* ocb = static_cast<T*>(a.out_codebook);
  const double dec = a.decay, mix = 1.0 - a.decay;
  std::vector<double> ncs(static_cast<size_t>(K));
  double n = 0.0;
  for (int64_t k = 0; k < K; ++k) {  // (QNT.5) the EMA of the counts; their total, in index order
    ncs[k] = dec * static_cast<double>(cs[k]) + mix * static_cast<double>(count[k]);
    n += ncs[k];
  }
  const double denom = n + static_cast<double>(K) * a.eps;
  for (int64_t k = 0; k < K; ++k) {
    const double smoothed = (ncs[k] + a.eps) / denom * n;  // (QNT.6) Laplace smoothing
    ocs[k] = static_cast<T>(ncs[k]);
    for (int64_t d = 0; d < D; ++d) {
      const double v = dec * static_cast<double>(es[k * D + d]) + mix * sums[k * D + d];  // (QNT.5)
      oes[k * D + d] = static_cast<T>(v);
      ocb[k * D + d] = static_cast<T>(v / smoothed);  // (QNT.6)
    }
  }
}

// ---------------------------------------------------------------------------------------------- lfq_entropy

// tab[c] = prod_j (bit j of c ? q[j] : qm[j]) over m bits, by doubling.
inline void product_table(const double* q, const double* qm, int m, double* tab) {
  tab[0] = 1.0;
  for (int j = 0; j < m; ++j) {
    const int64_t h = int64_t{1} << j;
    const double a = q[j], b = qm[j];
#pragma omp simd
    for (int64_t t = 0; t < h; ++t) {
      tab[t + h] = tab[t] * a;
      tab[t] = tab[t] * b;
    }
  }
}

// g[j] = d/dq_j of F(q) = sum_c u[c] prod_j (bit j ? q_j : 1 - q_j), for all m bits in O(2^m) (QNT.9): contract the
// top bit first (levels T_m = u, ..., T_0 = F), then reverse mode, whose adjoint at level j is the product table of
// bits 0..j-1. lev and adj: scratch of 2^(m+1) and 2^m doubles.
inline void multilinear_grad(const double* u, const double* q, const double* qm, int m, double* lev, double* adj,
                             double* g) {
  // lev holds T_j at offset 2^j (T_j has 2^j entries), T_m = u read in place.
  for (int j = m - 1; j >= 0; --j) {
    const int64_t h = int64_t{1} << j;
    const double* up = j == m - 1 ? u : lev + 2 * h;
    double* cur = lev + h;
    const double a = q[j], b = qm[j];
#pragma omp simd
    for (int64_t t = 0; t < h; ++t) cur[t] = b * up[t] + a * up[t + h];
  }
  adj[0] = 1.0;
  for (int j = 0; j < m; ++j) {
    const int64_t h = int64_t{1} << j;
    const double* up = j == m - 1 ? u : lev + 2 * h;  // T_{j+1}
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < h; ++t) s += adj[t] * (up[t + h] - up[t]);
    g[j] = s;
    const double a = q[j], b = qm[j];
#pragma omp simd
    for (int64_t t = 0; t < h; ++t) {
      adj[t + h] = adj[t] * a;
      adj[t] = adj[t] * b;
    }
  }
}

// P[h, l] += sum_{r < n} A[r, h] B[r, l] for the t-th tile of P (H, L) (rank_tiles of them): RH x WL tiles with
// the sum over r in registers (a GEMM micro-kernel: two vector loads and RH broadcasts per 2 RH vector FMAs); tables
// smaller than one tile take the plain loop. Each tile is one task: the order of every sum is fixed.
constexpr int kRH = kVecBytes == 64 ? 8 : 4;
constexpr int kWL = 2 * kVecBytes / 8;
inline int64_t rank_tiles(int64_t H, int64_t L) {
  return (H % kRH == 0 && L % kWL == 0) ? (H / kRH) * (L / kWL) : H;
}
inline void rank_update(const double* A, const double* B, int64_t n, int64_t H, int64_t L, int64_t t, double* P) {
  if (!(H % kRH == 0 && L % kWL == 0)) {  // small tables: tile t is row h = t of P
    double* ph = P + t * L;
    for (int64_t r = 0; r < n; ++r) {
      const double a0 = A[r * H + t];
      const double* br = B + r * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) ph[l] += a0 * br[l];
    }
    return;
  }
  const int64_t h0 = (t / (L / kWL)) * kRH, l0 = (t % (L / kWL)) * kWL;
  double acc[kRH][kWL];
#pragma GCC unroll 8
  for (int i = 0; i < kRH; ++i) {
#pragma omp simd
    for (int w = 0; w < kWL; ++w) acc[i][w] = P[(h0 + i) * L + l0 + w];
  }
  for (int64_t r = 0; r < n; ++r) {
    const double* br = B + r * L + l0;
    const double* ar = A + r * H + h0;
#pragma GCC unroll 8
    for (int i = 0; i < kRH; ++i) {
      const double a = ar[i];
#pragma omp simd
      for (int w = 0; w < kWL; ++w) acc[i][w] = madd(a, br[w], acc[i][w]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kRH; ++i) {
#pragma omp simd
    for (int w = 0; w < kWL; ++w) P[(h0 + i) * L + l0 + w] = acc[i][w];
  }
}

constexpr int64_t kLfqChunk = 256;  // rows per chunk of the codebook accumulation (fixed: bits independent of threads)

template <class T>
void lfq_impl(const LfqArgs& a) {
  const T* z = static_cast<const T*>(a.z);
  const int64_t N = a.N, d = a.d;
  const int dh = static_cast<int>(d / 2), dl = static_cast<int>(d - d / 2);  // code c = (hi << dl) | lo
  const int64_t H = int64_t{1} << dh, L = int64_t{1} << dl;
  const double tau2 = 2.0 * a.inv_temperature;  // (QNT.7) the Bernoulli logit of bit j is 2 tau z_j
  const double invN = 1.0 / static_cast<double>(N);
  const bool codebook = a.codebook_weight != 0.0;
  T* gz = static_cast<T*>(a.grad_z);
  const bool par = codebook && N * H * L >= (int64_t{1} << 18);
  std::vector<double> P(codebook ? static_cast<size_t>(H * L) : 0, 0.0);
  double Hcb = 0.0;
  if (codebook) {
    // (QNT.9) P += A^T B, chunk by chunk. No barrier per chunk (a loaded machine makes every barrier wait for a
    // descheduled thread): each thread owns a fixed share of P's tiles and builds the chunk's tables itself (their
    // O(N 2^(d/2)) cost repeated per thread, against O(N 2^d / threads) of update). Each element of P is summed over
    // the rows in order by one thread: the bits do not depend on the thread count.
    const int64_t ntiles = rank_tiles(H, L);
#pragma omp parallel num_threads(threads()) if (par)
    {
#ifdef _OPENMP
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
      const int64_t nt = 1, tid = 0;
#endif
      const int64_t t_lo = ntiles * tid / nt, t_hi = ntiles * (tid + 1) / nt;
      std::vector<double> q(static_cast<size_t>(d)), qm(static_cast<size_t>(d));
      std::vector<double> A(static_cast<size_t>(kLfqChunk * H)), B(static_cast<size_t>(kLfqChunk * L));
      for (int64_t i0 = 0; i0 < N && t_lo < t_hi; i0 += kLfqChunk) {
        const int64_t nr = std::min(kLfqChunk, N - i0);
        for (int64_t r = 0; r < nr; ++r) {
          const T* zr = z + (i0 + r) * d;
          for (int64_t j = 0; j < d; ++j) sigmoid2(tau2 * static_cast<double>(zr[j]), q[j], qm[j]);
          product_table(q.data(), qm.data(), dl, B.data() + r * L);
          product_table(q.data() + dl, qm.data() + dl, dh, A.data() + r * H);
        }
        for (int64_t t = t_lo; t < t_hi; ++t) rank_update(A.data(), B.data(), nr, H, L, t, P.data());
      }
    }
  }
  double Hs = 0.0;  // (QNT.8) serial, in row order: O(N d)
  for (int64_t i = 0; i < N * d; ++i) Hs += bin_entropy(tau2 * static_cast<double>(z[i]));
  Hs *= invN;  // (QNT.8) mean over samples of the sum of the d bit entropies
  if (codebook) {
    for (int64_t c = 0; c < H * L; ++c) {  // (QNT.9) H(P) = -sum P log P, 0 log 0 = 0; NaN propagates
      const double p = P[c] * invN;
      P[c] = p;
      if (!(p <= 0.0)) Hcb -= p * std::log(p);
    }
  }
  const double value = a.sample_weight * Hs - a.codebook_weight * Hcb;
  *static_cast<T*>(a.out_value) = static_cast<T>(value);
  if (a.terms) {
    a.terms[0] = Hs;
    a.terms[1] = Hcb;
  }
  if (!gz) return;
  // d loss / d z_ij = 2 tau q (1 - q) (-sw x_ij + cw G_ij) / N, x = 2 tau z, G_ij = d/dq_ij sum_c log P(c) p_i(c)
  // (QNT.8, QNT.9); the "+1" of d(-p log p)/dp drops out because sum_c p_i(c) = 1 for every q.
  if (codebook) {
    // log P; an underflowed P(c) = 0 gets the log of the smallest positive double: its weight p_i(c_-j) q_j (1 - q_j)
    // in the gradient is 0 or tiny, and a finite stand-in keeps 0 * (-inf) from making a NaN
    const double logmin = std::log(std::numeric_limits<double>::denorm_min());
    for (int64_t c = 0; c < H * L; ++c) P[c] = P[c] > 0.0 ? std::log(P[c]) : (P[c] == 0.0 ? logmin : P[c]);
  }
  const double sw = a.sample_weight, cw = a.codebook_weight;
  const bool gpar = N * d * (codebook ? H + L : 1) >= 4096;
  constexpr int kRB = 4;  // rows per block of the contractions: each row of M = log P is read once per 4 rows
  const int64_t nblk = ceil_div(N, kRB);
#pragma omp parallel num_threads(threads()) if (gpar)
  {
    std::vector<double> q(static_cast<size_t>(kRB * d)), qm(static_cast<size_t>(kRB * d));
    std::vector<double> g(static_cast<size_t>(kRB * d), 0.0);
    std::vector<double> A, Bt, U, V, lev, adj;
    if (codebook) {
      A.assign(static_cast<size_t>(kRB * H), 0.0);
      Bt.assign(static_cast<size_t>(kRB * L), 0.0);
      U.resize(static_cast<size_t>(kRB * L));
      V.resize(static_cast<size_t>(kRB * H));
      lev.resize(static_cast<size_t>(2 * std::max(H, L)));
      adj.resize(static_cast<size_t>(std::max(H, L)));
    }
#pragma omp for schedule(dynamic, 4)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i0 = blk * kRB;
      const int nb = static_cast<int>(std::min<int64_t>(kRB, N - i0));
      for (int r = 0; r < nb; ++r) {
        const T* zr = z + (i0 + r) * d;
        double* qr = q.data() + r * d;
        double* qmr = qm.data() + r * d;
        for (int64_t j = 0; j < d; ++j) sigmoid2(tau2 * static_cast<double>(zr[j]), qr[j], qmr[j]);
        if (codebook) {
          product_table(qr, qmr, dl, Bt.data() + r * L);
          product_table(qr + dl, qmr + dl, dh, A.data() + r * H);
        }
      }
      if (codebook) {
        if (nb < kRB) {  // the tail block: zero tables for the missing rows (their results are not written)
          std::fill(A.begin() + nb * H, A.end(), 0.0);
          std::fill(Bt.begin() + nb * L, Bt.end(), 0.0);
        }
        // U_r = M^T A_r (low-bit contraction), V_r = M B_r (high-bit contraction), M = log P as (H, L)
        std::fill(U.begin(), U.end(), 0.0);
        double *u0 = U.data(), *u1 = u0 + L, *u2 = u1 + L, *u3 = u2 + L;
        const double *b0 = Bt.data(), *b1 = b0 + L, *b2 = b1 + L, *b3 = b2 + L;
        for (int64_t h = 0; h < H; ++h) {
          const double a0 = A[h], a1 = A[H + h], a2 = A[2 * H + h], a3 = A[3 * H + h];
          const double* mh = P.data() + h * L;
          double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t l = 0; l < L; ++l) {
            const double m = mh[l];
            u0[l] += a0 * m;
            u1[l] += a1 * m;
            u2[l] += a2 * m;
            u3[l] += a3 * m;
            s0 += m * b0[l];
            s1 += m * b1[l];
            s2 += m * b2[l];
            s3 += m * b3[l];
          }
          V[h] = s0;
          V[H + h] = s1;
          V[2 * H + h] = s2;
          V[3 * H + h] = s3;
        }
        for (int r = 0; r < nb; ++r) {
          double* qr = q.data() + r * d;
          double* qmr = qm.data() + r * d;
          double* gr = g.data() + r * d;
          multilinear_grad(U.data() + r * L, qr, qmr, dl, lev.data(), adj.data(), gr);
          multilinear_grad(V.data() + r * H, qr + dl, qmr + dl, dh, lev.data(), adj.data(), gr + dl);
        }
      }
      for (int r = 0; r < nb; ++r) {
        const T* zr = z + (i0 + r) * d;
        for (int64_t j = 0; j < d; ++j) {
          const double x = tau2 * static_cast<double>(zr[j]);
          const double qq = q[r * d + j], qqm = qm[r * d + j];
          gz[(i0 + r) * d + j] = static_cast<T>(tau2 * qq * qqm * (cw * g[r * d + j] - sw * x) * invN);
        }
      }
    }
  }
}

}  // namespace

void vector_quantize(const VqArgs& a) {
  if (a.dtype == 0)
    vq_impl<float>(a);
  else
    vq_impl<double>(a);
}

void vq_ema_update(const VqEmaArgs& a) {
  if (a.dtype == 0) {
    if (a.index_dtype == 0)
      ema_impl<float, int64_t>(a);
    else
      ema_impl<float, int32_t>(a);
  } else {
    if (a.index_dtype == 0)
      ema_impl<double, int64_t>(a);
    else
      ema_impl<double, int32_t>(a);
  }
}

void lfq_entropy(const LfqArgs& a) {
  if (a.dtype == 0)
    lfq_impl<float>(a);
  else
    lfq_impl<double>(a);
}

}  // namespace GENLOSS_ISA
}  // namespace cpu
}  // namespace genloss
