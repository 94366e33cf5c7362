// Embedding lookup: out[t, :] (f32) = table[ids[t], :] (half, a WeightRef [V, D]). Shapes:
// T = tokens, D = dim.
//
// One block per token; each thread converts packs of kVec = 4 halves (an 8-byte load) into one
// float4 store, so both sides of a warp access one contiguous span (256 B read, 512 B written).
// Odd D (33, 511) or unaligned pointers take the kVec = 1 instance. Ids are not checked on the
// device: the runtime keeps them in [0, V).
#include "cuda/elementwise.cuh"

namespace mc::cuda {
namespace {


template <typename T, int kVec>
__global__ void embedding_kernel(const T* __restrict__ table, const int32_t* __restrict__ ids, float* __restrict__ out,
                                 int64_t dim) {
  const int64_t token = blockIdx.x;
  const T* src = table + static_cast<int64_t>(ids[token]) * dim;
  float* dst = out + token * dim;
  const int64_t packs = dim / kVec;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    Pack<T, kVec> in = reinterpret_cast<const Pack<T, kVec>*>(src)[p];
    if constexpr (kVec == 4) {
      reinterpret_cast<float4*>(dst)[p] =
          make_float4(to_float(in.v[0]), to_float(in.v[1]), to_float(in.v[2]), to_float(in.v[3]));
    } else {
      static_assert(kVec == 1, "embedding packs are 4 or 1 elements");
      dst[p] = to_float(in.v[0]);
    }
  }
}

template <typename T, int kVec>
void launch_embedding(const EmbeddingParams& p, cudaStream_t stream) {
  const int64_t dim = p.table.cols;
  const int64_t packs = dim / kVec;
  const int threads = static_cast<int>(packs >= 256 ? 256 : (packs + 31) / 32 * 32);
  embedding_kernel<T, kVec><<<static_cast<unsigned>(p.n_tokens), threads, 0, stream>>>(
      static_cast<const T*>(p.table.data), p.ids, p.out, dim);
  MC_CUDA_CHECK_LAUNCH();
}

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

void embedding(const EmbeddingParams& p, cudaStream_t stream) {
  const int64_t dim = p.table.cols;
  if (p.n_tokens < 0 || dim <= 0 || p.table.count != 1)
    fail(ErrorKind::kInvalidRequest, "embedding: bad sizes n_tokens=", p.n_tokens, ", dim=", dim,
         ", matrices=", p.table.count);
  if (p.n_tokens > 0x7fffffff) fail(ErrorKind::kInvalidRequest, "embedding: n_tokens ", p.n_tokens, " too large");
  if (p.n_tokens == 0) return;
  if (p.table.data == nullptr || p.ids == nullptr || p.out == nullptr)
    fail(ErrorKind::kInvalidRequest, "embedding: null table, ids or out pointer");
  NvtxRange range("embedding");
  dispatch_half(dtype_of(p.table.format), [&](auto tag) {
    using T = decltype(tag);
    if (dim % 4 == 0 && aligned(p.table.data, 4 * sizeof(T)) && aligned(p.out, 16))
      launch_embedding<T, 4>(p, stream);
    else
      launch_embedding<T, 1>(p, stream);
  });
}

}  // namespace mc::cuda
