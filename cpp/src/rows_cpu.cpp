// rows_cpu.cpp — the CPU loop of row_map (engine.h RowMapArgs): a few float64 operations
// per sample, so one plain build serves every CPU (no ISA variants, unlike cpu_kernels.cpp).
#include <stdexcept>

#include "genloss/engine.h"

namespace genloss {
namespace cpu {
namespace {

template <class S>
void row_map_t(const RowMapArgs& a) {
  switch (a.functor) {
#define GENLOSS_CASE(id, type)                                      \
  case id:                                                          \
    for (int64_t r = 0; r < a.rows; ++r) row_map_at<type, S>(a, r); \
    return;
    GENLOSS_ROW_FUNCTORS(GENLOSS_CASE)
#undef GENLOSS_CASE
    default:
      throw std::invalid_argument("unknown row functor");
  }
}

}  // namespace

void row_map(const RowMapArgs& a) {
  if (a.dtype == kFloat64) return row_map_t<double>(a);
  if (a.dtype == kFloat32) return row_map_t<float>(a);
  throw std::invalid_argument("dtype must be float32 or float64");
}

}  // namespace cpu
}  // namespace genloss
