// Built instead of cuda/device.cu when the CUDA backend is not compiled.
#include "core/backend.h"
#include "core/device.h"
#include "core/error.h"

namespace mc {

int cuda_device_count() { return 0; }
bool cuda_compiled() { return false; }

std::unique_ptr<Backend> make_cuda_backend(const BackendInit&, const ModelWeights&) {
  fail(ErrorKind::kUnsupported, "this build has no CUDA backend (nvcc was not found, or MC_ENABLE_CUDA=OFF)");
}

std::unique_ptr<Backend> make_random_cuda_backend(const BackendInit&, uint64_t) {
  fail(ErrorKind::kUnsupported, "this build has no CUDA backend (nvcc was not found, or MC_ENABLE_CUDA=OFF)");
}

}  // namespace mc
