// Plain parameter structs of the ops that more than one backend implements, and the scalar
// helpers they share. Shapes use: T = tokens in the step, H = query heads, KVH = key/value
// heads, Dh = head_dim, E = experts, K = experts per token.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/hd.h"
#include "core/kv_layout.h"

namespace mc {

// Attention of a step's new tokens over each sequence's cached prefix plus the step's own keys.
// Keys of positions >= start_pos[e] come from k_new/v_new (this step's activations), older ones
// from the pools: so a chunk is attended before any of it is written to a rolling buffer.
// T is the element type: float on the CPU, __nv_bfloat16 or __half on the GPU.
template <typename T>
struct AttentionParamsT {
  const T* q;                   // [T, H, Dh], RoPE applied
  const T* k_new;               // [T, KVH, Dh], RoPE applied
  const T* v_new;               // [T, KVH, Dh]
  const T* k_pool;              // [num_blocks, block_size, KVH, Dh]
  const T* v_pool;              // [num_blocks, block_size, KVH, Dh]
  const int32_t* block_tables;  // [n_entries, max_blocks], -1 = unallocated
  const int32_t* cu_seqlens;    // [n_entries + 1] token offsets of each entry
  const int64_t* start_pos;     // [n_entries] cached length before this step
  T* out;                       // [T, H, Dh]
  int32_t n_entries = 0;
  int32_t max_blocks = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  float scale = 1.0f;  // 1 / sqrt(Dh)
  KvLayout layout;
};
using AttentionParams = AttentionParamsT<float>;

// Writes each entry's new K/V rows into the pools at the slots the layout gives, keeping only
// positions >= layout.first_kept(start, end): the last W under a sliding window, all otherwise.
template <typename T>
struct KvAppendParamsT {
  const T* k;                   // [T, KVH, Dh]
  const T* v;                   // [T, KVH, Dh]
  T* k_pool;                    // [num_blocks, block_size, KVH, Dh]
  T* v_pool;
  const int32_t* block_tables;  // [n_entries, max_blocks]
  const int32_t* cu_seqlens;    // [n_entries + 1]
  const int64_t* start_pos;     // [n_entries]
  int32_t n_entries = 0;
  int32_t max_blocks = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  KvLayout layout;
};
using KvAppendParams = KvAppendParamsT<float>;

// RoPE frequencies inv_freq[i] = theta^(-2i/Dh), i < Dh/2, in float32 as the reference
// implementations compute them: every backend and test takes them from here.
inline std::vector<float> rope_inv_freq(int64_t head_dim, double rope_theta) {
  std::vector<float> inv_freq(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[i] = 1.0f / std::pow(static_cast<float>(rope_theta), exponent);
  }
  return inv_freq;
}

// Softmax scale of attention scores: 1 / sqrt(Dh).
inline float attention_scale(int64_t head_dim) { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

// Mixtral routing of one token: the K largest router logits (ties to the lower expert index);
// their weights are the softmax over those K logits, equal to a softmax over all E renormalized
// over the chosen K.
MC_HD inline void route_top_k(const float* logits, int32_t n_experts, int32_t k, int32_t* experts, float* weights) {
  for (int32_t slot = 0; slot < k; ++slot) {
    int32_t best = -1;
    for (int32_t e = 0; e < n_experts; ++e) {
      bool taken = false;
      for (int32_t prev = 0; prev < slot; ++prev) taken |= experts[prev] == e;
      // Strictly greater: the first (lowest-index) of equal logits wins.
      if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
    }
    experts[slot] = best;
  }
  float top = logits[experts[0]];
  float sum = 0.0f;
  for (int32_t slot = 0; slot < k; ++slot) {
    weights[slot] = expf(logits[experts[slot]] - top);
    sum += weights[slot];
  }
  for (int32_t slot = 0; slot < k; ++slot) weights[slot] /= sum;
}

}  // namespace mc
