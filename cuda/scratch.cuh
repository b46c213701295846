// scratch.cuh — what engine.cu and mmd.cu share about launches: per-call scratch
// memory that is freed on every path, and grid sizes that never overflow.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace genloss {
namespace cuda {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("genloss CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// Stream-ordered scratch from the device's default memory pool, released (in stream
// order) when the owner leaves scope, so a failed launch or a throwing check no
// longer leaks it. Still outside torch's caching allocator (issue 16, item 5): a
// call can fail with "out of memory" while torch holds free cached blocks; the
// cure is a workspace allocated by the caller, not done yet.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    // At least one byte: a zero-size request may return null, which reads as "absent".
    check_cuda(cudaMallocAsync(&ptr_, bytes > 0 ? bytes : 1, stream), "scratch alloc");
  }
  ~Scratch() {
    // A destructor cannot throw; a failed free means the context is already broken,
    // and the next call's checks report that.
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// The x-dimension grid limit (2^31 - 1 blocks). Kernels that may need more blocks
// than this loop over their work with a grid stride instead of wrapping around.
constexpr int64_t kMaxGridX = 2147483647;

// Blocks for `work` items of `per_block` each, capped at kMaxGridX; work > 0.
inline unsigned grid_blocks(int64_t work, int64_t per_block) {
  if (work <= 0) throw std::logic_error("genloss CUDA: a launch with no work (empty inputs return early)");
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(b < kMaxGridX ? b : kMaxGridX);
}

// Blocks for a kernel that does NOT loop (one block per fixed slice of the work):
// past kMaxGridX it raises instead of leaving work undone.
inline unsigned grid_exact(int64_t work, int64_t per_block) {
  if (work > 0 && (work + per_block - 1) / per_block > kMaxGridX)
    throw std::length_error("genloss CUDA: input too large for one launch (more than 2^31 - 1 blocks of " +
                            std::to_string(per_block) + ")");
  return grid_blocks(work, per_block);
}

}  // namespace cuda
}  // namespace genloss
