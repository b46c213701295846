// quant_cpu.h — the CPU kernels of the quant family (quant_cpu.cpp, one build per instruction set; cpu_dispatch.cpp
// picks one). Plain pointers and sizes: the checks live in python/genloss/native/quant.py. The math is derived in
// derivations/quant.md (QNT.1-QNT.9).
#pragma once

#include <cstdint>

#include "genloss/common.h"

namespace genloss {
namespace cpu {

// q = sigmoid(x), qm = sigmoid(-x) = 1 - q without cancellation (QNT.7): the per-bit
// probabilities of lfq_entropy; this and bin_entropy: one definition for the CPU kernel and cuda/quant.cu.
GENLOSS_HD void sigmoid2(double x, double& q, double& qm) {
  const double t = gl_exp(-gl_abs(x));
  const double s = 1.0 / (1.0 + t);
  if (x >= 0) {
    q = s;
    qm = t * s;
  } else {
    q = t * s;
    qm = s;
  }
  if (x != x) q = qm = x;  // NaN in, NaN out
}
// binary entropy of sigmoid(x) in nats: log1p(e^-|x|) + |x| sigmoid(-|x|) (QNT.8), finite for every finite x.
GENLOSS_HD double bin_entropy(double x) {
  const double ax = gl_abs(x);
  const double t = gl_exp(-ax);
  return gl_log1p(t) + ax * t / (1.0 + t);
}

// vector_quantize (QNT.1-QNT.4): nearest code per row of z (N, D) among the K rows of codebook, ties to the lowest
// index, without an N x K matrix. Writes z_q (N, D), indices (N, int64), the commitment beta * S / (N D) and the
// codebook term S / (N D) with S = sum_i ||z_i - e_idx(i)||^2 (one element of dtype each) and, when not null, the
// gradients of commitment + codebook term: grad_z = 2 beta (z - z_q) / (N D), grad_codebook (K, D) =
// 2 (count_k e_k - sum_{idx(i) = k} z_i) / (N D).
struct VqArgs {
  int dtype;  // 0 float32, 1 float64
  const void* z;
  const void* codebook;
  int64_t N, K, D;
  double beta;
  void* z_q;
  int64_t* indices;
  void* out_commitment;
  void* out_codebook;
  void* grad_z;         // nullable
  void* grad_codebook;  // nullable
};

// vq_ema_update (QNT.5, QNT.6): cluster_size' = decay cs + (1 - decay) counts, embed_sum' = decay es + (1 - decay)
// sums, codebook = embed_sum' / Laplace-smoothed cluster_size'. Segment sums in a fixed order (bitwise the same for
// every thread count). Throws std::invalid_argument on an index outside [0, K).
struct VqEmaArgs {
  int dtype;
  int index_dtype;  // 0 int64, 1 int32
  const void* z;
  const void* indices;
  int64_t N, K, D;
  const void* cluster_size;
  const void* embed_sum;
  double decay, eps;
  void* out_cluster_size;
  void* out_embed_sum;
  void* out_codebook;
};

// lfq_entropy_loss (QNT.7-QNT.9): sample_weight * mean_i H(p(.|z_i)) - codebook_weight * H(mean_i p(.|z_i)) over the
// 2^d codes, d <= 20. terms (nullable): the two entropies in float64.
struct LfqArgs {
  int dtype;
  const void* z;
  int64_t N, d;
  double inv_temperature, sample_weight, codebook_weight;
  void* out_value;
  double* terms;  // nullable: {mean per-sample entropy, codebook entropy}
  void* grad_z;   // nullable
};

constexpr int64_t kLfqMaxBits = 20;

void vector_quantize(const VqArgs& a);
void vq_ema_update(const VqEmaArgs& a);
void lfq_entropy(const LfqArgs& a);

#define GENLOSS_QUANT_DECLARE(isa)        \
  namespace isa {                         \
  void vector_quantize(const VqArgs& a);  \
  void vq_ema_update(const VqEmaArgs& a); \
  void lfq_entropy(const LfqArgs& a);     \
  }
GENLOSS_QUANT_DECLARE(sse2)
GENLOSS_QUANT_DECLARE(avx2)
GENLOSS_QUANT_DECLARE(avx512)
#undef GENLOSS_QUANT_DECLARE

}  // namespace cpu

// The same kernels on CUDA (cuda/quant.cu; cuda_stub.cpp without nvcc): the Args' pointers are device addresses
// (LfqArgs::terms included), launched on `stream`, capturable in a CUDA graph. vq_ema_update ignores an index
// outside [0, K) (the caller checks them: python/genloss/native/quant.py).
namespace cuda {
void vector_quantize(const cpu::VqArgs& a, void* stream);
void vq_ema_update(const cpu::VqEmaArgs& a, void* stream);
void lfq_entropy(const cpu::LfqArgs& a, void* stream);
}  // namespace cuda
}  // namespace genloss
