#include "cuda/weights.cuh"

#include "core/random.h"

namespace mc::cuda {
namespace {

constexpr int kThreads = 256;

template <typename In>
__device__ float load_as_float(const void* src, int64_t i) {
  return to_float(static_cast<const In*>(src)[i]);
}

template <typename Out>
__global__ void convert_kernel(const void* src, DType from, Out* dst, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float value = from == DType::kF32    ? load_as_float<float>(src, i)
                  : from == DType::kBF16 ? load_as_float<__nv_bfloat16>(src, i)
                                         : load_as_float<__half>(src, i);
    dst[i] = from_float<Out>(value);
  }
}

template <typename Out>
__global__ void random_kernel(Out* dst, int64_t count, uint64_t stream_id, bool ones) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_float<Out>(ones ? 1.0f : kRandomWeightStd * normal_sample(stream_id, static_cast<uint64_t>(i)));
}

unsigned grid_for(int64_t count) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(count, kThreads), 65535 * 8));
}

}  // namespace

void convert_weights(const void* src, DType from, void* dst, DType to, int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  dispatch_half(to, [&](auto tag) {
    using T = decltype(tag);
    convert_kernel<T><<<grid_for(count), kThreads, 0, stream>>>(src, from, static_cast<T*>(dst), count);
    MC_CUDA_CHECK_LAUNCH();
  });
}

void fill_random_weights(void* dst, DType dtype, int64_t count, uint64_t stream_id, bool ones, cudaStream_t stream) {
  if (count == 0) return;
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    random_kernel<T><<<grid_for(count), kThreads, 0, stream>>>(static_cast<T*>(dst), count, stream_id, ones);
    MC_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mc::cuda
