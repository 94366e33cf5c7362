// The forward pass, written once over the backend op table (core/backend.h): embedding, then
// per layer RMSNorm (+ the pending residual add) -> fused q|k|v projection -> RoPE -> paged
// attention -> KV append -> o_proj -> RMSNorm (+ residual) -> fused gate|up -> SiLU -> down (or
// the MoE op), then the final norm and LM head on the rows whose logits are asked for.
// Shapes: T = tokens of the pass, R = logit rows, D = dim, F = FFN width, V = vocab.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/kv_layout.h"

namespace mc {

// One forward pass's batch flattened like variable-length attention: all new tokens of all
// entries as one list of T tokens, entry e owning rows cu_seqlens[e] .. cu_seqlens[e + 1].
// Decode entries (one token) come first: entries [0, n_decode).
struct StepBatch {
  std::vector<int32_t> tokens;        // [T]
  std::vector<int64_t> positions;     // [T] absolute positions
  std::vector<int32_t> cu_seqlens;    // [n_entries + 1]
  std::vector<int64_t> start_pos;     // [n_entries] cached length before this pass
  std::vector<int32_t> block_tables;  // [n_entries, max_blocks], -1 = unallocated
  int32_t max_blocks = 1;
  int32_t n_decode = 0;
  std::vector<int32_t> logit_rows;    // [R] token rows whose logits are computed
  std::vector<int64_t> logit_dest;    // [R] row of the caller's logits buffer each one goes to

  int32_t n_entries() const { return static_cast<int32_t>(start_pos.size()); }
  int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
};

// Sampling of a pass's logit rows on the backend, where the logits live: per row r (in
// logit_rows order) its controls and CSR lists (SampleParams in core/op_params.h).
struct PassSampling {
  std::vector<SamplingControls> controls;     // [R]
  std::vector<int32_t> history_offsets{0};    // [R + 1]
  std::vector<int32_t> history_ids;
  std::vector<int32_t> output_counts;
  std::vector<int32_t> bias_offsets{0};       // [R + 1]
  std::vector<int32_t> bias_ids;
  std::vector<float> bias_values;
  std::vector<int32_t> banned_offsets{0};     // [R + 1]
  std::vector<int32_t> banned_ids;
};

// What the sampler returns for one row: the id, and with logprobs the raw logprob, rank and top n.
struct SampledToken {
  int32_t token = -1;
  float logprob = 0.0f;
  int32_t rank = 0;
  std::vector<std::pair<int32_t, float>> top;
};

class ForwardPass {
 public:
  // Allocates the KV pools and every workspace for passes within `limits`, once.
  ForwardPass(Backend& backend, const ModelConfig& config, ModelWeights weights, KvLayout layout, int64_t num_blocks,
              const StepLimits& limits);

  // Runs the layers over `batch` (within the limits), appends the K/V that must stay cached,
  // and writes logits row r (float32, [V]) to logits + batch.logit_dest[r] * V on the host; or,
  // with `sampling`, samples every row on the backend into (*sampled)[batch.logit_dest[r]].
  void run(const StepBatch& batch, float* logits, const PassSampling* sampling = nullptr,
           std::vector<SampledToken>* sampled = nullptr);

  static constexpr int32_t kMaxLogprobs = 20;

  // Replaces every layer's K/V pools by zeroed pools of num_blocks blocks. The new pools are
  // allocated before the old ones go, so a failed allocation leaves the pass as it was.
  void resize_kv_pools(int64_t num_blocks);

  // Block dst[i] of every layer's pools takes block src[i]'s K and V (a forked sequence).
  void copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst);

  DType activation_dtype() const { return act_; }
  // Seconds spent in the backend's ops (layers, LM head, sampler), summed over every run:
  // what is not in here is host overhead (planning, metadata, bookkeeping).
  double compute_seconds() const { return compute_seconds_; }
  const StepLimits& limits() const { return limits_; }

 private:
  // Device buffers of one pass, sized from the limits.
  struct Workspace {
    std::shared_ptr<void> meta;               // the batch's index arrays, packed
    std::shared_ptr<void> meta_host;          // their staging copy on the host
    std::shared_ptr<void> residual;           // [T, D] f32
    std::shared_ptr<void> hidden;             // [T, D] act, normed
    std::shared_ptr<void> qkv;                // [T, (H + 2 KVH) * Dh] act
    std::shared_ptr<void> q, k, v;            // [T, H | KVH, Dh] act
    std::shared_ptr<void> attn;               // [T, H, Dh] act
    std::shared_ptr<void> proj;               // [T, D] act: o_proj / down_proj output
    std::shared_ptr<void> gate_up;            // [T, 2F] act
    std::shared_ptr<void> ffn_act;            // [T, F] act
    std::shared_ptr<void> rows;               // [R, D] act: normed LM-head rows
    std::shared_ptr<void> logits;             // [R, V] f32
    std::shared_ptr<void> logits_host;        // [R, V] f32 staging
    std::shared_ptr<void> attention_scratch;  // Backend::attention_workspace_bytes
    std::shared_ptr<void> moe_scratch;        // Backend::moe_workspace_bytes
    std::shared_ptr<void> inv_freq;           // [Dh / 2] f32
    size_t meta_bytes = 0;
    // Sampling: inputs packed per pass (grow-only), outputs for max_tokens rows.
    std::shared_ptr<void> sample_in, sample_in_host;
    size_t sample_in_bytes = 0;
    std::shared_ptr<void> sample_out, sample_out_host;
    std::shared_ptr<void> sample_scratch;     // Backend::sample_workspace_bytes(max_logit_rows, V)
  };

  // The device copies of `sampling`'s arrays (grow-only buffers), as a SampleParams.
  SampleParams upload_sampling(const PassSampling& sampling);
  void lm_head(const StepBatch& batch, const int32_t* rows, const void* pending, float* logits,
               const PassSampling* sampling, std::vector<SampledToken>* sampled);

  Backend& backend_;
  ModelConfig config_;
  ModelWeights weights_;
  DType act_;
  KvLayout layout_;
  StepLimits limits_;
  int32_t max_table_blocks_ = 0;  // block-table width of the longest possible sequence
  double compute_seconds_ = 0.0;
  std::vector<std::shared_ptr<void>> k_pools_;  // per layer [num_blocks, block_size, KVH, Dh] act
  std::vector<std::shared_ptr<void>> v_pools_;
  std::vector<std::string> layer_range_names_;  // "layer 0" ..., for Backend::push_range
  Workspace ws_;
};

}  // namespace mc
