// bridge.cpp — plan.cpp's way into the emulated CUDA engine. Compiled like the translated
// sources (-Dgenloss=genloss_emulated, emulator.h force-included), so the Args types and the
// dispatch (kinds.h run_cuda) below are the emulated engine's own; plan.cpp hands over its
// Args by address, and the sizes it passes check that both sides agree on their layout.
#include <stdexcept>

#include "kinds.h"

namespace genloss {

void run_emulated(int kind, const void* a, const void* k, size_t a_bytes, size_t k_bytes) {
  if (a_bytes != sizeof(MapReduceArgs) || k_bytes != sizeof(KernelArgs))
    throw std::logic_error("genloss CUDA emulator: the Args layouts of plan.cpp and the emulator differ");
  const cuda::Workspace none(nullptr, 0);  // every Scratch takes host memory (cudaMallocAsync)
  run_cuda(kind, *static_cast<const MapReduceArgs*>(a), *static_cast<const KernelArgs*>(k), nullptr);
}

}  // namespace genloss
