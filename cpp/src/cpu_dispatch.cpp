// cpu_dispatch.cpp — picks, once, the widest instruction-set build of the CPU
// engine that this processor runs (a wheel built here must not assume the
// build machine's -march=native).
#include <cstring>

#include "cpu_config.h"
#include "cpu_table.h"
#include "genloss/engine.h"
#include "genloss/mmd.h"
#include "genloss/ot.h"
#include "knn.h"
#include "quant_cpu.h"

namespace genloss {
namespace cpu {
#define GENLOSS_DECLARE_ENTRIES(isa)    \
  namespace isa {                       \
  void mmd(const MmdArgs& a);           \
  void knn_prdc(const KnnArgs& a);      \
  void sinkhorn(const SinkhornArgs& a); \
  void assignment(const AssignArgs& a); \
  }
GENLOSS_DECLARE_ENTRIES(sse2)
GENLOSS_DECLARE_ENTRIES(avx2)
GENLOSS_DECLARE_ENTRIES(avx512)
#undef GENLOSS_DECLARE_ENTRIES
namespace {

struct Choice {
  const CpuTable* table;
  const char* name;
};

Choice choose() {
  // GENLOSS_ISA=sse2|avx2|avx512 forces a narrower build (tests, benchmarks; read by
  // config.cpp).
  const char* force = *isa_forced() != '\0' ? isa_forced() : nullptr;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (force && std::strcmp(force, "sse2") == 0) return {sse2::table(), "sse2"};
  if (force && std::strcmp(force, "avx2") == 0 && has2) return {avx2::table(), "avx2"};
  if (has512 && !(force && std::strcmp(force, "avx2") == 0)) return {avx512::table(), "avx512"};
  if (has2) return {avx2::table(), "avx2"};
#endif
  (void)force;
  return {sse2::table(), "sse2"};
}

const Choice& chosen() {
  static const Choice c = choose();
  return c;
}

}  // namespace

void map_reduce(const MapReduceArgs& a) {
  chosen().table->map_reduce(a);
}
void row_scale(const RowScaleArgs& a) {
  chosen().table->row_scale(a);
}
void col_sum(const ColSumArgs& a) {
  chosen().table->col_sum(a);
}
void col_broadcast(const ColBroadcastArgs& a) {
  chosen().table->col_broadcast(a);
}
void row_lse(const RowLseArgs& a) {
  chosen().table->row_lse(a);
}
void gmm(const GmmArgs& a) {
  chosen().table->gmm(a);
}
// The kernels with their own entry, outside CpuTable (genloss/mmd.h, knn.h, genloss/ot.h,
// quant_cpu.h): the build of the chosen instruction set, looked up once per entry.
template <class F>
F pick(F f512, F f2, F f1) {
  const char* n = chosen().name;
  return std::strcmp(n, "avx512") == 0 ? f512 : std::strcmp(n, "avx2") == 0 ? f2 : f1;
}
#define GENLOSS_PICK(fn) pick(avx512::fn, avx2::fn, sse2::fn)

void mmd(const MmdArgs& a) {
  static const auto fn = GENLOSS_PICK(mmd);
  fn(a);
}
void knn_prdc(const KnnArgs& a) {
  static const auto fn = GENLOSS_PICK(knn_prdc);
  fn(a);
}
void sinkhorn(const SinkhornArgs& a) {
  static const auto fn = GENLOSS_PICK(sinkhorn);
  fn(a);
}
void assignment(const AssignArgs& a) {
  static const auto fn = GENLOSS_PICK(assignment);
  fn(a);
}
void vector_quantize(const VqArgs& a) {
  static const auto fn = GENLOSS_PICK(vector_quantize);
  fn(a);
}
void vq_ema_update(const VqEmaArgs& a) {
  static const auto fn = GENLOSS_PICK(vq_ema_update);
  fn(a);
}
void lfq_entropy(const LfqArgs& a) {
  static const auto fn = GENLOSS_PICK(lfq_entropy);
  fn(a);
}
#undef GENLOSS_PICK
const char* isa() {
  return chosen().name;
}

}  // namespace cpu
}  // namespace genloss
