// paged_attention: checks the inputs, plans the decode splits, and picks the kernel
// (attention_decode.cu or attention_prefill.cu). Shapes: T = tokens of the step, H / KVH =
// query / key-value heads, Dh = head_dim.
#include <algorithm>
#include <cstdint>

#include "cuda/attention.cuh"
#include "cuda/attention_kernels.cuh"

namespace mc::cuda {
namespace {

// A split must have enough keys to amortize its fixed cost (q loads, the final merge).
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int64_t kMaxSplits = 128;
// Decode CTAs wanted in flight per SM: several waves smooth the tail of unequal entries.
constexpr int64_t kDecodeCtasPerSm = 4;

// Streaming multiprocessors of the current device, asked once per process.
int64_t sm_count() {
  static const int64_t count = [] {
    int device = 0;
    int sms = 0;
    MC_CUDA_CHECK(cudaGetDevice(&device));
    MC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return static_cast<int64_t>(sms);
  }();
  return count;
}

// Decode CTAs (entry, kv_head, split) wanted per step.
int64_t decode_cta_target() { return kDecodeCtasPerSm * sm_count(); }

bool decode_kernel_fits(const CudaAttentionParams& p) {
  return p.tensors.n_heads / p.tensors.n_kv_heads <= detail::kDecodeMaxGroup;
}

// Splits of each decode entry's context: enough CTAs to fill the GPU, but no split shorter
// than kMinKeysPerSplit. Worked example on 132 SMs (target 528), KVH=8: batch 1 at 32768 keys
// -> min(ceil(528 / 8), 256) = 66 splits; batch 1 at 512 keys -> 4; batch 64 at 4096 -> 2.
int32_t decode_splits(const CudaAttentionParams& p) {
  const int64_t ctas = static_cast<int64_t>(p.tensors.n_entries) * p.tensors.n_kv_heads;
  const int64_t wanted = (decode_cta_target() + ctas - 1) / ctas;
  const int64_t by_length = std::max<int64_t>(p.max_context / kMinKeysPerSplit, 1);
  return static_cast<int32_t>(std::clamp<int64_t>(std::min(wanted, by_length), 1, kMaxSplits));
}

// Bound on T * splits over every decode step with at most p.n_tokens tokens. A step splits only
// when n_entries * KVH < target; then T <= n_entries < target / KVH and
// T * splits <= T * ceil(target / (T * KVH)) < target / KVH + T.
// Worked example, target 528, KVH=8: below 66 + min(T, 66) <= 132 rows.
int64_t partial_rows_bound(const CudaAttentionParams& p) {
  const int64_t per_kv_head = (decode_cta_target() + p.tensors.n_kv_heads - 1) / p.tensors.n_kv_heads;
  return per_kv_head + std::min<int64_t>(p.n_tokens, per_kv_head);
}

// The split partials in the workspace: partial_out [T, H, splits, Dh] f32, then partial_lse
// [T, H, splits] f32 at the next 256-byte boundary.
size_t partial_out_bytes(const CudaAttentionParams& p, int64_t rows) {
  const size_t bytes = static_cast<size_t>(rows) * p.tensors.n_heads * p.tensors.head_dim * sizeof(float);
  return (bytes + 255) / 256 * 256;
}
size_t partial_lse_bytes(const CudaAttentionParams& p, int64_t rows) {
  return static_cast<size_t>(rows) * p.tensors.n_heads * sizeof(float);
}

void check_aligned(const void* ptr, const char* name) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
    fail(ErrorKind::kInvalidRequest, "paged_attention: ", name, " must be 16-byte aligned (kernels load 16 bytes)");
  }
}

// Shapes and bounds, needed before any planning (attention_workspace_bytes divides by them).
void check_shapes(const CudaAttentionParams& p) {
  const AttentionParamsT<void>& t = p.tensors;
  if (t.head_dim != 64 && t.head_dim != 128) {
    fail(ErrorKind::kUnsupported, "paged_attention: head_dim ", t.head_dim, " (CUDA kernels support 64 and 128)");
  }
  if (t.n_heads <= 0 || t.n_kv_heads <= 0 || t.n_heads % t.n_kv_heads != 0) {
    fail(ErrorKind::kInvalidRequest, "paged_attention: n_heads ", t.n_heads, " is not a multiple of n_kv_heads ",
         t.n_kv_heads);
  }
  if (t.n_heads / t.n_kv_heads > detail::kPrefillMaxGroup) {
    fail(ErrorKind::kUnsupported, "paged_attention: query group ", t.n_heads / t.n_kv_heads, " above ",
         detail::kPrefillMaxGroup);
  }
  if (t.layout.block_size <= 0) fail(ErrorKind::kInvalidRequest, "paged_attention: block_size ", t.layout.block_size);
  if (p.max_query_len <= 0) fail(ErrorKind::kInvalidRequest, "paged_attention: max_query_len ", p.max_query_len);
}

void check_pointers(const AttentionParamsT<void>& t) {
  check_aligned(t.q, "q");
  check_aligned(t.k_new, "k_new");
  check_aligned(t.v_new, "v_new");
  check_aligned(t.k_pool, "k_pool");
  check_aligned(t.v_pool, "v_pool");
  check_aligned(t.out, "out");
}

}  // namespace

// Enough for every decode step within p's bounds (at most p.n_tokens tokens, at most
// p.max_context keys, the same heads), whatever its max_query_len: allocate once from the
// engine's limits. 0 when no such step would split.
size_t attention_workspace_bytes(const CudaAttentionParams& p) {
  if (p.n_tokens == 0 || p.tensors.n_entries == 0) return 0;
  check_shapes(p);
  if (!decode_kernel_fits(p) || p.max_context < 2 * kMinKeysPerSplit) return 0;
  const int64_t rows = partial_rows_bound(p);
  return partial_out_bytes(p, rows) + partial_lse_bytes(p, rows);
}

void paged_attention(const CudaAttentionParams& p, void* workspace, cudaStream_t stream) {
  if (p.n_tokens == 0 || p.tensors.n_entries == 0) return;
  check_shapes(p);
  check_pointers(p.tensors);
  if (p.max_query_len > 1 || !decode_kernel_fits(p)) {
    NvtxRange range("attention_prefill");
    detail::launch_prefill(p, stream);
    return;
  }
  detail::DecodeWorkspace ws;
  ws.n_splits = decode_splits(p);
  if (ws.n_splits > 1) {
    if (workspace == nullptr) {
      fail(ErrorKind::kInvalidRequest, "paged_attention: decode over ", p.max_context, " keys needs ",
           attention_workspace_bytes(p), " bytes of workspace, got none");
    }
    const int64_t rows = static_cast<int64_t>(p.n_tokens) * ws.n_splits;
    ws.partial_out = static_cast<float*>(workspace);
    ws.partial_lse = reinterpret_cast<float*>(static_cast<char*>(workspace) + partial_out_bytes(p, rows));
  }
  NvtxRange range("attention_decode");
  detail::launch_decode(p, ws, stream);
}

}  // namespace mc::cuda
