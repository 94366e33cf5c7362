#include "cuda/common.cuh"

namespace mc::cuda {

void throw_cuda_error(cudaError_t status, const char* expr, const char* file, int line) {
  cudaGetLastError();  // clear a sticky launch error so the next call starts clean
  fail(ErrorKind::kUnsupported, "CUDA error ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ") in ", expr,
       " at ", file, ":", line);
}

}  // namespace mc::cuda
