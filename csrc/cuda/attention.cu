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

bool decode_kernel_fits(const AttentionParams& p) {
  return p.tensors.n_heads / p.tensors.n_kv_heads <= detail::kDecodeMaxGroup;
}

// Splits of each decode entry's context: enough CTAs to fill the GPU, but no split shorter
// than kMinKeysPerSplit. Worked example on 132 SMs (target 528), KVH=8: batch 1 at 32768 keys
// -> min(ceil(528 / 8), 256) = 66 splits; batch 1 at 512 keys -> 4; batch 64 at 4096 -> 2.
int32_t decode_splits(const AttentionParams& p) {
  const int64_t ctas = static_cast<int64_t>(p.tensors.kv.n_entries) * p.tensors.n_kv_heads;
  const int64_t wanted = (decode_cta_target() + ctas - 1) / ctas;
  const int64_t by_length = std::max<int64_t>(p.max_context / kMinKeysPerSplit, 1);
  return static_cast<int32_t>(std::clamp<int64_t>(std::min(wanted, by_length), 1, kMaxSplits));
}

// Bound on T * splits over every decode step with at most p.n_tokens tokens. A step splits only
// when n_entries * KVH < target; then T <= n_entries < target / KVH and
// T * splits <= T * ceil(target / (T * KVH)) < target / KVH + T.
// Worked example, target 528, KVH=8: below 66 + min(T, 66) <= 132 rows.
int64_t partial_rows_bound(const AttentionParams& p) {
  const int64_t per_kv_head = (decode_cta_target() + p.tensors.n_kv_heads - 1) / p.tensors.n_kv_heads;
  return per_kv_head + std::min<int64_t>(p.n_tokens, per_kv_head);
}

// The split partials in the workspace: partial_out [T, H, splits, Dh] f32, then partial_lse
// [T, H, splits] f32 at the next 256-byte boundary.
size_t partial_out_bytes(const AttentionParams& p, int64_t rows) {
  const size_t bytes = static_cast<size_t>(rows) * p.tensors.n_heads * p.tensors.head_dim * sizeof(float);
  return (bytes + 255) / 256 * 256;
}
size_t partial_lse_bytes(const AttentionParams& p, int64_t rows) {
  return static_cast<size_t>(rows) * p.tensors.n_heads * sizeof(float);
}

void check_aligned(const void* ptr, const char* name) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
    fail(ErrorKind::kInvalidRequest, "paged_attention: ", name, " must be 16-byte aligned (kernels load 16 bytes)");
  }
}

// Shapes and bounds, needed before any planning (attention_workspace_bytes divides by them).
void check_shapes(const AttentionParams& p) {
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
  if (t.kv.layout.block_size <= 0)
    fail(ErrorKind::kInvalidRequest, "paged_attention: block_size ", t.kv.layout.block_size);
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

// Enough for every decode part within p's bounds (at most p.n_tokens tokens, at most
// p.max_context keys, the same heads), whatever its max_query_len: allocate once from the
// engine's limits. 0 when no such part would split.
size_t attention_workspace_bytes(const AttentionParams& p) {
  if (p.n_tokens == 0 || p.tensors.kv.n_entries == 0) return 0;
  check_shapes(p);
  if (!decode_kernel_fits(p) || p.max_context < 2 * kMinKeysPerSplit) return 0;
  const int64_t rows = partial_rows_bound(p);
  return partial_out_bytes(p, rows) + partial_lse_bytes(p, rows);
}

namespace {

// Runs the decode kernel over p's entries, each with at most one new token in rows
// 0 .. p.n_tokens - 1 (merge_splits combines the split partials of exactly those rows).
void run_decode(const AttentionParams& p, cudaStream_t stream) {
  detail::DecodeWorkspace ws;
  ws.n_splits = decode_splits(p);
  if (ws.n_splits > 1) {
    if (p.workspace == nullptr) {
      fail(ErrorKind::kInvalidRequest, "paged_attention: decode over ", p.max_context, " keys needs ",
           attention_workspace_bytes(p), " bytes of workspace, got none");
    }
    const int64_t rows = static_cast<int64_t>(p.n_tokens) * ws.n_splits;
    ws.partial_out = static_cast<float*>(p.workspace);
    ws.partial_lse = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + partial_out_bytes(p, rows));
  }
  NvtxRange range("attention_decode");
  detail::launch_decode(p, ws, stream);
}

void run_prefill(const AttentionParams& p, cudaStream_t stream) {
  NvtxRange range("attention_prefill");
  detail::launch_prefill(p, stream);
}

}  // namespace

void paged_attention(const AttentionParams& p, cudaStream_t stream) {
  const PagedKvView& kv = p.tensors.kv;
  if (p.n_tokens == 0 || kv.n_entries == 0) return;
  check_shapes(p);
  check_pointers(p.tensors);
  if (kv.n_decode < 0 || kv.n_decode > kv.n_entries)
    fail(ErrorKind::kInvalidRequest, "paged_attention: n_decode ", kv.n_decode, " outside 0..", kv.n_entries);
  if (kv.n_decode == 0 || !decode_kernel_fits(p)) {
    // One kernel for the whole step: the decode kernel when no entry has more than one new
    // token and the query group fits it, else the prefill kernel (named decode entries have
    // one token each, whatever bound the caller derived from the others).
    AttentionParams whole = p;
    whole.max_query_len = std::max(p.max_query_len, kv.n_decode > 0 ? 1 : 0);
    if (whole.max_query_len <= 0)
      fail(ErrorKind::kInvalidRequest, "paged_attention: max_query_len ", p.max_query_len);
    if (whole.max_query_len == 1 && decode_kernel_fits(p)) {
      run_decode(whole, stream);
    } else {
      run_prefill(whole, stream);
    }
    return;
  }
  // Decode entries hold token rows 0 .. n_decode - 1; the prefill entries' cu_seqlens stay
  // absolute rows of the step, so q and out are indexed as in the whole step.
  AttentionParams decode = p;
  decode.tensors.kv = kv.entries(0, kv.n_decode);
  decode.n_tokens = kv.n_decode;
  decode.max_query_len = 1;
  decode.max_context = kv.decode_max_context;
  run_decode(decode, stream);
  if (kv.n_decode == kv.n_entries || kv.prefill_max_query_len <= 0) return;  // no prefill token
  AttentionParams prefill = p;
  prefill.tensors.kv = kv.entries(kv.n_decode, kv.n_entries - kv.n_decode);
  prefill.max_query_len = kv.prefill_max_query_len;
  prefill.max_context = kv.prefill_max_context;
  run_prefill(prefill, stream);
}

}  // namespace mc::cuda
