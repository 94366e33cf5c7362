// Shared pieces of the CUDA backend: error checks, the half-precision element types and
// their conversions, dtype dispatch, NVTX ranges.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <type_traits>

#include "core/dtype.h"
#include "core/error.h"

namespace mc::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* expr, const char* file, int line);

// Every runtime call and every launch is checked: a failure is an mc::Error naming the call.
#define MC_CUDA_CHECK(expr)                                                     \
  do {                                                                          \
    cudaError_t mc_status_ = (expr);                                            \
    if (mc_status_ != cudaSuccess) ::mc::cuda::throw_cuda_error(mc_status_, #expr, __FILE__, __LINE__); \
  } while (0)
#define MC_CUDA_CHECK_LAUNCH() MC_CUDA_CHECK(cudaGetLastError())

// Activations and weights on the GPU are bf16 or f16; accumulation is f32.
template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) { return __bfloat162float(value); }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16(value); }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half(value); }
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }

// Runs fn for T, the element type of a half-precision dtype: fn is either a generic lambda
// `[&](auto tag) { using T = decltype(tag); ... }` or a functor with `template <typename T>
// void operator()()`.
template <typename T, typename Fn>
void call_with_type(Fn&& fn) {
  if constexpr (std::is_invocable_v<Fn, T>) {
    fn(T{});
  } else {
    fn.template operator()<T>();
  }
}

template <typename Fn>
void dispatch_half(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kBF16: call_with_type<__nv_bfloat16>(fn); return;
    case DType::kF16: call_with_type<__half>(fn); return;
    case DType::kF32: break;
  }
  fail(ErrorKind::kUnsupported, "CUDA kernels take bfloat16 or float16, not ", dtype_name(dtype));
}

// A named range on the Nsight Systems timeline for the lifetime of the object.
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// N elements moved as one aligned vector access (16 bytes for 8 halves or 4 floats).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace mc::cuda
