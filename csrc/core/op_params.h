// Plain parameter structs of the backend ops (core/backend.h) and the scalar helpers both
// backends share. Shapes use: T = tokens in the step, H = query heads, KVH = key/value heads,
// Dh = head_dim, D = dim, F = FFN width, E = experts, K = experts per token, R = rows whose
// logits are computed. "act" = the activation dtype of the backend (float32 on the CPU,
// bfloat16 or float16 on CUDA), named by each struct's `dtype`; the residual stream is float32
// on every backend.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/hd.h"
#include "core/kv_layout.h"
#include "core/random.h"
#include "core/weight.h"

namespace mc {

// The step's view of the paged KV cache, built once per step by the runtime and shared by
// attention and KV append (like FlashInfer's paged_kv_t). Entry e owns token rows
// cu_seqlens[e] .. cu_seqlens[e + 1] of the step. The runtime orders decode entries (one new
// token) first, so entries [0, n_decode) hold token rows [0, n_decode) and go to a decode
// kernel, the rest to a prefill kernel.
struct PagedKvView {
  const int32_t* block_tables = nullptr;  // [n_entries, max_blocks], -1 = unallocated
  const int32_t* cu_seqlens = nullptr;    // [n_entries + 1] token offsets of each entry
  const int64_t* start_pos = nullptr;     // [n_entries] cached length before this step
  int32_t n_entries = 0;
  int32_t max_blocks = 0;
  KvLayout layout;
  // Bounds the host knows without reading device memory, for kernel planning.
  int32_t n_tokens = 0;               // cu_seqlens[n_entries]
  int32_t n_decode = 0;               // leading entries with exactly one token
  int64_t decode_max_context = 0;     // most keys a decode query sees
  int32_t prefill_max_query_len = 0;  // longest chunk among the other entries
  int64_t prefill_max_context = 0;    // most keys any of their queries sees

  // Fills n_tokens, n_decode and the bounds from host copies of cu_seqlens and start_pos.
  void plan_from_host(const int32_t* host_cu_seqlens, const int64_t* host_start_pos) {
    n_tokens = host_cu_seqlens[n_entries];
    n_decode = 0;
    while (n_decode < n_entries && host_cu_seqlens[n_decode + 1] - host_cu_seqlens[n_decode] == 1) ++n_decode;
    decode_max_context = prefill_max_context = 0;
    prefill_max_query_len = 0;
    for (int32_t e = 0; e < n_entries; ++e) {
      const int32_t n = host_cu_seqlens[e + 1] - host_cu_seqlens[e];
      const int64_t end = host_start_pos[e] + n;
      const int64_t keys = layout.window > 0 && layout.window < end ? layout.window : end;
      if (e < n_decode) {
        decode_max_context = decode_max_context > keys ? decode_max_context : keys;
      } else {
        prefill_max_query_len = prefill_max_query_len > n ? prefill_max_query_len : n;
        prefill_max_context = prefill_max_context > keys ? prefill_max_context : keys;
      }
    }
  }
  int32_t max_query_len() const {
    const int32_t decode = n_decode > 0 ? 1 : 0;
    return prefill_max_query_len > decode ? prefill_max_query_len : decode;
  }
  int64_t max_context() const {
    return decode_max_context > prefill_max_context ? decode_max_context : prefill_max_context;
  }

  // Entries [first, first + count) as a view of their own (same token rows, same pools).
  PagedKvView entries(int32_t first, int32_t count) const {
    PagedKvView view = *this;
    view.block_tables = block_tables + static_cast<int64_t>(first) * max_blocks;
    view.cu_seqlens = cu_seqlens + first;
    view.start_pos = start_pos + first;
    view.n_entries = count;
    return view;
  }
};

// Attention of a step's new tokens over each sequence's cached prefix plus the step's own keys.
// Keys of positions >= start_pos[e] come from k_new/v_new (this step's activations), older ones
// from the pools (kv_row() in kv_layout.h): so a chunk is attended before any of it is written
// to a rolling buffer. T is the element type (float on the CPU, bf16/f16 on CUDA; void when
// erased).
template <typename T>
struct AttentionParamsT {
  const T* q = nullptr;       // [T, H, Dh], RoPE applied
  const T* k_new = nullptr;   // [T, KVH, Dh], RoPE applied
  const T* v_new = nullptr;   // [T, KVH, Dh]
  const T* k_pool = nullptr;  // [num_blocks, block_size, KVH, Dh]
  const T* v_pool = nullptr;  // [num_blocks, block_size, KVH, Dh]
  T* out = nullptr;           // [T, H, Dh]
  PagedKvView kv;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  float scale = 1.0f;  // 1 / sqrt(Dh)
};

// The attention op: element type erased (named by dtype), plus the bounds of the entries the
// kernel will see (the whole step, or its decode or prefill part) and its scratch.
struct AttentionParams {
  AttentionParamsT<void> tensors;
  DType dtype = DType::kF32;
  int32_t n_tokens = 0;       // token rows these entries cover (decode part: rows 0 .. n_tokens-1)
  int32_t max_query_len = 0;  // largest entry token count (1 = pure decode)
  int64_t max_context = 0;    // most keys any query sees
  void* workspace = nullptr;  // backend scratch of Backend::attention_workspace_bytes(bounds)
};

// The erased tensors with their element type restored (each backend's kernels are typed).
template <typename T>
AttentionParamsT<T> typed(const AttentionParamsT<void>& t) {
  AttentionParamsT<T> out;
  out.q = static_cast<const T*>(t.q);
  out.k_new = static_cast<const T*>(t.k_new);
  out.v_new = static_cast<const T*>(t.v_new);
  out.k_pool = static_cast<const T*>(t.k_pool);
  out.v_pool = static_cast<const T*>(t.v_pool);
  out.out = static_cast<T*>(t.out);
  out.kv = t.kv;
  out.n_heads = t.n_heads;
  out.n_kv_heads = t.n_kv_heads;
  out.head_dim = t.head_dim;
  out.scale = t.scale;
  return out;
}

// Writes each entry's new K/V rows into the pools at the slots the layout gives, keeping only
// positions >= layout.first_kept(start, end): the last W under a sliding window, all otherwise.
template <typename T>
struct KvAppendParamsT {
  const T* k = nullptr;  // [T, KVH, Dh]
  const T* v = nullptr;  // [T, KVH, Dh]
  T* k_pool = nullptr;   // [num_blocks, block_size, KVH, Dh]
  T* v_pool = nullptr;
  PagedKvView kv;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
};
struct KvAppendParams {
  KvAppendParamsT<void> tensors;
  DType dtype = DType::kF32;
};

template <typename T>
KvAppendParamsT<T> typed(const KvAppendParamsT<void>& t) {
  KvAppendParamsT<T> out;
  out.k = static_cast<const T*>(t.k);
  out.v = static_cast<const T*>(t.v);
  out.k_pool = static_cast<T*>(t.k_pool);
  out.v_pool = static_cast<T*>(t.v_pool);
  out.kv = t.kv;
  out.n_kv_heads = t.n_kv_heads;
  out.head_dim = t.head_dim;
  return out;
}

// out[t, :] (f32) = table[ids[t], :], any float format. Starts the f32 residual stream.
struct EmbeddingParams {
  WeightRef table;               // [V, D]
  const int32_t* ids = nullptr;  // [T]
  float* out = nullptr;          // [T, D] f32
  int64_t n_tokens = 0;
};

// RMSNorm fused with the residual add, statistics in f32 (double on the CPU):
//   if delta:  residual[t] += delta[t]            (every row t < n_tokens, in place)
//   out[r] = residual[row_r] / sqrt(mean(residual[row_r]^2) + eps) * weight,
//   row_r = rows ? rows[r] : r, for r < n_rows  (rows picks the LM-head rows)
struct RmsNormParams {
  float* residual = nullptr;      // [T, D] f32, updated in place when delta is set
  const void* delta = nullptr;    // [T, D] act, or null
  const void* weight = nullptr;   // [D] act
  void* out = nullptr;            // [n_rows, D] act
  const int32_t* rows = nullptr;  // [n_rows] or null (= identity, n_rows == n_tokens)
  int64_t n_tokens = 0;
  int64_t n_rows = 0;
  int64_t dim = 0;
  float eps = 1e-5f;
  DType dtype = DType::kF32;
};

// y[T, N] = x[T, K] · w[N, K]ᵀ (the nn.Linear convention), accumulated in f32.
struct LinearParams {
  const void* x = nullptr;  // [T, K] act
  WeightRef w;              // [N, K], any format the backend supports
  void* y = nullptr;        // [T, N] in y_dtype (act, or f32 for logits)
  int64_t n_tokens = 0;
  DType x_dtype = DType::kF32;
  DType y_dtype = DType::kF32;
};

// The fused q|k|v projection's output split into q, k and v, with half-rotation RoPE applied to
// q and k: pair (i, i + Dh/2) of token t turns by angle = float(positions[t]) * inv_freq[i] (an
// f32 product, as the reference implementations compute it), cos/sin taken in double.
struct QkvRopeParams {
  const void* qkv = nullptr;  // [T, (H + 2 KVH) * Dh] act: q columns, then k, then v
  void* q = nullptr;          // [T, H, Dh] act
  void* k = nullptr;          // [T, KVH, Dh] act
  void* v = nullptr;          // [T, KVH, Dh] act
  const int64_t* positions = nullptr;  // [T]
  const float* inv_freq = nullptr;     // [Dh / 2]
  int64_t n_tokens = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kF32;
};

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, F + i]: the fused w1|w3 projection's halves.
struct SiluMulParams {
  const void* gate_up = nullptr;  // [T, 2F] act
  void* out = nullptr;            // [T, F] act
  int64_t n_tokens = 0;
  int64_t hidden = 0;             // F
  DType dtype = DType::kF32;
};

// Mixtral routing of T tokens (route_top_k below: ties to the lower expert, weights = softmax over
// the chosen logits), then the (token, slot) pairs grouped by expert with a stable counting sort.
struct MoeRouteParams {
  const float* router_logits = nullptr;  // [T, E] f32
  int32_t* expert_ids = nullptr;         // [T, K]
  float* weights = nullptr;              // [T, K]
  int32_t* expert_offsets = nullptr;     // [E + 1]: expert e owns sorted_pairs[offsets[e] .. offsets[e+1])
  int32_t* sorted_pairs = nullptr;       // [T * K] pair index t * K + k, grouped by expert, ascending within one
  int32_t n_tokens = 0;
  int32_t n_experts = 0;
  int32_t top_k = 0;
};

// Mixtral's sparse MoE FFN, added into the residual stream:
//   residual[t] += Σ_k weight[t, k] · w2_e(silu(w1_e x_t) * w3_e x_t),  e = expert_ids[t, k]
// with route_top_k's routing over router logits x · routerᵀ.
struct MoeParams {
  const void* x = nullptr;   // [T, D] act: the normed hidden state
  WeightRef router;          // [E, D]
  WeightRef w13;             // [E, 2F, D]: rows 0..F-1 = w1, F..2F-1 = w3 of each expert
  WeightRef w2;              // [E, D, F]
  float* residual = nullptr; // [T, D] f32
  int64_t n_tokens = 0;
  int32_t top_k = 0;
  DType dtype = DType::kF32;
  void* workspace = nullptr; // backend scratch of Backend::moe_workspace_bytes(bounds)
};

// Copies whole KV blocks within one layer's pools: block dst[i] takes block src[i]'s K and V.
struct CopyBlocksParams {
  void* k_pool = nullptr;              // [num_blocks, block_size, KVH, Dh] act
  void* v_pool = nullptr;
  const int32_t* src = nullptr;        // [n] host memory
  const int32_t* dst = nullptr;        // [n] host memory
  int32_t n = 0;
  size_t block_bytes = 0;              // block_size * KVH * Dh * element size
};

// ---- sampling ----

// The controls of one row of logits (vLLM's sampling parameters that act on logits), applied in
// vLLM V1's order: ids >= vocab_limit and `banned` ids masked (the min_tokens mask), logit bias,
// penalties (repetition on prompt and output tokens: positive logits divided, negative
// multiplied; presence and frequency on output counts), then greedy argmax (temperature 0), or
// temperature, min-p, top-k, top-p in sequence and a Gumbel-max draw keyed by
// (seed, stream, position) (sampling_noise below). Logprobs come from the raw logits, over
// the ids below vocab_limit.
struct SamplingControls {
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t vocab_limit = 0;   // ids >= vocab_limit are never sampled (the tokenizer's size)
  uint64_t seed = 0;
  uint64_t stream = 0;       // which sample of a request (n > 1)
  int64_t position = 0;      // index of the token being sampled in the request's output
  int32_t n_logprobs = -1;   // -1: none; else the sampled token's logprob and rank, and the top n
};

// One sampling step over R rows of logits [R, V] where the backend holds them; per-row lists are
// CSR arrays (row r owns [offsets[r], offsets[r + 1])). Only the outputs return to the host.
struct SampleParams {
  const float* logits = nullptr;             // [R, V] f32, raw
  const SamplingControls* controls = nullptr;  // [R]
  const int32_t* history_offsets = nullptr;  // [R + 1]
  const int32_t* history_ids = nullptr;      // distinct tokens of the prompt and output
  const int32_t* output_counts = nullptr;    // their counts in the output (0 = prompt only)
  const int32_t* bias_offsets = nullptr;     // [R + 1]
  const int32_t* bias_ids = nullptr;
  const float* bias_values = nullptr;
  const int32_t* banned_offsets = nullptr;   // [R + 1]: ids masked for this step (EOS, stop ids)
  const int32_t* banned_ids = nullptr;
  int32_t n_rows = 0;
  int32_t vocab = 0;
  int32_t max_logprobs = 0;                  // width of the top_* outputs
  int32_t* tokens = nullptr;                 // [R] sampled ids
  float* token_logprobs = nullptr;           // [R] raw logprob of the sampled id
  int32_t* token_ranks = nullptr;            // [R] 1 + ids with a larger raw logit
  int32_t* top_ids = nullptr;                // [R, max_logprobs] by raw logit, ties to the lower id
  float* top_logprobs = nullptr;             // [R, max_logprobs]
  void* workspace = nullptr;                 // Backend::sample_workspace_bytes
};

// The Gumbel noise of token `id` for one draw: -log(-log(u)) with u uniform in (0, 1) from 53
// random bits of (seed, stream, position, id). The draw is argmax(logit / temperature + noise)
// over the kept ids: independent of vocabulary order and batch, so every backend and the Python
// reference pick the same id.
MC_HD inline double sampling_noise(uint64_t seed, uint64_t stream, int64_t position, int32_t id) {
  const uint64_t key = mix64(mix64(seed ^ 0x5851f42d4c957f2dull) + stream * 0x9e3779b97f4a7c15ull);
  const uint64_t bits = mix64(mix64(key + static_cast<uint64_t>(position)) ^ (static_cast<uint64_t>(id) * 0xd1b54a32d192ed03ull));
  const double u = (static_cast<double>(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  return -log(-log(u));
}

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
