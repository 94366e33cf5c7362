// The entry points of cuda_backend.h that need no device: whether CUDA is compiled in, and
// how many devices are visible.
#include <cuda_runtime.h>

#include "cuda/cuda_backend.h"

namespace mc::cuda {

bool compiled() { return true; }

// With static cudart, a missing driver surfaces here as an error code, never at import time.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

}  // namespace mc::cuda
