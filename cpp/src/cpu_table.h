// cpu_table.h — the entry points one instruction-set build of cpu_kernels.cpp
// exports; cpu_dispatch.cpp picks one table at run time.
#pragma once

#include "genloss/engine.h"

namespace genloss {
namespace cpu {

struct CpuTable {
  void (*map_reduce)(const MapReduceArgs&);
  void (*row_scale)(const RowScaleArgs&);
  void (*col_sum)(const ColSumArgs&);
  void (*col_broadcast)(const ColBroadcastArgs&);
  void (*row_lse)(const RowLseArgs&);
  void (*gmm)(const GmmArgs&);
};

#define GENLOSS_DECLARE_ISA(name) \
  namespace name {                \
  const CpuTable* table();        \
  }
GENLOSS_DECLARE_ISA(sse2)
GENLOSS_DECLARE_ISA(avx2)
GENLOSS_DECLARE_ISA(avx512)
#undef GENLOSS_DECLARE_ISA

}  // namespace cpu
}  // namespace genloss
