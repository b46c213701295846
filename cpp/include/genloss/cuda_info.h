// genloss/cuda_info.h — what the CUDA engine can use on this machine, probed without
// touching a device (cuda/engine.cu; cpp/src/cuda_stub.cpp without nvcc). Python's
// native/_engine.py turns it into one clear error at the first CUDA input.
#pragma once

namespace genloss {
namespace cuda {

// runtime_version: the CUDA runtime the engine was built against (CUDART_VERSION; 0
// without nvcc). driver_version: the CUDA version the installed driver supports (0: no
// driver). device_count, error: the runtime's answer to "how many devices" (the error's
// text when it failed, e.g. a driver older than the statically linked runtime needs).
struct RuntimeInfo {
  int runtime_version = 0;
  int driver_version = 0;
  int device_count = 0;
  const char* error = "";
};
RuntimeInfo runtime_info();

}  // namespace cuda
}  // namespace genloss
