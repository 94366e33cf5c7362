// Private to the attention .cu files: the two launchers paged_attention (attention.cu) chooses
// from, and the device helpers both kernels share. Shapes: T = tokens of the step, H / KVH =
// query / key-value heads, G = H / KVH (query group), Dh = head_dim.
#pragma once

#include <cstdint>

#include "cuda/attention.cuh"

namespace mc::cuda::detail {

// Largest query group the decode kernel is instantiated for; larger groups go to prefill.
constexpr int32_t kDecodeMaxGroup = 8;
// The prefill kernel packs (token, head) rows into 64-row tiles: a group must fit one tile.
constexpr int32_t kPrefillMaxGroup = 64;

// exp(x) = exp2(x * log2(e)): scores are scaled into the exp2 domain once, so softmax uses ex2.
constexpr float kLog2e = 1.4426950408889634f;

// Split-context scratch of the decode path (carved from the caller's workspace).
struct DecodeWorkspace {
  float* partial_out = nullptr;  // [T, H, n_splits, Dh], each split's output normalized by its own sum
  float* partial_lse = nullptr;  // [T, H, n_splits], log2(sum of exp2(score)) of the split; -inf = no keys
  int32_t n_splits = 1;          // 1: the decode kernel writes p.out directly, no scratch
};

// Decode: every entry of p.tensors.kv has at most one new token, in rows 0 .. p.n_tokens - 1;
// group <= kDecodeMaxGroup.
void launch_decode(const AttentionParams& p, const DecodeWorkspace& ws, cudaStream_t stream);
// Any mix of chunk lengths up to p.max_query_len; group <= kPrefillMaxGroup.
void launch_prefill(const AttentionParams& p, cudaStream_t stream);

// Where one entry's K/V rows of one kv head live: keys at positions >= start are this step's
// (k_new/v_new, [T, KVH, Dh]), older ones are cached (pools, [num_blocks * block_size, KVH, Dh]).
// The entry index is relative to p.kv (a decode or prefill part of the step).
template <typename T>
struct KvRows {
  const T* k_new;
  const T* v_new;
  const T* k_pool;
  const T* v_pool;
  const int32_t* table;  // the entry's block table
  KvLayout layout;
  int64_t start;         // start_pos of the entry
  int64_t first_token;   // cu_seqlens of the entry: row of position `start` in k_new
  int64_t row_elems;     // KVH * Dh: one token's row
  int64_t head_elems;    // kv_head * Dh (+ the caller's column offset)

  __device__ KvRows(const AttentionParamsT<T>& p, int32_t entry, int32_t kv_head, int32_t column)
      : k_new(p.k_new),
        v_new(p.v_new),
        k_pool(p.k_pool),
        v_pool(p.v_pool),
        table(p.kv.block_tables + static_cast<int64_t>(entry) * p.kv.max_blocks),
        layout(p.kv.layout),
        start(p.kv.start_pos[entry]),
        first_token(p.kv.cu_seqlens[entry]),
        row_elems(static_cast<int64_t>(p.n_kv_heads) * p.head_dim),
        head_elems(static_cast<int64_t>(kv_head) * p.head_dim + column) {}

  // K and V addresses of position `pos` (the row kv_row() of core/kv_layout.h names).
  __device__ __forceinline__ void at(int64_t pos, const T*& k, const T*& v) const {
    const KvRow where = kv_row(layout, table, start, first_token, pos);
    const int64_t offset = where.row * row_elems + head_elems;
    k = (where.fresh ? k_new : k_pool) + offset;
    v = (where.fresh ? v_new : v_pool) + offset;
  }
};

// 8 elements of T packed in 16 bytes, widened to f32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  const T* halves = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(halves[i]);
}

}  // namespace mc::cuda::detail
