// cpu_dispatch.cpp — picks, once, the widest instruction-set build of the CPU
// engine that this processor runs (a wheel built here must not assume the
// build machine's -march=native).
#include <cstring>

#include "cpu_config.h"
#include "cpu_table.h"
#include "genloss/engine.h"
#include "genloss/mmd.h"

namespace genloss {
namespace cpu {
namespace sse2 {
void mmd(const MmdArgs& a);
}
namespace avx2 {
void mmd(const MmdArgs& a);
}
namespace avx512 {
void mmd(const MmdArgs& a);
}
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
void mmd(const MmdArgs& a) {  // genloss/mmd.h: its own entry, outside CpuTable
  static void (*const fn)(const MmdArgs&) = std::strcmp(chosen().name, "avx512") == 0 ? avx512::mmd
                                            : std::strcmp(chosen().name, "avx2") == 0 ? avx2::mmd
                                                                                      : sse2::mmd;
  fn(a);
}
const char* isa() {
  return chosen().name;
}

}  // namespace cpu
}  // namespace genloss
