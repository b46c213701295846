// kinds.h — the kinds of the engine's one Call (plan.cpp), the union of their Args, and the
// dispatch of a call to the CUDA engine. A header so that the CUDA engine's host emulation
// (cuda/emulator/bridge.cpp, compiled in its own namespace) dispatches exactly as plan.cpp.
#pragma once

#include "genloss/engine.h"
#include "genloss/mmd.h"
#include "genloss/ot.h"
#include "knn.h"
#include "quant_cpu.h"

namespace genloss {

enum Kind : int {
  kMapReduce,
  kRowScale,
  kColSum,
  kColBroadcast,
  kRowLse,
  kGmm,
  kMmd,
  kRowMap,
  kVectorQuantize,  // the kernels with their own checks (check_kind) from here on: quant and metrics
  kVqEmaUpdate,
  kLfqEntropy,
  kKnnPrdc,
  kSinkhorn,
  kAssignment,
  kNumKinds
};
const char* const kKindNames[kNumKinds] = {"map_reduce",  "row_scale", "col_sum",  "col_broadcast",   "row_lse",
                                           "gmm",         "mmd",       "row_map",  "vector_quantize", "vq_ema_update",
                                           "lfq_entropy", "knn_prdc",  "sinkhorn", "assignment"};
constexpr bool own_checks(int kind) {  // the kinds check_kind checks
  return kind >= kVectorQuantize;
}
union KernelArgs {  // the Args of a kind other than map_reduce (a union's members start at its start)
  RowScaleArgs row_scale;
  ColSumArgs col_sum;
  ColBroadcastArgs col_broadcast;
  RowLseArgs row_lse;
  GmmArgs gmm;
  MmdArgs mmd;
  RowMapArgs row_map;
  cpu::VqArgs vector_quantize;  // quant_cpu.h
  cpu::VqEmaArgs vq_ema_update;
  cpu::LfqArgs lfq_entropy;
  KnnArgs knn_prdc;       // knn.h
  SinkhornArgs sinkhorn;  // genloss/ot.h
  AssignArgs assignment;
};

// One call on the CUDA engine (the stream is the caller's; the workspace is set by run_one).
inline void run_cuda(int kind, const MapReduceArgs& a, const KernelArgs& k, void* stream) {
  switch (kind) {
    case kMapReduce:
      return cuda::map_reduce(a, stream);
    case kRowScale:
      return cuda::row_scale(k.row_scale, stream);
    case kColSum:
      return cuda::col_sum(k.col_sum, stream);
    case kColBroadcast:
      return cuda::col_broadcast(k.col_broadcast, stream);
    case kRowLse:
      return cuda::row_lse(k.row_lse, stream);
    case kGmm:
      return cuda::gmm(k.gmm, stream);
    case kMmd:
      return cuda::mmd(k.mmd, stream);
    case kRowMap:
      return cuda::row_map(k.row_map, stream);
    case kSinkhorn:  // eps (Call::reals) stays a host array: the loop is driven from the host
      return cuda::sinkhorn(k.sinkhorn, stream);
    case kKnnPrdc:
      return cuda::knn_prdc(k.knn_prdc, stream);
    case kVectorQuantize:
      return cuda::vector_quantize(k.vector_quantize, stream);
    case kVqEmaUpdate:
      return cuda::vq_ema_update(k.vq_ema_update, stream);
    case kLfqEntropy:
      return cuda::lfq_entropy(k.lfq_entropy, stream);
    default:
      return cuda::assignment(k.assignment, stream);
  }
}

}  // namespace genloss
