// knn.h — the tiled k-nearest-neighbour kernel of prdc (cpp/src/knn_cpu.cpp, one build per
// instruction set; cpu_dispatch.cpp picks one; cuda/knn.cu on CUDA; plan.cpp runs it as the Call
// kind "knn_prdc").
//
// Squared distances are sums of squared coordinate differences in float64, d2 = (..((0 + t_0^2)
// + t_1^2) + ..) + t_{D-1}^2 with t = double(a_d) - double(b_d), in this order and without FMA
// contraction (-ffp-contract=off): a NumPy loop over d reproduces every d2 bit for bit, so the
// tie rule (MET.11) is decided on the same numbers in every layer that follows this order.
#pragma once

#include <cstdint>

namespace genloss {

struct KnnArgs {
  int dtype;           // kFloat32 or kFloat64 of genloss/common.h (real and fake alike)
  const void* real;    // (N, D) contiguous
  const void* fake;    // (M, D) contiguous
  int64_t N, M, D, k;  // 1 <= k < N and k < M
  double* real_r2;     // out, N: squared distance to the k-th neighbour in real, self excluded  (MET.10)
  double* fake_r2;     // out, M: the same within fake
  int64_t* counts;     // out, 4: fakes in some real ball, reals in some fake ball, (fake, real-ball) pairs,
                       //         reals whose ball holds a fake  (MET.11-MET.13)
};

namespace cpu {
void knn_prdc(const KnnArgs& a);
}

namespace cuda {
// The same radii (bit for bit) and counts on the device; every pointer of a is device memory, launched
// on `stream` (a cudaStream_t), no host synchronisation (capturable in a CUDA graph).
void knn_prdc(const KnnArgs& a, void* stream);
}  // namespace cuda

}  // namespace genloss
