// Built instead of cuda/device.cu when the CUDA backend is not compiled.
#include "core/device.h"

namespace mc {

int cuda_device_count() { return 0; }
bool cuda_compiled() { return false; }

}  // namespace mc
