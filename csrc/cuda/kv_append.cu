// K/V append into the paged cache, the semantics of cpu::kv_append:
//   k, v [T, KVH, Dh] -> k_pool, v_pool [num_blocks, block_size, KVH, Dh], keeping only the
//   positions >= layout.first_kept(start, end) of each entry (the last W under a window).
//
// One block per token. Its (kv_head, d) elements are one contiguous row of KVH * Dh both in the
// activations and in the pool (row layout.pool_row(table, pos)), so the block copies that row
// as a whole with coalesced 16-byte packs: (token, kv_head) blocks would move only Dh * 2 =
// 256 bytes each (Mistral), too little to keep a block busy. The per-token lookups (entry,
// position, pool row) are done once per block through the KvLayout helpers the CPU uses.
#include "cuda/elementwise.cuh"

namespace mc::cuda {
namespace {

constexpr int kMaxThreads = 256;


// Entry of a flattened token: the e with cu_seqlens[e] <= token < cu_seqlens[e + 1] (the last
// such e when entries are empty), i.e. upper_bound(cu_seqlens[0 .. n_entries], token) - 1.
__device__ __forceinline__ int32_t entry_of_token(const int32_t* cu_seqlens, int32_t n_entries, int32_t token) {
  int32_t lo = 0, hi = n_entries + 1;  // first index with cu_seqlens[index] > token lies in [lo, hi]
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (cu_seqlens[mid] > token)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo - 1;
}

template <typename T, int kVec>
__global__ void kv_append_kernel(KvAppendParamsT<void> p) {
  const PagedKvView& kv = p.kv;
  const int32_t token = blockIdx.x;
  const int32_t entry = entry_of_token(kv.cu_seqlens, kv.n_entries, token);
  const int64_t start = kv.start_pos[entry];
  const int32_t first_token = kv.cu_seqlens[entry];
  const int64_t end = start + (kv.cu_seqlens[entry + 1] - first_token);
  const int64_t pos = start + (token - first_token);
  if (pos < kv.layout.first_kept(start, end)) return;  // before the last W: no later query reads it

  const int32_t* table = kv.block_tables + static_cast<int64_t>(entry) * kv.max_blocks;
  const int64_t kv_dim = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
  const int64_t src = token * kv_dim;
  const int64_t dst = kv.layout.pool_row(table, pos) * kv_dim;
  using P = Pack<T, kVec>;
  const P* k = reinterpret_cast<const P*>(static_cast<const T*>(p.k) + src);
  const P* v = reinterpret_cast<const P*>(static_cast<const T*>(p.v) + src);
  P* k_out = reinterpret_cast<P*>(static_cast<T*>(p.k_pool) + dst);
  P* v_out = reinterpret_cast<P*>(static_cast<T*>(p.v_pool) + dst);
  const int64_t packs = kv_dim / kVec;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    k_out[i] = k[i];
    v_out[i] = v[i];
  }
}

template <typename T, int kVec>
void launch_kv_append(const KvAppendParams& p, cudaStream_t stream) {
  const int64_t packs = static_cast<int64_t>(p.tensors.n_kv_heads) * p.tensors.head_dim / kVec;
  const int threads = static_cast<int>(packs >= kMaxThreads ? kMaxThreads : (packs + 31) / 32 * 32);
  kv_append_kernel<T, kVec><<<static_cast<unsigned>(p.tensors.kv.n_tokens), threads, 0, stream>>>(p.tensors);
  MC_CUDA_CHECK_LAUNCH();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void kv_append(const KvAppendParams& p, cudaStream_t stream) {
  const KvAppendParamsT<void>& t = p.tensors;
  const PagedKvView& kv = t.kv;
  if (kv.n_tokens < 0 || kv.n_entries < 0 || kv.max_blocks <= 0 || t.n_kv_heads <= 0 || t.head_dim <= 0)
    fail(ErrorKind::kInvalidRequest, "kv_append: bad sizes n_tokens=", kv.n_tokens, ", n_entries=", kv.n_entries,
         ", max_blocks=", kv.max_blocks, ", n_kv_heads=", t.n_kv_heads, ", head_dim=", t.head_dim);
  if (kv.layout.block_size <= 0 || kv.layout.window < 0 || kv.layout.ring_blocks < 0 ||
      (kv.layout.window > 0) != (kv.layout.ring_blocks > 0))
    fail(ErrorKind::kInvalidRequest, "kv_append: bad layout block_size=", kv.layout.block_size,
         ", window=", kv.layout.window, ", ring_blocks=", kv.layout.ring_blocks);
  if (kv.n_tokens == 0) return;
  if (kv.n_entries == 0) fail(ErrorKind::kInvalidRequest, "kv_append: ", kv.n_tokens, " tokens but no entries");
  if (t.k == nullptr || t.v == nullptr || t.k_pool == nullptr || t.v_pool == nullptr || kv.block_tables == nullptr ||
      kv.cu_seqlens == nullptr || kv.start_pos == nullptr)
    fail(ErrorKind::kInvalidRequest, "kv_append: null tensor pointer");
  NvtxRange range("kv_append");
  dispatch_half(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (t.head_dim % 8 == 0 && aligned16(t.k) && aligned16(t.v) && aligned16(t.k_pool) && aligned16(t.v_pool))
      launch_kv_append<T, 8>(p, stream);
    else
      launch_kv_append<T, 1>(p, stream);
  });
}

}  // namespace mc::cuda
