// Dense projections through cuBLAS: y[T, N] = x[T, K] · w[N, K]ᵀ (the nn.Linear convention),
// half-precision operands, f32 accumulation, output in half or f32 (logits).
//
// cuBLAS is opened at run time (dlopen of libcublas.so.13: already loaded by a CUDA build of
// torch, else found on the library path or in the nvidia-cublas wheel, see MC_CUBLAS_LIBRARY),
// so that importing the package never needs it and a CPU-only machine never loads it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace mc::cuda {

class Gemm {
 public:
  Gemm();  // loads cuBLAS and creates a handle; throws mc::Error naming what is missing
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // x, w: `in` dtype (bf16 or f16); y: `out` dtype (the same, or f32).
  void linear(const void* x, const void* w, void* y, int64_t T, int64_t N, int64_t K, DType in, DType out,
              cudaStream_t stream);

 private:
  void* handle_ = nullptr;
};

}  // namespace mc::cuda
