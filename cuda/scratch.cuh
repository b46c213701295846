// scratch.cuh — what the CUDA kernels share about launches: per-call scratch memory
// that is released on every path, and grid sizes that never overflow.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "genloss/engine.h"  // cuda::Workspace, scratch_round

namespace genloss {
namespace cuda {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("genloss CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// The workspace of the call running on this thread (engine.cu: set by a cuda::Workspace
// in run_one for the duration of one Call; null when the call has none).
WorkspaceArena* current_arena();
// Counts each Scratch that had to fall back to cudaMallocAsync (cuda::scratch_fallbacks()).
void note_scratch_fallback();

// Stream-ordered scratch for the duration of a scope (RAII: released on every path, a
// throwing check or a failed launch included).
//
// Where it comes from (issue 16, item 5): the CALL's WORKSPACE, a uint8 array the
// caller's own allocator made for this call (torch.empty: torch's caching allocator on
// the launch stream, or the CUDA graph's private pool while capturing; cupy.empty for
// CuPy), sized by the kind's pure `*_scratch` function next to its kernel (engine.cu)
// and handed over by run_call (plan.cpp). A Scratch carves its bytes from that arena
// like a stack (kScratchAlign-aligned; released in reverse order of construction, which
// scopes guarantee) — no allocation, no host sync, nothing outside the caller's pool.
// A kind with no size function (its Scratches depend on the launcher's path: mmd, quant,
// knn, ot), or a workspace too small, asks the caller's allocator for one more block per
// Scratch (WorkspaceArena::more, kept until the call returns). Only a call with no
// allocator at all (a Call built with _C.Call and run with _C.run, a DLPack producer that
// is neither torch nor CuPy) falls back to cudaMallocAsync from the device's default
// pool, counted by note_scratch_fallback so tests can see it.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    const size_t need = scratch_round(bytes);  // >= 1 byte: null would read as "absent"
    WorkspaceArena* a = current_arena();
    if (a != nullptr && a->size - a->used >= need) {
      arena_ = a;
      mark_ = a->used;
      ptr_ = a->base + a->used;
      a->used += need;
      return;
    }
    if (a != nullptr && a->more != nullptr) {  // a block of the caller's allocator, kept by the call
      ptr_ = a->more(a->more_ctx, need);
      if (ptr_ != nullptr) {
        borrowed_ = true;
        return;
      }
    }
    note_scratch_fallback();
    check_cuda(cudaMallocAsync(&ptr_, need, stream), "scratch alloc");
  }
  ~Scratch() {
    if (arena_ != nullptr) {
      arena_->used = mark_;  // stream order makes the bytes reusable by the next launch
    } else if (ptr_ != nullptr && !borrowed_) {
      // A destructor cannot throw; a failed free means the context is already broken,
      // and the next call's checks report that.
      (void)cudaFreeAsync(ptr_, stream_);
    }
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
  WorkspaceArena* arena_ = nullptr;
  size_t mark_ = 0;
  bool borrowed_ = false;  // from the caller's allocator (WorkspaceArena::more): the call releases it
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
