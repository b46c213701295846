// bindings_quant.cpp — genloss._C bindings of the quant family (vector_quantize, vq_ema_update, lfq_entropy_loss).
// Thin: Python ints (pointers, sizes) into the argument structs of quant_cpu.h, the CPU kernel called with the GIL
// released. CPU only this release; validation lives in python/genloss/native/quant.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "address.h"
#include "quant_cpu.h"

namespace py = pybind11;

namespace {

void check_dtype(const char* op, int dtype) {
  if (dtype != 0 && dtype != 1) throw py::type_error(std::string(op) + ": the CPU kernel takes float32 or float64");
}

void vector_quantize(int dtype, std::uintptr_t z, std::uintptr_t codebook, int64_t N, int64_t K, int64_t D, double beta,
                     std::uintptr_t z_q, std::uintptr_t indices, std::uintptr_t out_commitment,
                     std::uintptr_t out_codebook, std::uintptr_t grad_z, std::uintptr_t grad_codebook) {
  check_dtype("vector_quantize", dtype);
  if (N < 1 || K < 1 || D < 1) throw py::value_error("vector_quantize: empty input");
  genloss::cpu::VqArgs a{dtype,
                         P(z),
                         P(codebook),
                         N,
                         K,
                         D,
                         beta,
                         P(z_q),
                         static_cast<int64_t*>(P(indices)),
                         P(out_commitment),
                         P(out_codebook),
                         P(grad_z),
                         P(grad_codebook)};
  py::gil_scoped_release nogil;
  genloss::cpu::vector_quantize(a);
}

void vq_ema_update(int dtype, int index_dtype, std::uintptr_t z, std::uintptr_t indices, int64_t N, int64_t K,
                   int64_t D, std::uintptr_t cluster_size, std::uintptr_t embed_sum, double decay, double eps,
                   std::uintptr_t out_cluster_size, std::uintptr_t out_embed_sum, std::uintptr_t out_codebook) {
  check_dtype("vq_ema_update", dtype);
  if (K < 1 || D < 1 || N < 0) throw py::value_error("vq_ema_update: empty codebook");
  genloss::cpu::VqEmaArgs a{dtype,
                            index_dtype,
                            P(z),
                            P(indices),
                            N,
                            K,
                            D,
                            P(cluster_size),
                            P(embed_sum),
                            decay,
                            eps,
                            P(out_cluster_size),
                            P(out_embed_sum),
                            P(out_codebook)};
  try {
    py::gil_scoped_release nogil;
    genloss::cpu::vq_ema_update(a);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("vq_ema_update: ") + e.what());
  }
}

void lfq_entropy(int dtype, std::uintptr_t z, int64_t N, int64_t d, double inv_temperature, double sample_weight,
                 double codebook_weight, std::uintptr_t out_value, std::uintptr_t terms, std::uintptr_t grad_z) {
  check_dtype("lfq_entropy_loss", dtype);
  if (N < 1 || d < 1 || d > genloss::cpu::kLfqMaxBits) throw py::value_error("lfq_entropy_loss: N >= 1, 1 <= d <= 20");
  genloss::cpu::LfqArgs a{dtype,
                          P(z),
                          N,
                          d,
                          inv_temperature,
                          sample_weight,
                          codebook_weight,
                          P(out_value),
                          static_cast<double*>(P(terms)),
                          P(grad_z)};
  py::gil_scoped_release nogil;
  genloss::cpu::lfq_entropy(a);
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def("vector_quantize", &vector_quantize);
  m.def("vq_ema_update", &vq_ema_update);
  m.def("lfq_entropy", &lfq_entropy);
  m.attr("LFQ_MAX_BITS") = genloss::cpu::kLfqMaxBits;
}
