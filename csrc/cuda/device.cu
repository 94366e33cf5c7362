#include <cuda_runtime.h>

#include "core/device.h"

namespace mc {

// With static cudart, a missing driver surfaces here as an error code, never at import time.
int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

bool cuda_compiled() { return true; }

}  // namespace mc
