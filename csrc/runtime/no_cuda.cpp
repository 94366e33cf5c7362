// Built instead of the CUDA backend when it is not compiled.
#include "core/error.h"
#include "cuda/cuda_backend.h"

namespace mc::cuda {

bool compiled() { return false; }
int device_count() { return 0; }

std::unique_ptr<Backend> make_backend() {
  fail(ErrorKind::kUnsupported, "this build has no CUDA backend (nvcc was not found, or MC_ENABLE_CUDA=OFF)");
}

}  // namespace mc::cuda
