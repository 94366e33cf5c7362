// SwiGLU gate: out[t, i] = silu(gate_up[t, i]) * gate_up[t, F + i], silu(g) = g / (1 + exp(-g)),
// in f32 as cpu::silu_mul. Shapes: gate_up [T, 2F] half (the fused w1|w3 projection), out [T, F].
//
// A flat grid over the T * F/kVec packs of the output; a thread reads kVec gates and kVec ups
// (16 bytes each when kVec = 8) and writes kVec outputs, so every warp access is contiguous.
// Odd F (33, 511) or unaligned pointers take the kVec = 1 instance.
#include "cuda/elementwise.cuh"

namespace mc::cuda {
namespace {

constexpr int kThreads = 256;


template <typename T, int kVec>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t n_packs,
                                int64_t row_packs) {
  const int64_t pack = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pack >= n_packs) return;
  const int64_t t = pack / row_packs, i = pack % row_packs;
  using P = Pack<T, kVec>;
  const P* row = reinterpret_cast<const P*>(gate_up) + t * 2 * row_packs;  // [2F / kVec] packs
  const P gate = row[i];
  const P up = row[row_packs + i];
  P result;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float g = to_float(gate.v[j]);
    result.v[j] = from_float<T>(g / (1.0f + expf(-g)) * to_float(up.v[j]));
  }
  reinterpret_cast<P*>(out)[pack] = result;
}

template <typename T, int kVec>
void launch_silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  const int64_t row_packs = p.hidden / kVec;
  const int64_t n_packs = p.n_tokens * row_packs;
  silu_mul_kernel<T, kVec><<<ceil_div(n_packs, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(p.gate_up), static_cast<T*>(p.out), n_packs, row_packs);
  MC_CUDA_CHECK_LAUNCH();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.n_tokens < 0 || p.hidden <= 0)
    fail(ErrorKind::kInvalidRequest, "silu_mul: bad sizes n_tokens=", p.n_tokens, ", hidden=", p.hidden);
  // The grid covers T * F threads (kVec = 1) in at most 2^31 - 1 blocks.
  if (p.n_tokens > (int64_t{kThreads} << 30) / p.hidden)
    fail(ErrorKind::kInvalidRequest, "silu_mul: ", p.n_tokens, " x ", p.hidden, " elements is too many");
  if (p.n_tokens == 0) return;
  if (p.gate_up == nullptr || p.out == nullptr) fail(ErrorKind::kInvalidRequest, "silu_mul: null gate_up or out");
  NvtxRange range("silu_mul");
  dispatch_half(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.hidden % 8 == 0 && aligned16(p.gate_up) && aligned16(p.out))
      launch_silu_mul<T, 8>(p, stream);
    else
      launch_silu_mul<T, 1>(p, stream);
  });
}

}  // namespace mc::cuda
