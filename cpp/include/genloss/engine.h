// genloss/engine.h — the interface of the ONE CPU engine and the ONE CUDA engine.
//
// Every loss is built from these few primitives, each run for any functor of
// ops/*.h.  The argument structs carry raw pointers (contiguous, row-major),
// sizes and scalars; Python (python/genloss/native/_engine.py) fills them from
// any DLPack array, by name: each struct is a kind of the one typed call,
// genloss._C.Call (cpp/src/plan.cpp names every field).  Reductions are deterministic: the work is cut into fixed
// chunks whose partial sums are combined in a fixed pairwise order, so the
// result is bitwise the same for any thread count (CPU) or grid (CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "genloss/common.h"
#include "genloss/ops/diffusion.h"
#include "genloss/ops/divergence.h"
#include "genloss/ops/flow.h"
#include "genloss/ops/gan.h"
#include "genloss/ops/vae.h"

namespace genloss {

// Which engine calls each native op is composed of (python/genloss/native/):
//   gan_d_loss, gan_g_loss, jsd_estimate     map_reduce SoftplusNeg / Softplus
//   lsgan_d_loss, lsgan_g_loss               map_reduce HalfSquare
//   wgan_critic_loss, wgan_g_loss,
//   hinge_g_loss                             map_reduce Linear (sign in the scale)
//   hinge_d_loss                             map_reduce HingeRelu
//   relativistic_d_loss, relativistic_g_loss map_reduce Linear (means), SoftplusNeg /
//                                            Softplus with the other mean; SoftplusNegDiff
//   gradient_penalty_from_grads              map_reduce Square (rows), GradPenaltyOfSqNorm,
//                                            row_scale
//   r1_penalty_from_grads                    map_reduce Square
//   feature_matching_loss                    col_sum, map_reduce SquaredDiff, col_broadcast
//   ssgan_critic_loss, ssgan_g_loss          row_lse modes 0, 1, 2
//   l1_loss, pix2pix_g_loss,
//   cycle_consistency_loss                   map_reduce AbsDiff (+ SoftplusNeg for pix2pix)
//   fgan_d_loss, fgan_g_loss                 map_reduce FganActivation / FganConjugate
//   gaussian_kl                              map_reduce GaussianKL
//   normal_kl                                map_reduce NormalKL (elementwise output)
//   bernoulli_nll                            map_reduce BernoulliNLL
//   gaussian_nll                             map_reduce GaussianNLL
//   negative_elbo                            map_reduce BernoulliNLL / GaussianNLL(Unit)
//                                            + GaussianKL, accumulated per sample
//   iwae_bound                               row_lse mode 3
//   gmm_log_likelihood, gmm_responsibilities gmm
//   q_sample, v_target, predict_x0_from_eps,
//   posterior_mean_from_eps, q_posterior     map_reduce RowAffine (schedule table, elementwise)
//   eps_mse_loss, vdm_continuous_loss,
//   vdm_discrete_loss                        map_reduce SquaredDiff with row weights
//                                            (row_map VdmDiscreteRows, VdmDiscreteGrads)
//   diffusion_mse_loss                       map_reduce DiffusionMSE (schedule table, row weights)
//   discretized_gaussian_log_likelihood      map_reduce DiscretizedGaussianLL (elementwise)
//   vlb_term                                 map_reduce VlbKL / VlbKLLearned, rows with t = 0
//                                            their Alt, VlbDecoder
//   prior_kl                                 map_reduce PriorKL
//   density_ratio_from_logits                map_reduce Exp (elementwise)
//   mmd2                                     the tiled pairwise kernels of mmd.h
//   denoiser_loss                            row_map DenoiserRows, map_reduce DiffusionMSE
//                                            (+ DenoiserSigmaDot, row_map DenoiserGrads)
//   flow_matching_loss with lambda(t)        row_map FlowWeightRows, map_reduce
//                                            FlowMatchingMSE (+ row_map FlowWeightGrads)
//   consistency_training_loss                row_map CtWeight, map_reduce SquaredDiff,
//                                            PseudoHuberOfSqNorm
//   meanflow_loss                            row_map MeanflowRows, MeanflowWeight,
//                                            map_reduce DiffusionMSE (twice)
//   vsd_loss                                 map_reduce AbsDiff, row_map VsdRows,
//                                            map_reduce SquaredDiff, RowAffine
//   flow_interpolant                         row_map InterpolantRows, map_reduce RowAffine
//   scm_loss                                 row_map ScmRows, RowAffine (G, H), SquaredDiff
//                                            (row_map SqrtRows: ||g||), DiffusionMSE,
//                                            row_map UncertaintyRows with logvar
//
// X-macro of every functor the engines instantiate: (enum id, type).
#define GENLOSS_FUNCTORS(X)                             \
  X(kSoftplusNeg, ops::SoftplusNeg)                     \
  X(kSoftplus, ops::Softplus)                           \
  X(kHalfSquare, ops::HalfSquare)                       \
  X(kLinear, ops::Linear)                               \
  X(kHingeRelu, ops::HingeRelu)                         \
  X(kSquare, ops::Square)                               \
  X(kGradPenaltyOfSqNorm, ops::GradPenaltyOfSqNorm)     \
  X(kAbsDiff, ops::AbsDiff)                             \
  X(kSquaredDiff, ops::SquaredDiff)                     \
  X(kSoftplusNegDiff, ops::SoftplusNegDiff)             \
  X(kFganActivation, ops::FganActivation)               \
  X(kFganConjugate, ops::FganConjugate)                 \
  X(kGaussianKL, ops::GaussianKL)                       \
  X(kBernoulliNLL, ops::BernoulliNLL)                   \
  X(kGaussianNLL, ops::GaussianNLL)                     \
  X(kGaussianNLLUnit, ops::GaussianNLLUnit)             \
  X(kNormalKL, ops::NormalKL)                           \
  X(kRowAffine, ops::RowAffine)                         \
  X(kDiffusionMSE, ops::DiffusionMSE)                   \
  X(kDiscretizedGaussianLL, ops::DiscretizedGaussianLL) \
  X(kVlbKL, ops::VlbKL)                                 \
  X(kVlbKLLearned, ops::VlbKLLearned)                   \
  X(kPriorKL, ops::PriorKL)                             \
  X(kExp, ops::Exp)                                     \
  X(kFlowMatchingMSE, ops::FlowMatchingMSE)             \
  X(kPseudoHuberOfSqNorm, ops::PseudoHuberOfSqNorm)     \
  X(kDenoiserSigmaDot, ops::DenoiserSigmaDot)

enum FunctorId : int {
#define GENLOSS_ENUM(id, type) id,
  GENLOSS_FUNCTORS(GENLOSS_ENUM)
#undef GENLOSS_ENUM
      kNumFunctors
};

// The parameter names of functor F (its ``params`` member; none declared: no parameters).
template <class F, class = void>
struct declares_params : std::false_type {};
template <class F>
struct declares_params<F, std::void_t<decltype(F::params)>> : std::true_type {};
template <class F>
constexpr ParamNames param_names() {
  if constexpr (declares_params<F>::value) {
    return F::params;
  } else {
    return ParamNames{};
  }
}

// Elements per chunk of a reduction: fixed, so results do not depend on threads.
constexpr int64_t kChunk = 4096;

// Up to this many inputs per functor (x, y, z, w).
constexpr int kMaxArity = 4;

// Calls a functor of any arity on arrays of inputs and derivatives. Unary and
// binary functors take scalars (the common case reads best); arity >= 3 take
// arrays.
template <class F, class T>
GENLOSS_HD void eval_n(const T* x, const Params<T>& p, T& v, T* d) {
  if constexpr (F::arity == 1) {
    F::eval(x[0], p, v, d[0]);
  } else if constexpr (F::arity == 2) {
    F::eval(x[0], x[1], p, v, d[0], d[1]);
  } else {
    F::eval(x, p, v, d);
  }
}

// A functor may name an alternative functor (``using Alt = ...``, same arity)
// and the index of a flag in its per-row parameters (``alt_flag``): rows whose
// flag is nonzero run Alt instead (vlb_term's decoder term at t = 0). The
// choice is per row, so a chunk never evaluates both.
template <class F, class = void>
struct has_alt {
  static constexpr bool value = false;
};
template <class F>
struct has_alt<F, std::void_t<typename F::Alt>> {
  static constexpr bool value = true;
};

// map_reduce: for inputs in[0..arity) viewed as (rows, cols),
//   value_r = sum_j f(in[.][r, j])
//   total   = sum_r value_r                        (pairwise, fixed order)
//   out_value[0] = (accumulate ? out_value[0] : 0) + value_scale * total
//   out_rows[r]  = (accumulate ? out_rows[r] : 0) + value_scale * value_r
//   out_elems[r, j] = value_scale * f(...)         (elementwise value, if set)
//   grad[a][r, j] = grad_scale * df/din[a] + grad_offset  (each may be null)
//   totals[0] = total, totals[1] = sum of df/din[0] (if totals; host doubles; the
//   derivative sum only when a gradient is written)
// Per-row extensions (each optional; any of them makes the work row-major):
//   table:  (table_rows, table_stride) float64 parameters (whatever the dtype);
//           row r's functor sees p.rp = table + stride * (index ? index[r] : r)
//           (index int64/int32, validated by the caller)
//   row_weight: rows values of the storage dtype; w_r multiplies row r's value,
//           elementwise values and gradients (value_r above becomes w_r value_r)
//   out_rows_raw[r] = value_scale * sum_j f(...)   (without w_r)
// Scalars kept where the data is (each optional; pointers to doubles in the inputs'
// memory, host or device), so that a step that needs the previous step's totals makes
// no host round trip (a CUDA stream never waits; a graph can capture it):
//   totals_out[0..1] = the totals above, written by the kernel itself
//   param_from:  the functor's FIRST parameter = param_scale * param_from[0]
//   offset_from: grad_offset = offset_scale * offset_from[0]
//
// pa, pb, pc, mode are the slots of the functor's Params; callers never fill them
// by position: genloss._C.Call takes parameters by the names the functor declares
// (ParamNames, ops/*.h) and is the one way Python reaches map_reduce (cpp/src/plan.cpp).
struct MapReduceArgs {
  int functor;
  double pa, pb, pc;
  int mode;
  int dtype;
  const void* in[kMaxArity];
  void* grad[kMaxArity];
  int64_t rows, cols;
  double value_scale;
  void* out_value;  // one element of dtype, may be null
  int accumulate;
  void* out_rows;   // rows elements of dtype, may be null
  void* out_elems;  // rows * cols elements of dtype, may be null
  double grad_scale, grad_offset;
  double* totals;  // host, may be null (CUDA: synchronises the stream)
  const void* table;
  int64_t table_rows;
  int table_stride;
  const void* index;
  int index_type;
  const void* row_weight;
  void* out_rows_raw;
  double* totals_out;
  const double* param_from;
  double param_scale;
  const double* offset_from;
  double offset_scale;
  // out_value and out_rows hold float32 instead of dtype: a float16/bfloat16 call whose loss
  // is returned in float32 (genloss.torch's bfloat16 pass-through). The other outputs keep dtype.
  int value_f32;
};

// The functor's first parameter and the gradient offset, read where the kernel runs.
GENLOSS_HD double first_param(const MapReduceArgs& a) {
  return a.param_from ? a.param_scale * a.param_from[0] : a.pa;
}
GENLOSS_HD double grad_offset_of(const MapReduceArgs& a) {
  return a.offset_from ? a.offset_scale * a.offset_from[0] : a.grad_offset;
}

// out[r, j] = scale * coef[r] * x[r, j]   (coef may be null: out = scale * x; x may be null:
//           (+ out[r, j] if accumulate)      read as ones, out = scale * coef[r], a per-row broadcast)
struct RowScaleArgs {
  int dtype;
  const void* x;
  const void* coef;
  void* out;
  int64_t rows, cols;
  double scale;
  int accumulate;
};

// out[j] = scale * sum_r x[r, j]   (fixed row order per column, double accumulator)
struct ColSumArgs {
  int dtype;
  const void* x;
  void* out;
  int64_t rows, cols;
  double scale;
};

// out[r, j] = scale * v[j]   (+ out[r, j] if accumulate)
struct ColBroadcastArgs {
  int dtype;
  const void* v;
  void* out;
  int64_t rows, cols;
  double scale;
  int accumulate;
};

// Row-wise log-sum-exp losses over logits (rows, K):                  (GAN.15)
//   mode 0: lse(l) - l[labels[r]]         (cross-entropy; labels required)
//   mode 1: lse(l) - l[index]             (a fixed class)
//   mode 2: lse(l) - lse(l[:K-1])         (-log(1 - p_last))
//   mode 3: lse(l) - log K                (the IWAE bound; target 0)  (VAE.10)
// d/dl = softmax(l) - target, target = onehot(label), onehot(index) or
// softmax over the first K-1 entries (0 for the last).
struct RowLseArgs {
  int dtype;
  const void* logits;
  const void* labels;  // mode 0
  int label_type;
  int mode;
  int64_t index;
  int64_t rows, K;
  double value_scale;
  void* out_value;
  int accumulate;
  void* out_rows;
  double grad_scale;
  void* grad;
};

// Diagonal Gaussian mixture, fused over N x K x D; no N x K x D intermediate.
//                                                                    (VAE.11)
//   lp[n, k] = log softmax(logits)_k - 1/2 sum_d (log 2 pi + lv[k, d]
//              + (x[n, d] - mu[k, d])^2 e^{-lv[k, d]})
//   ll[n]    = lse_k lp[n, k];  r[n, k] = exp(lp[n, k] - ll[n])
//   out_value = value_scale * sum_n ll[n];  out_rows[n] = value_scale * ll[n]
// and with weights w_n = grad_scale * (row_weights ? row_weights[n] : 1):
//   grad_x[n, d]      = w_n sum_k r[n, k] (mu[k, d] - x[n, d]) e^{-lv[k, d]}
//   grad_means[k, d]  = sum_n w_n r[n, k] (x[n, d] - mu[k, d]) e^{-lv[k, d]}
//   grad_logvars[k,d] = sum_n w_n r[n, k] 1/2 ((x - mu)^2 e^{-lv} - 1)
//   grad_logits[k]    = sum_n w_n (r[n, k] - softmax(logits)_k)
// Sums over n use fixed chunks of points combined in chunk order.
struct GmmArgs {
  int dtype;
  const void* x;
  const void* logits;
  const void* means;
  const void* logvars;
  int64_t N, K, D;
  double value_scale;
  void* out_value;
  void* out_rows;
  void* resp;               // (N, K) responsibilities, may be null
  const void* row_weights;  // (N,), may be null
  double grad_scale;
  void* grad_x;
  void* grad_logits;
  void* grad_means;
  void* grad_logvars;
};

// Per-row coefficients by a row functor (ops/flow.h, ops/diffusion.h): for r < rows,
//   (table[r, 0..F::n_table), out_j[r]) = F(x0[r], x1[r], ...)
// computed in float64 from inputs of the call's dtype (float32/float64), or float64 where
// bit q of `wide` is set (a per-sample float64 value an earlier step made); an absent input
// reads as F::fallback(q); the table in float64, each out_j rounded to the dtype (each
// output may be null). B numbers: what a composition needs per sample, made by the engine
// so that it is engine calls only (a plan replays it).
#define GENLOSS_ROW_FUNCTORS(X)               \
  X(kDenoiserRows, ops::DenoiserRows)         \
  X(kDenoiserGrads, ops::DenoiserGrads)       \
  X(kFlowWeightRows, ops::FlowWeightRows)     \
  X(kFlowWeightGrads, ops::FlowWeightGrads)   \
  X(kCtWeight, ops::CtWeight)                 \
  X(kMeanflowRows, ops::MeanflowRows)         \
  X(kMeanflowWeight, ops::MeanflowWeight)     \
  X(kVsdRows, ops::VsdRows)                   \
  X(kInterpolantRows, ops::InterpolantRows)   \
  X(kVdmDiscreteRows, ops::VdmDiscreteRows)   \
  X(kVdmDiscreteGrads, ops::VdmDiscreteGrads) \
  X(kSqrtRows, ops::SqrtRows)                 \
  X(kScmRows, ops::ScmRows)                   \
  X(kUncertaintyRows, ops::UncertaintyRows)

enum RowFunctorId : int {
#define GENLOSS_ENUM(id, type) id,
  GENLOSS_ROW_FUNCTORS(GENLOSS_ENUM)
#undef GENLOSS_ENUM
      kNumRowFunctors
};

struct RowMapArgs {
  int dtype;
  int functor;  // RowFunctorId
  double a, b, c;
  int mode;
  const void* x0;
  const void* x1;
  const void* x2;
  const void* x3;
  int wide;  // bit q: input q is float64 whatever the dtype
  int64_t rows;
  double* table;  // (rows, F::n_table), may be null
  void* out0;
  void* out1;
};

// Row r of a row_map on storage type S (float or double): the one body of the CPU loop and
// the CUDA kernel.
template <class F, class S>
GENLOSS_HD void row_map_at(const RowMapArgs& a, int64_t r) {
  const Params<double> p{a.a, a.b, a.c, a.mode, nullptr};
  const void* const xs[kMaxArity] = {a.x0, a.x1, a.x2, a.x3};
  double in[kMaxArity] = {0.0, 0.0, 0.0, 0.0};
  for (int q = 0; q < F::n_in; ++q) {
    if (xs[q] == nullptr)
      in[q] = F::fallback(q);
    else
      in[q] = (a.wide >> q) & 1 ? static_cast<const double*>(xs[q])[r] : double(static_cast<const S*>(xs[q])[r]);
  }
  double tab[ops::kMaxRowTable] = {0.0, 0.0, 0.0, 0.0}, out[ops::kMaxRowOut] = {0.0, 0.0};
  F::eval(in, p, tab, out);
  if (a.table)
    for (int j = 0; j < F::n_table; ++j) a.table[r * F::n_table + j] = tab[j];
  if (F::n_out > 0 && a.out0) static_cast<S*>(a.out0)[r] = S(out[0]);
  if (F::n_out > 1 && a.out1) static_cast<S*>(a.out1)[r] = S(out[1]);
}

namespace cpu {
void map_reduce(const MapReduceArgs& a);
void row_scale(const RowScaleArgs& a);
void col_sum(const ColSumArgs& a);
void col_broadcast(const ColBroadcastArgs& a);
void row_lse(const RowLseArgs& a);
void gmm(const GmmArgs& a);
void row_map(const RowMapArgs& a);
// The CPU engine's tuning, runtime settings and test hooks: cpp/src/cpu_config.h.
}  // namespace cpu

namespace cuda {
bool built();  // false when compiled without nvcc
void map_reduce(const MapReduceArgs& a, void* stream);
void row_scale(const RowScaleArgs& a, void* stream);
void col_sum(const ColSumArgs& a, void* stream);
void col_broadcast(const ColBroadcastArgs& a, void* stream);
void row_lse(const RowLseArgs& a, void* stream);
void gmm(const GmmArgs& a, void* stream);
void row_map(const RowMapArgs& a, void* stream);

// ---- The call's workspace (issue 16, item 5) -----------------------------------------
// A CUDA kernel's scratch comes from a workspace the CALLER allocated for the call with
// its own allocator (torch's caching allocator, CuPy's pool: _engine.py's workspace
// allocators), never from a per-call cudaMalloc. Each kind that takes scratch reports
// how many bytes it needs for its Args (a pure function of the sizes and of which
// outputs are asked for, defined next to its kernel in engine.cu; 0 without nvcc);
// run_call (plan.cpp) asks the caller's allocator for that many bytes and runs the
// call inside a Workspace, from which cuda::Scratch (cuda/scratch.cuh) carves.
constexpr size_t kScratchAlign = 256;
// The bytes one Scratch of `bytes` takes from a workspace: at least 1, kScratchAlign-rounded.
constexpr size_t scratch_round(size_t bytes) {
  return ((bytes > 0 ? bytes : 1) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}
size_t map_reduce_scratch(const MapReduceArgs& a);
size_t col_sum_scratch(const ColSumArgs& a);
size_t row_lse_scratch(const RowLseArgs& a);
size_t gmm_scratch(const GmmArgs& a);
// A kind without a size function (mmd, quant, knn, ot: their Scratches depend on the
// path the launcher takes) still takes its scratch from the caller: `more` asks the
// caller's allocator for one block per Scratch that the workspace cannot serve
// (plan.cpp: alloc(device_id, nbytes) with the GIL taken for that moment; the block is
// kept until the call returns). Null `more`: such a Scratch falls back to cudaMallocAsync.
using ScratchMore = void* (*)(void* ctx, size_t bytes);
struct WorkspaceArena {
  char* base = nullptr;
  size_t size = 0;
  size_t used = 0;  // a stack: each Scratch gives its bytes back when it leaves scope
  ScratchMore more = nullptr;
  void* more_ctx = nullptr;
};
// Makes [base, base + bytes) this thread's workspace for its lifetime (null and no `more`:
// none, every Scratch then falls back to cudaMallocAsync), and restores the previous one after.
class Workspace {
 public:
  Workspace(void* base, size_t bytes, ScratchMore more = nullptr, void* more_ctx = nullptr);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

 private:
  WorkspaceArena arena_;
  WorkspaceArena* previous_ = nullptr;
};
// How many Scratches fell back to cudaMallocAsync in this process (tests: a call through
// run_call with a workspace allocator never does).
int64_t scratch_fallbacks();

// Makes `device` current for the guard's lifetime and gives the caller back its own
// current device after (on error paths too): a call on cuda:1 must not leave a
// multi-GPU program allocating on cuda:1.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;  // -1: nothing to restore
};
}  // namespace cuda

}  // namespace genloss
