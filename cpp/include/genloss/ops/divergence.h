// genloss/ops/divergence.h — per-element (value, derivative) functors of the
// divergence family. Tags (DIV.n) point to derivations/divergence.md. (The MMD
// kernels are pairwise, not per element: cpp/include/genloss/mmd.h.)
#pragma once

#include "genloss/common.h"

namespace genloss {
namespace ops {

// The density ratio of an optimal classifier from its logit: D/(1 - D) = e^l,
// d/dl e^l = e^l. Overflows to +inf exactly where e^l exceeds the type (l > 88.7
// in float32, > 709.8 in float64): the ratio itself is out of range there. (DIV.1)
struct Exp {
  static constexpr int arity = 1;
  template <class T>
  GENLOSS_HD static void eval(T x, const Params<T>&, T& v, T& dx) {
    v = gl_exp(x);
    dx = v;
  }
};

}  // namespace ops
}  // namespace genloss
