// stub.cpp — the CUDA entry points when genloss is built without nvcc: every
// call raises a clear error (Python checks cuda::built() first).
#include <stdexcept>

#include "genloss/cuda_info.h"
#include "genloss/engine.h"
#include "genloss/mmd.h"
#include "genloss/ot.h"
#include "knn.h"
#include "quant_cpu.h"

namespace genloss {
namespace cuda {
namespace {
[[noreturn]] void unavailable() {
  throw std::runtime_error("genloss was built without CUDA (nvcc was not found at build time)");
}
}  // namespace
bool built() {
  return false;
}
RuntimeInfo runtime_info() {
  return {};
}
DeviceGuard::DeviceGuard(int) {
  unavailable();
}
DeviceGuard::~DeviceGuard() = default;
void map_reduce(const MapReduceArgs&, void*) {
  unavailable();
}
void row_scale(const RowScaleArgs&, void*) {
  unavailable();
}
void col_sum(const ColSumArgs&, void*) {
  unavailable();
}
void col_broadcast(const ColBroadcastArgs&, void*) {
  unavailable();
}
void row_lse(const RowLseArgs&, void*) {
  unavailable();
}
void gmm(const GmmArgs&, void*) {
  unavailable();
}
void row_map(const RowMapArgs&, void*) {
  unavailable();
}
void mmd(const MmdArgs&, void*) {
  unavailable();
}
void sinkhorn(const SinkhornArgs&, void*) {
  unavailable();
}
void assignment(const AssignArgs&, void*) {
  unavailable();
}
void knn_prdc(const KnnArgs&, void*) {
  unavailable();
}
void vector_quantize(const cpu::VqArgs&, void*) {
  unavailable();
}
void vq_ema_update(const cpu::VqEmaArgs&, void*) {
  unavailable();
}
void lfq_entropy(const cpu::LfqArgs&, void*) {
  unavailable();
}
size_t map_reduce_scratch(const MapReduceArgs&) {
  return 0;
}
size_t col_sum_scratch(const ColSumArgs&) {
  return 0;
}
size_t row_lse_scratch(const RowLseArgs&) {
  return 0;
}
size_t gmm_scratch(const GmmArgs&) {
  return 0;
}
Workspace::Workspace(void*, size_t, ScratchMore, void*) {}
Workspace::~Workspace() = default;
int64_t scratch_fallbacks() {
  return 0;
}
}  // namespace cuda
}  // namespace genloss
