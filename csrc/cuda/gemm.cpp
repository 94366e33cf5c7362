#include "cuda/gemm.h"

#include <dlfcn.h>

#include <cstdlib>
#include <library_types.h>
#include <mutex>
#include <string>

#include "core/error.h"

namespace mc::cuda {
namespace {

// The slice of the cuBLAS C API this file uses, declared here because cuBLAS is opened at run
// time (its stable ABI: cublas_api.h of CUDA 13). Values checked against that header.
using cublasHandle = void*;
using cublasStatus = int;
constexpr int kCublasOpN = 0;
constexpr int kCublasOpT = 1;
constexpr int kCublasCompute32F = 68;
constexpr int kCublasGemmDefault = -1;

struct CublasApi {
  cublasStatus (*create)(cublasHandle*) = nullptr;
  cublasStatus (*destroy)(cublasHandle) = nullptr;
  cublasStatus (*set_stream)(cublasHandle, cudaStream_t) = nullptr;
  cublasStatus (*gemm_ex)(cublasHandle, int, int, int, int, int, const void*, const void*, cudaDataType, int,
                          const void*, cudaDataType, int, const void*, void*, cudaDataType, int, int, int) = nullptr;
};

void* open_cublas() {
  // An explicit path first, then whatever the process already loaded (a CUDA build of torch
  // loads it) or the library path finds.
  if (const char* path = std::getenv("MC_CUBLAS_LIBRARY")) {
    if (void* lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL)) return lib;
    fail(ErrorKind::kUnsupported, "cannot load cuBLAS from MC_CUBLAS_LIBRARY=", path, ": ", dlerror());
  }
  if (void* lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL)) return lib;
  fail(ErrorKind::kUnsupported, "cannot load libcublas.so.13 (", dlerror(),
       "): install the nvidia-cublas wheel or set MC_CUBLAS_LIBRARY to the library's path");
}

template <typename Fn>
void bind(void* lib, const char* name, Fn*& fn) {
  fn = reinterpret_cast<Fn*>(dlsym(lib, name));
  if (fn == nullptr) fail(ErrorKind::kUnsupported, "libcublas lacks ", name);
}

const CublasApi& cublas() {
  static CublasApi api;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = open_cublas();
    CublasApi loaded;
    bind(lib, "cublasCreate_v2", loaded.create);
    bind(lib, "cublasDestroy_v2", loaded.destroy);
    bind(lib, "cublasSetStream_v2", loaded.set_stream);
    bind(lib, "cublasGemmEx", loaded.gemm_ex);
    api = loaded;
  });
  if (api.gemm_ex == nullptr) fail(ErrorKind::kUnsupported, "cuBLAS failed to load earlier in this process");
  return api;
}

void check(cublasStatus status, const char* what) {
  if (status != 0) fail(ErrorKind::kUnsupported, "cuBLAS ", what, " failed with status ", status);
}

cudaDataType cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    case DType::kF32: return CUDA_R_32F;
  }
  return CUDA_R_32F;
}

}  // namespace

Gemm::Gemm() { check(cublas().create(&handle_), "create"); }

Gemm::~Gemm() {
  if (handle_ != nullptr) cublas().destroy(handle_);
}

void Gemm::linear(const void* x, const void* w, void* y, int64_t T, int64_t N, int64_t K, DType in, DType out,
                  cudaStream_t stream) {
  if (in == DType::kF32) fail(ErrorKind::kUnsupported, "Gemm::linear takes bf16 or f16 operands");
  if (out != in && out != DType::kF32) fail(ErrorKind::kUnsupported, "Gemm::linear writes the input dtype or f32");
  if (T == 0) return;
  const float one = 1.0f, zero = 0.0f;
  check(cublas().set_stream(handle_, stream), "set_stream");
  // Row-major y[T, N] = x[T, K] · w[N, K]ᵀ is column-major yᵀ[N, T] = w · xᵀ, with w seen as a
  // column-major [K, N] matrix transposed and x as a column-major [K, T] one.
  check(cublas().gemm_ex(handle_, kCublasOpT, kCublasOpN, static_cast<int>(N), static_cast<int>(T),
                         static_cast<int>(K), &one, w, cuda_type(in), static_cast<int>(K), x, cuda_type(in),
                         static_cast<int>(K), &zero, y, cuda_type(out), static_cast<int>(N), kCublasCompute32F,
                         kCublasGemmDefault),
        "GemmEx");
}

}  // namespace mc::cuda
