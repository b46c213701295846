// cpu_kernels.cpp — the ONE CPU engine. This file is compiled once per
// instruction set (CMake: sse2 / avx2 / avx512, see CMakeLists.txt) into its own
// namespace; cpu_dispatch.cpp picks the widest one the running CPU supports.
//
// Vector transcendental functions: with -fno-math-errno GCC may call glibc's
// libmvec (exp, log1p, expm1, tanh: <= 4 ulp) for a vectorised loop once the
// functions are declared SIMD-callable — glibc declares them only under
// -ffast-math, which genloss must not use (it breaks inf/nan handling), so we
// declare them here ourselves.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GLIBC__) && !defined(GENLOSS_NO_LIBMVEC)
extern "C" {
__attribute__((simd("notinbranch"))) double exp(double) noexcept;
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) double expm1(double) noexcept;
__attribute__((simd("notinbranch"))) float expm1f(float) noexcept;
__attribute__((simd("notinbranch"))) double log1p(double) noexcept;
__attribute__((simd("notinbranch"))) float log1pf(float) noexcept;
__attribute__((simd("notinbranch"))) double tanh(double) noexcept;
__attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
}
#endif

#include "cpu_config.h"
#include "cpu_half.h"
#include "cpu_table.h"
#include "genloss/engine.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"  // the GENLOSS_ISA guard, kVecBytes, madd

namespace genloss {
namespace cpu {
namespace GENLOSS_ISA {

namespace {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Pairwise sum in a fixed order: depends only on n, never on threads.
double pairwise(const double* x, int64_t n) {
  if (n <= 8) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += x[i];
    return s;
  }
  const int64_t h = n / 2;
  return pairwise(x, h) + pairwise(x + h, n - h);
}

template <class T>
double lanes_sum(const T* acc) {
  double d[kLanes];
  for (int j = 0; j < kLanes; ++j) d[j] = static_cast<double>(acc[j]);
  return pairwise(d, kLanes);
}

// One block of kLanes results from a (64-byte aligned) local buffer to its
// destination: plain stores, or with NT streaming (non-temporal) stores, dst then
// 64-byte aligned too (the caller checks). x86 only; elsewhere plain stores. A
// chunk that streams ends with a store fence, so its blocks are visible to any
// thread that synchronises with this one afterwards (the OpenMP barrier).
template <bool NT, class T>
GENLOSS_HD void put_block(T* dst, const T* src) {
  constexpr int kBytes = kLanes * static_cast<int>(sizeof(T));
  if constexpr (!NT) {
    std::memcpy(dst, src, kBytes);
  } else {
#if defined(__AVX512F__)
    for (int o = 0; o < kBytes; o += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(reinterpret_cast<char*>(dst) + o),
                          _mm512_load_si512(reinterpret_cast<const char*>(src) + o));
#elif defined(__AVX__)
    for (int o = 0; o < kBytes; o += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(reinterpret_cast<char*>(dst) + o),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(src) + o)));
#elif defined(__SSE2__)
    for (int o = 0; o < kBytes; o += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(reinterpret_cast<char*>(dst) + o),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const char*>(src) + o)));
#else
    std::memcpy(dst, src, kBytes);
#endif
  }
}
// The chunk loop also prefetches its inputs kPrefetchBytes ahead,
// one line per input per 64 bytes of block: a large call reads its inputs from
// DRAM, and the hardware prefetchers alone leave a core short of requests in
// flight (native diffusion_mse_loss fwd+bwd on (64, 4, 64, 64), inputs cold: 7-9 %
// faster on the 2-core Xeon VM, bench/README.md). A hint: it changes no result,
// and reading past an input's end is harmless (a prefetch never faults).
template <class T>
inline void prefetch_block(const T* x) {
#if defined(__SSE2__)
  const uintptr_t q = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;  // may lie past the end: no pointer arithmetic
  for (int o = 0; o < kLanes * static_cast<int>(sizeof(T)); o += 64)
    _mm_prefetch(reinterpret_cast<const char*>(q + o), _MM_HINT_T0);
#else
  (void)x;
#endif
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// A block's results go to memory with streaming stores (`nt`: a call above the
// streaming threshold whose chunk outputs are 64-byte aligned) or plain ones: a
// branch per block, outside the vectorised loop.
template <class T>
inline void put(T* dst, const T* src, bool nt) {
  if (nt)
    put_block<true>(dst, src);
  else
    put_block<false>(dst, src);
}

// kLanes float16 values (the first m of src; the rest read as 0) widened to float32, and m
// float32 values narrowed into dst, by F16C a vector at a time (vcvtph2ps / vcvtps2ph, round
// to nearest even whatever MXCSR says): the bits of cpu_half.h's widen / narrow, as torch's
// CPU conversions. GCC vectorises neither the portable conversion nor _cvtsh_ss in chunk's
// loop: element by element a float16 loss took 3x its float32 time (bench/README.md, "float16
// a vector at a time"). bfloat16 stays element by element: its shifts vectorise, and an
// explicit vector version measured no faster.
#if defined(__F16C__)
constexpr bool kVecConvert = true;

inline void widen16(const F16* s, float* d) {
#if defined(__AVX512F__)
  _mm512_store_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))));
#else
  _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))));
  _mm256_store_ps(d + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8))));
#endif
}
inline void narrow16(const float* s, F16* d) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtps_ph(_mm512_load_ps(s), kRound));
#else
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(_mm256_load_ps(s), kRound));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 8), _mm256_cvtps_ph(_mm256_load_ps(s + 8), kRound));
#endif
}
#else
constexpr bool kVecConvert = false;  // (the sse2 build: chunk converts element by element)
inline void widen16(const F16*, float*) {}
inline void narrow16(const float*, F16*) {}
#endif

template <class St>  // (St: F16)
inline void widen_block(const St* src, float* dst, int m) {
  static_assert(kLanes % 16 == 0, "a block is whole 16-element vectors");
  alignas(64) St pad[kLanes];
  if (m < kLanes) {
    std::memset(pad, 0, sizeof pad);
    std::memcpy(pad, src, static_cast<size_t>(m) * sizeof(St));
    src = pad;
  }
  if constexpr (kVecConvert)
    for (int o = 0; o < kLanes; o += 16) widen16(src + o, dst + o);
}

template <class St>  // (St: F16)
inline void narrow_block(const float* src, St* dst, int m) {
  alignas(64) St out[kLanes];
  St* o16 = m < kLanes ? out : dst;
  if constexpr (kVecConvert)
    for (int o = 0; o < kLanes; o += 16) narrow16(src + o, o16 + o);
  if (m < kLanes) std::memcpy(dst, out, static_cast<size_t>(m) * sizeof(St));
}

// Whether chunk() converts storage type St a block at a time (widen_block / narrow_block)
// rather than element by element in its loop: float16 where the build has F16C.
template <class St>
constexpr bool kTiles = kVecConvert && std::is_same_v<St, F16>;

// How a chunk writes its outputs. kDirect (calls below the streaming threshold):
// each lane stores its results where they belong. kBuffered (calls above it): each
// block of kLanes results is computed into local buffers, then put to memory with
// streaming stores where the chunk's outputs are 64-byte aligned (`nt`), plain ones
// elsewhere: one loop, a branch per block, so a call's bits do not depend on which
// chunks stream nor on the streaming switch. The two loops run the same arithmetic
// (no FP contraction: CMakeLists.txt), so they agree bit for bit wherever the
// functor is plain arithmetic; a functor calling exp/log1p/expm1/tanh may differ in
// the last bit between them where GCC vectorises one loop (libmvec) and not the
// other (glibc's scalar function). (One buffered loop for every call was tried: small
// calls, whose outputs stay in cache, ran 2-3x slower.)
enum Store : int { kDirect = 0, kBuffered = 1 };

// One chunk of map_reduce: returns the sum of f over [0, n) and writes the
// gradients (and elementwise values) that are asked for. St: the storage type, T the compute
// type (float32 for float16/bfloat16 storage: cpu_half.h).
template <class F, class St, bool WG, int S, class T = compute_t<St>>
double chunk(const St* const* in, St* const* grad, St* ev, int64_t n, const Params<T>& p, T vs, T gs, T go, bool nt,
             double* dsum) {
  constexpr int N = F::arity;
  const St* __restrict x[N];
  St* __restrict g[N];
  for (int a = 0; a < N; ++a) {
    x[a] = in[a];
    g[a] = grad[a];
  }
  T accv[kLanes] = {};
  T accd[kLanes] = {};
  // element k into lane j; its outputs go to gd[a][o] and ed[o]
  auto body = [&](int64_t k, int j, auto* gd, St* ed, int64_t o) __attribute__((always_inline)) {
    T xs[N], d[N], v;
    for (int a = 0; a < N; ++a) xs[a] = load(x[a][k]);
    eval_n<F>(xs, p, v, d);
    accv[j] += v;
    if (ed) ed[o] = store_as<St>(v * vs);
    if constexpr (WG) {
      accd[j] += d[0];
      for (int a = 0; a < N; ++a)
        if (gd[a]) gd[a][o] = store_as<St>(d[a] * gs + go);
    }
  };
  int64_t i = 0;
  if constexpr (kTiles<St>) {
    // float16 with F16C: each block widened into float32 tiles, computed as a float32 call
    // (lane j of a block, the tail included, sums into accumulator j, as below), its results
    // narrowed a block at a time.
    (void)nt;
    alignas(64) float xf[N][kLanes], gf[N][kLanes], ef[kLanes];
    auto tile = [&](int j) __attribute__((always_inline)) {
      T xs[N], d[N], v;
      for (int a = 0; a < N; ++a) xs[a] = xf[a][j];
      eval_n<F>(xs, p, v, d);
      accv[j] += v;
      ef[j] = v * vs;
      if constexpr (WG) {
        accd[j] += d[0];
        for (int a = 0; a < N; ++a) gf[a][j] = d[a] * gs + go;
      }
    };
    for (; i < n; i += kLanes) {
      const int m = static_cast<int>(std::min<int64_t>(kLanes, n - i));
      for (int a = 0; a < N; ++a) widen_block(x[a] + i, xf[a], m);
      if (m == kLanes) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) tile(j);
      } else {
        for (int j = 0; j < m; ++j) tile(j);
      }
      if (ev) narrow_block(ef, ev + i, m);
      if constexpr (WG)
        for (int a = 0; a < N; ++a)
          if (g[a]) narrow_block(gf[a], g[a] + i, m);
    }
  } else if constexpr (S == kDirect) {
    (void)nt;
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) body(i + j, j, g, ev, i + j);
    }
  } else {
    static_assert(sizeof(St) >= 4, "16-bit storage takes the block loop above");
    alignas(kStreamAlign) St gb[N][kLanes];
    alignas(kStreamAlign) St eb[kLanes];
    St* __restrict gbp[N];
    for (int a = 0; a < N; ++a) gbp[a] = (WG && g[a]) ? gb[a] : nullptr;
    St* ebp = ev ? eb : nullptr;
    for (; i + kLanes <= n; i += kLanes) {
      for (int a = 0; a < N; ++a) prefetch_block(x[a] + i);
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) body(i + j, j, gbp, ebp, j);
      if (ev) put(ev + i, eb, nt);
      for (int a = 0; a < N; ++a)
        if (gbp[a]) put(g[a] + i, gb[a], nt);
    }
    if (nt) stream_fence();
  }
  if constexpr (!kTiles<St>)
    for (int j = 0; i < n; ++i, ++j) body(i, j, g, ev, i);
  if (WG && dsum) *dsum = lanes_sum(accd);
  return lanes_sum(accv);
}

template <class T>
T* ptr(void* p) {
  return static_cast<T*>(p);
}
template <class T>
const T* cptr(const void* p) {
  return static_cast<const T*>(p);
}

// Scratch for chunk partials, reused across calls (a fresh large vector would
// page-fault on every call).
std::vector<double>& scratch(size_t n) {
  thread_local std::vector<double> buf;
  if (buf.size() < n) buf.resize(n);
  return buf;
}

// Row r's entry of the per-row (float64) table, null without one.
const double* table_row(const MapReduceArgs& a, int64_t r) {
  if (!a.table) return nullptr;
  int64_t i = r;
  if (a.index) i = a.index_type == kInt32 ? cptr<int32_t>(a.index)[r] : cptr<int64_t>(a.index)[r];
  return cptr<double>(a.table) + i * a.table_stride;
}

// One chunk with the functor the row asks for (F, or F::Alt where flagged).
template <class F, class St, bool WG, int S, class T = compute_t<St>>
double row_chunk(const St* const* in, St* const* grad, St* ev, int64_t n, const Params<T>& p, T vs, T gs, T go, bool nt,
                 double* dsum) {
  if constexpr (has_alt<F>::value) {
    if (p.rp && p.rp[F::alt_flag] != 0.0)
      return chunk<typename F::Alt, St, WG, S>(in, grad, ev, n, p, vs, gs, go, nt, dsum);
  }
  return chunk<F, St, WG, S>(in, grad, ev, n, p, vs, gs, go, nt, dsum);
}

// One value output (out_value, out_rows): float32 where the call asks for it (value_f32: a
// float16/bfloat16 call whose loss is returned in float32), else the storage type.
template <class St>
double value_at(const void* o, int64_t i, bool f32) {
  return f32 ? static_cast<double>(cptr<float>(o)[i]) : static_cast<double>(load(cptr<St>(o)[i]));
}
template <class St>
void set_value(void* o, int64_t i, double v, bool f32) {
  if (f32)
    ptr<float>(o)[i] = static_cast<float>(v);
  else
    ptr<St>(o)[i] = store_as<St>(static_cast<compute_t<St>>(v));
}

bool stream_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kStreamAlign - 1)) == 0;
}

template <class F, class St, bool WG>
void map_reduce_t(const MapReduceArgs& a) {
  using T = compute_t<St>;
  constexpr bool kHalf = sizeof(St) == 2;  // float16 / bfloat16 storage: the direct loop only
  const Params<T> p0{T(first_param(a)), T(a.pb), T(a.pc), a.mode, nullptr};
  constexpr int N = F::arity;
  St* ev = ptr<St>(a.out_elems);
  const T vs = T(a.value_scale), gs = T(a.grad_scale), go = T(grad_offset_of(a));
  const St* w = cptr<St>(a.row_weight);
  // Without per-row output or per-row inputs the whole tensor is one long row: fewer partials.
  const bool per_row = a.out_rows || a.out_rows_raw || a.table || w;
  const int64_t rows = per_row ? a.rows : 1;
  const int64_t cols = per_row ? a.cols : a.rows * a.cols;
  const int64_t cpr = ceil_div(cols, kChunk);
  const int64_t ntask = rows * cpr;
  std::vector<double>& buf = scratch(static_cast<size_t>(2 * ntask + rows + 2));
  double* part = buf.data();
  double* dpart = part + ntask;
  double* rowv = dpart + ntask;
  const bool par = rows * cols >= kParallelMin && ntask > 1;
  // Calls that write enough take the buffered loop and stream their outputs where
  // 64-byte aligned (see stream_min_bytes in cpu_config.h); smaller ones the direct
  // loop. nt_stores() false keeps the buffered loop but stores plainly.
  int outputs = ev ? 1 : 0;
  for (int q = 0; q < N; ++q) outputs += (WG && a.grad[q]) ? 1 : 0;
  const int64_t min_bytes = stream_min_bytes();
  const bool large = !kHalf && min_bytes >= 0 && outputs > 0 &&
                     static_cast<double>(outputs) * static_cast<double>(rows * cols) * sizeof(St) >= double(min_bytes);
  const bool stream = large && nt_stores();
  std::atomic<bool> streamed{false};  // some chunk streamed (64-byte aligned outputs)
#pragma omp parallel for schedule(static) num_threads(threads()) if (par)
  for (int64_t t = 0; t < ntask; ++t) {
    const int64_t r = t / cpr, c = t % cpr;
    const int64_t begin = r * cols + c * kChunk;
    const int64_t len = std::min(kChunk, cols - c * kChunk);
    const St* xs[N];
    St* gs_[N];
    bool aligned = stream && (!ev || stream_aligned(ev + begin));
    for (int q = 0; q < N; ++q) {
      xs[q] = cptr<St>(a.in[q]) + begin;
      gs_[q] = a.grad[q] ? ptr<St>(a.grad[q]) + begin : nullptr;
      aligned = aligned && (!gs_[q] || stream_aligned(gs_[q]));
    }
    Params<T> p = p0;
    p.rp = table_row(a, r);
    const T wr = w ? load(w[r]) : T(1);
    double ds = 0.0;
    St* e = ev ? ev + begin : nullptr;
    if (aligned) streamed.store(true, std::memory_order_relaxed);
    if constexpr (kHalf)
      part[t] = row_chunk<F, St, WG, kDirect>(xs, gs_, e, len, p, vs * wr, gs * wr, go, false, &ds);
    else
      part[t] = large ? row_chunk<F, St, WG, kBuffered>(xs, gs_, e, len, p, vs * wr, gs * wr, go, aligned, &ds)
                      : row_chunk<F, St, WG, kDirect>(xs, gs_, e, len, p, vs * wr, gs * wr, go, false, &ds);
    dpart[t] = ds * static_cast<double>(wr);
  }
  if (streamed.load(std::memory_order_relaxed)) count_streamed_call();
  for (int64_t r = 0; r < rows; ++r) rowv[r] = pairwise(part + r * cpr, cpr);
  if (a.out_rows_raw)
    for (int64_t r = 0; r < rows; ++r) set_value<St>(a.out_rows_raw, r, a.value_scale * rowv[r], false);
  if (w)
    for (int64_t r = 0; r < rows; ++r) rowv[r] *= static_cast<double>(load(w[r]));
  const double total = pairwise(rowv, rows);
  const bool f32 = a.value_f32 != 0;
  if (a.out_value)
    set_value<St>(a.out_value, 0, (a.accumulate ? value_at<St>(a.out_value, 0, f32) : 0.0) + a.value_scale * total,
                  f32);
  if (a.out_rows)
    for (int64_t r = 0; r < rows; ++r)
      set_value<St>(a.out_rows, r, (a.accumulate ? value_at<St>(a.out_rows, r, f32) : 0.0) + a.value_scale * rowv[r],
                    f32);
  for (double* t : {a.totals, a.totals_out}) {
    if (t == nullptr) continue;
    t[0] = total;
    t[1] = WG ? pairwise(dpart, ntask) : 0.0;
  }
}

template <class F, class St>
void map_reduce_g(const MapReduceArgs& a) {
  bool any = false;  // each gradient may be skipped when not needed
  for (int q = 0; q < F::arity; ++q) any = any || a.grad[q] != nullptr;
  if (any)
    map_reduce_t<F, St, true>(a);
  else
    map_reduce_t<F, St, false>(a);
}

void map_reduce(const MapReduceArgs& a) {
  switch (a.functor) {
#define GENLOSS_CASE(id, type)       \
  case id:                           \
    if (a.dtype == kFloat32)         \
      map_reduce_g<type, float>(a);  \
    else if (a.dtype == kFloat64)    \
      map_reduce_g<type, double>(a); \
    else if (a.dtype == kBFloat16)   \
      map_reduce_g<type, BF16>(a);   \
    else                             \
      map_reduce_g<type, F16>(a);    \
    return;
    GENLOSS_FUNCTORS(GENLOSS_CASE)
#undef GENLOSS_CASE
    default:
      return;
  }
}

// The simple kernels on any storage type St (float16/bfloat16: loaded to float32, stored back).
template <class St>
void row_scale_t(const RowScaleArgs& a) {
  using T = compute_t<St>;
  const St* x = cptr<St>(a.x);
  const St* coef = cptr<St>(a.coef);
  St* out = ptr<St>(a.out);
  const int64_t n = a.rows * a.cols;
  const T s = T(a.scale);
  const bool acc = a.accumulate != 0;
#pragma omp parallel for schedule(static) num_threads(threads()) if (n >= kParallelMin)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T c = coef ? s * load(coef[r]) : s;
    St* orow = out + r * a.cols;
    if (!x) {  // ones: the row's value broadcast
      for (int64_t j = 0; j < a.cols; ++j) orow[j] = store_as<St>(acc ? load(orow[j]) + c : c);
      continue;
    }
    const St* xr = x + r * a.cols;
    if (acc) {
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) orow[j] = store_as<St>(load(orow[j]) + c * load(xr[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) orow[j] = store_as<St>(c * load(xr[j]));
    }
  }
}

// One of the simple kernels on a.dtype's storage type.
#define GENLOSS_BY_DTYPE(fn, a)      \
  do {                               \
    if ((a).dtype == kFloat32)       \
      fn<float>(a);                  \
    else if ((a).dtype == kFloat64)  \
      fn<double>(a);                 \
    else if ((a).dtype == kBFloat16) \
      fn<BF16>(a);                   \
    else                             \
      fn<F16>(a);                    \
  } while (0)

void row_scale(const RowScaleArgs& a) {
  GENLOSS_BY_DTYPE(row_scale_t, a);
}

template <class St>
void col_sum_t(const ColSumArgs& a) {
  const St* x = cptr<St>(a.x);
  St* out = ptr<St>(a.out);
  // Blocks of columns in parallel; each column sums its rows in order in double.
  constexpr int64_t kColBlock = 64;
  const int64_t nb = ceil_div(a.cols, kColBlock);
#pragma omp parallel for schedule(static) num_threads(threads()) if (a.rows * a.cols >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * kColBlock, j1 = std::min(a.cols, j0 + kColBlock);
    double acc[kColBlock] = {};
    for (int64_t r = 0; r < a.rows; ++r) {
      const St* xr = x + r * a.cols;
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<double>(load(xr[j]));
    }
    for (int64_t j = j0; j < j1; ++j) out[j] = store_as<St>(static_cast<compute_t<St>>(a.scale * acc[j - j0]));
  }
}

void col_sum(const ColSumArgs& a) {
  GENLOSS_BY_DTYPE(col_sum_t, a);
}

template <class St>
void col_broadcast_t(const ColBroadcastArgs& a) {
  using T = compute_t<St>;
  const St* v = cptr<St>(a.v);
  St* out = ptr<St>(a.out);
  const T s = T(a.scale);
  const bool acc = a.accumulate != 0;
#pragma omp parallel for schedule(static) num_threads(threads()) if (a.rows * a.cols >= kParallelMin)
  for (int64_t r = 0; r < a.rows; ++r) {
    St* orow = out + r * a.cols;
    if (acc) {
      for (int64_t j = 0; j < a.cols; ++j) orow[j] = store_as<St>(load(orow[j]) + s * load(v[j]));
    } else {
      for (int64_t j = 0; j < a.cols; ++j) orow[j] = store_as<St>(s * load(v[j]));
    }
  }
}

void col_broadcast(const ColBroadcastArgs& a) {
  GENLOSS_BY_DTYPE(col_broadcast_t, a);
}
#undef GENLOSS_BY_DTYPE

int64_t label_at(const RowLseArgs& a, int64_t r) {
  return a.label_type == kInt32 ? static_cast<const int32_t*>(a.labels)[r] : static_cast<const int64_t*>(a.labels)[r];
}

// One row of the log-sum-exp losses, in double for the row statistics; the math
// (modes, stable form) is ops::LseRow, shared with the CUDA engine.  (GAN.15, GAN.19)
template <class T>
double row_lse_one(const RowLseArgs& a, int64_t r, T* grad) {
  const int64_t K = a.K;
  const T* l = cptr<T>(a.logits) + r * K;
  const bool labeled = a.mode == ops::kLseLabel || a.mode == ops::kLseRealLabel;
  const int64_t target = labeled ? label_at(a, r) : a.index;
  ops::LseRow row;
  for (int64_t k = 0; k < K; ++k) row.max(ops::lse_role(a.mode, k, K, target), static_cast<double>(l[k]));
  for (int64_t k = 0; k < K; ++k) row.add(ops::lse_role(a.mode, k, K, target), static_cast<double>(l[k]));
  const double v = row.finish(a.mode, K);
  if (grad) {
    T* g = grad + r * K;
    for (int64_t k = 0; k < K; ++k)
      g[k] = static_cast<T>(a.grad_scale * row.grad(a.mode, ops::lse_role(a.mode, k, K, target), l[k]));
  }
  return v;
}

template <class T>
void row_lse_t(const RowLseArgs& a) {
  std::vector<double>& buf = scratch(static_cast<size_t>(a.rows));
  double* rowv = buf.data();
  T* grad = ptr<T>(a.grad);
#pragma omp parallel for schedule(static) num_threads(threads()) if (a.rows * a.K >= kParallelMin)
  for (int64_t r = 0; r < a.rows; ++r) rowv[r] = row_lse_one<T>(a, r, grad);
  const double total = pairwise(rowv, a.rows);
  if (a.out_value) {
    T* o = ptr<T>(a.out_value);
    const double prev = a.accumulate ? static_cast<double>(o[0]) : 0.0;
    o[0] = static_cast<T>(prev + a.value_scale * total);
  }
  if (a.out_rows) {
    T* o = ptr<T>(a.out_rows);
    for (int64_t r = 0; r < a.rows; ++r)
      o[r] = static_cast<T>((a.accumulate ? static_cast<double>(o[r]) : 0.0) + a.value_scale * rowv[r]);
  }
}

void row_lse(const RowLseArgs& a) {
  if (a.dtype == kFloat32)
    row_lse_t<float>(a);
  else
    row_lse_t<double>(a);
}

// ---- Gaussian mixtures (VAE.11) -------------------------------------------------

template <class T>
void gmm_t(const GmmArgs& a) {
  const int64_t N = a.N, K = a.K, D = a.D;
  const T* x = cptr<T>(a.x);
  // Per-component constants in double: log pi_k, the normaliser, 1/variance.
  std::vector<double> mu(K * D), iv(K * D), cst(K), logpi(K);
  {
    const T* lg = cptr<T>(a.logits);
    double m = lg[0];
    for (int64_t k = 1; k < K; ++k) m = std::max(m, static_cast<double>(lg[k]));
    double s = 0.0;
    // log softmax shifted by the maximum (ops::lse_shift: a +inf logit is a weight-1
    // component, not inf - inf = NaN).                                   (VAE.11)
    for (int64_t k = 0; k < K; ++k) s += ::exp(ops::lse_shift(static_cast<double>(lg[k]), m));
    const double log_s = ::log(s);
    const double log2pi = 1.8378770664093453;
    for (int64_t k = 0; k < K; ++k) {
      logpi[k] = ops::lse_shift(static_cast<double>(lg[k]), m) - log_s;
      double c = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double lv = static_cast<double>(cptr<T>(a.logvars)[k * D + d]);
        mu[k * D + d] = static_cast<double>(cptr<T>(a.means)[k * D + d]);
        iv[k * D + d] = ::exp(-lv);
        c += log2pi + lv;
      }
      cst[k] = logpi[k] - 0.5 * c;
    }
  }
  const bool pgrad = a.grad_means || a.grad_logvars || a.grad_logits;
  const int64_t nch = ceil_div(N, kGmmChunk);
  const int64_t stride = K + 2 * K * D;  // per chunk: S0[K], U[K*D], V[K*D]
  std::vector<double> part(pgrad ? nch * stride : 0);
  std::vector<double>& rowv = scratch(static_cast<size_t>(N));
  T* gx = ptr<T>(a.grad_x);
  T* resp = ptr<T>(a.resp);
  const T* rw = cptr<T>(a.row_weights);
#pragma omp parallel for schedule(static) num_threads(threads()) if (N * K * D >= kParallelMin)
  for (int64_t c = 0; c < nch; ++c) {
    std::vector<double> lp(K), gxd(D);
    double* S0 = pgrad ? part.data() + c * stride : nullptr;
    double* U = pgrad ? S0 + K : nullptr;
    double* V = pgrad ? U + K * D : nullptr;
    if (pgrad) std::fill(S0, S0 + stride, 0.0);
    const int64_t n1 = std::min(N, (c + 1) * kGmmChunk);
    for (int64_t n = c * kGmmChunk; n < n1; ++n) {
      const T* xn = x + n * D;
      double m = -INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        const double* mk = mu.data() + k * D;
        const double* ik = iv.data() + k * D;
        double q = 0.0;
        // A vectorised sum over d: its order depends only on the ISA build, never
        // on threads, so results stay deterministic run to run.
#pragma omp simd reduction(+ : q)
        for (int64_t d = 0; d < D; ++d) {
          const double diff = static_cast<double>(xn[d]) - mk[d];
          q += diff * diff * ik[d];
        }
        lp[k] = cst[k] - 0.5 * q;
        m = std::max(m, lp[k]);
      }
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += ::exp(lp[k] - m);
      const double ll = m + ::log(s);
      rowv[n] = ll;
      const double w = a.grad_scale * (rw ? static_cast<double>(rw[n]) : 1.0);
      if (gx) std::fill(gxd.begin(), gxd.end(), 0.0);
      if (!gx && !pgrad && !resp) continue;  // value only: no responsibilities needed
      for (int64_t k = 0; k < K; ++k) {
        const double r = ::exp(lp[k] - ll);
        if (resp) resp[n * K + k] = static_cast<T>(r);
        if (!gx && !pgrad) continue;
        const double wr = w * r;
        const double* mk = mu.data() + k * D;
        const double* ik = iv.data() + k * D;
        double* gk = gxd.data();
        if (pgrad) {
          S0[k] += wr;
          double* Uk = U + k * D;
          double* Vk = V + k * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const double diff = static_cast<double>(xn[d]) - mk[d];
            gk[d] -= r * diff * ik[d];
            Uk[d] += wr * diff;
            Vk[d] += wr * diff * diff;
          }
        } else {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) gk[d] -= r * (static_cast<double>(xn[d]) - mk[d]) * ik[d];
        }
      }
      if (gx)
        for (int64_t d = 0; d < D; ++d) gx[n * D + d] = static_cast<T>(w * gxd[d]);
    }
  }
  const double total = pairwise(rowv.data(), N);
  if (a.out_value) ptr<T>(a.out_value)[0] = static_cast<T>(a.value_scale * total);
  if (a.out_rows)
    for (int64_t n = 0; n < N; ++n) ptr<T>(a.out_rows)[n] = static_cast<T>(a.value_scale * rowv[n]);
  if (!pgrad) return;
  // Chunk partials in chunk order: deterministic for any thread count.
  double wsum = 0.0;  // sum_n w_n = sum_k S0_k (responsibilities sum to 1)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < nch; ++c) wsum += part[c * stride + k];
#pragma omp parallel for schedule(static) num_threads(threads()) if (nch * stride >= kParallelMin)
  for (int64_t e = 0; e < stride; ++e) {
    double acc = 0.0;
    for (int64_t c = 0; c < nch; ++c) acc += part[c * stride + e];
    if (e < K) {
      if (a.grad_logits) ptr<T>(a.grad_logits)[e] = static_cast<T>(acc - wsum * ::exp(logpi[e]));
      // grad_logvars needs S0 too: handled with V below.
    } else if (e < K + K * D) {
      const int64_t kd = e - K;
      if (a.grad_means) ptr<T>(a.grad_means)[kd] = static_cast<T>(acc * iv[kd]);
    }
  }
  if (a.grad_logvars) {
    for (int64_t kd = 0; kd < K * D; ++kd) {
      double s0 = 0.0, v = 0.0;
      for (int64_t c = 0; c < nch; ++c) {
        s0 += part[c * stride + kd / D];
        v += part[c * stride + K + K * D + kd];
      }
      ptr<T>(a.grad_logvars)[kd] = static_cast<T>(0.5 * (v * iv[kd] - s0));
    }
  }
}

void gmm(const GmmArgs& a) {
  if (a.dtype == kFloat32)
    gmm_t<float>(a);
  else
    gmm_t<double>(a);
}

}  // namespace

const CpuTable* table() {
  static const CpuTable t{map_reduce, row_scale, col_sum, col_broadcast, row_lse, gmm};
  return &t;
}

}  // namespace GENLOSS_ISA
}  // namespace cpu
}  // namespace genloss
