// RMSNorm fused with the residual add. Shapes: T = tokens, R = rows normalized, D = dim.
//   residual [T, D] f32 (updated in place when delta is set), delta [T, D] half,
//   weight [D] half, rows [R] int32 (or identity), out [R, D] half.
//
// One block per row. Pass 1 reads the residual row (plus delta, writing the sum back) and
// accumulates the f32 sum of squares; a warp-shuffle + shared-memory reduction gives the block
// total; pass 2 re-reads the row (each thread its own packs, now in L1/L2) and writes
// weight * (x * inv_rms), the same order of operations as cpu::rms_norm.
// With a row selection and a delta, rows can repeat or skip tokens while every token's residual
// must be updated exactly once, so the add runs first as its own pass over all T rows.
#include "cuda/elementwise.cuh"

namespace mc::cuda {
namespace {

constexpr int kMaxThreads = 512;


template <typename T, int N>
__device__ __forceinline__ void load(const T* ptr, float (&v)[N]) {
  Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = to_float(pack.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store(T* ptr, const float (&v)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.v[j] = from_float<T>(v[j]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

// Sum over the block; every thread gets the total. Called once per kernel (the shared array
// is not reused afterwards).
__device__ float block_sum(float value) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + 31) / 32;
    value = lane < n_warps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) warp_sums[0] = value;
  }
  __syncthreads();
  return warp_sums[0];
}

// kAdd: residual[row] += delta[row]. kNorm: out[r] = rms_norm(residual[row]).
// row = rows[r] when rows is set (norm only), else r.
template <typename T, int kVec, bool kAdd, bool kNorm>
__global__ void rms_norm_kernel(float* __restrict__ residual, const T* __restrict__ delta,
                                const T* __restrict__ weight, T* __restrict__ out, const int32_t* __restrict__ rows,
                                int64_t dim, float eps) {
  const int64_t r = blockIdx.x;
  const int64_t row = rows != nullptr ? rows[r] : r;
  float* x = residual + row * dim;
  const int64_t packs = dim / kVec;

  float sum_sq = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    float v[kVec];
    load<float, kVec>(x + p * kVec, v);
    if constexpr (kAdd) {
      float d[kVec];
      load<T, kVec>(delta + row * dim + p * kVec, d);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] += d[j];
      store<float, kVec>(x + p * kVec, v);
    }
    if constexpr (kNorm) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum_sq += v[j] * v[j];
    }
  }
  if constexpr (kNorm) {
    const float total = block_sum(sum_sq);
    const float inv_rms = 1.0f / sqrtf(total / static_cast<float>(dim) + eps);
    T* y = out + r * dim;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float v[kVec], w[kVec];
      load<float, kVec>(x + p * kVec, v);
      load<T, kVec>(weight + p * kVec, w);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = w[j] * (v[j] * inv_rms);
      store<T, kVec>(y + p * kVec, v);
    }
  }
}

template <typename T, int kVec, bool kAdd, bool kNorm>
void launch(const RmsNormParams& p, int64_t blocks, const int32_t* rows, cudaStream_t stream) {
  const int64_t packs = p.dim / kVec;
  const int threads = static_cast<int>(packs >= kMaxThreads ? kMaxThreads : (packs + 31) / 32 * 32);
  rms_norm_kernel<T, kVec, kAdd, kNorm><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      p.residual, static_cast<const T*>(p.delta), static_cast<const T*>(p.weight), static_cast<T*>(p.out), rows, p.dim,
      p.eps);
  MC_CUDA_CHECK_LAUNCH();
}

template <typename T, int kVec>
void run(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == nullptr) {
    // Identity rows: add and normalize each row in one pass over it.
    if (p.delta != nullptr)
      launch<T, kVec, true, true>(p, p.n_tokens, nullptr, stream);
    else
      launch<T, kVec, false, true>(p, p.n_tokens, nullptr, stream);
    return;
  }
  if (p.delta != nullptr) launch<T, kVec, true, false>(p, p.n_tokens, nullptr, stream);
  if (p.n_rows > 0) launch<T, kVec, false, true>(p, p.n_rows, p.rows, stream);
}

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

void rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.n_tokens < 0 || p.n_rows < 0 || p.dim <= 0)
    fail(ErrorKind::kInvalidRequest, "rms_norm: bad sizes n_tokens=", p.n_tokens, ", n_rows=", p.n_rows,
         ", dim=", p.dim);
  if (p.rows == nullptr && p.n_rows != p.n_tokens)
    fail(ErrorKind::kInvalidRequest, "rms_norm: without a row selection n_rows (", p.n_rows,
         ") must equal n_tokens (", p.n_tokens, ")");
  if (p.n_tokens > 0x7fffffff || p.n_rows > 0x7fffffff)
    fail(ErrorKind::kInvalidRequest, "rms_norm: more than 2^31-1 rows");
  if (p.n_tokens == 0 && p.n_rows > 0)
    fail(ErrorKind::kInvalidRequest, "rms_norm: ", p.n_rows, " rows selected from an empty batch");
  if (p.n_tokens == 0) return;
  if (p.residual == nullptr || p.weight == nullptr || (p.n_rows > 0 && p.out == nullptr))
    fail(ErrorKind::kInvalidRequest, "rms_norm: null residual, weight or out pointer");
  NvtxRange range("rms_norm");
  dispatch_half(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // Packs of 4: one float4 of the residual, 8 bytes of each half operand.
    const bool vec = p.dim % 4 == 0 && aligned(p.residual, 16) && aligned(p.weight, 4 * sizeof(T)) &&
                     aligned(p.out, 4 * sizeof(T)) && (p.delta == nullptr || aligned(p.delta, 4 * sizeof(T)));
    if (vec)
      run<T, 4>(p, stream);
    else
      run<T, 1>(p, stream);
  });
}

}  // namespace mc::cuda
