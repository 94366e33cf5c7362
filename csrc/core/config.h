// Model hyper-parameters, read from either checkpoint layout:
//   Hugging Face `config.json` (hidden_size, num_hidden_layers, ...) or
//   Mistral's `params.json` (dim, n_layers, ..., "moe": {...}).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace mc {

class Json;

struct ModelConfig {
  // Bounds every config is checked against before anything is allocated: generous (several
  // times the largest published models) but small enough that no size computed from them
  // overflows int64, and that a 1 KB config cannot plan gigabytes.
  static constexpr int64_t kMaxDim = int64_t{1} << 16;           // dim
  static constexpr int64_t kMaxLayers = 1024;                     // n_layers
  static constexpr int64_t kMaxHeads = 1024;                      // n_heads, n_kv_heads
  static constexpr int64_t kMaxHeadDim = 1024;                    // head_dim
  static constexpr int64_t kMaxHiddenDim = int64_t{1} << 20;     // hidden_dim
  static constexpr int64_t kMaxVocab = int64_t{1} << 24;         // vocab_size
  static constexpr int64_t kMaxSeqLen = int64_t{1} << 24;        // max_seq_len, sliding_window
  static constexpr int64_t kMaxExperts = 1024;                    // n_experts
  static constexpr int64_t kMaxLayerExperts = int64_t{1} << 16;  // n_layers * n_experts

  int64_t dim = 0;         // residual width
  int64_t n_layers = 0;
  int64_t n_heads = 0;     // query heads
  int64_t n_kv_heads = 0;  // key/value heads (GQA: n_heads is a multiple)
  int64_t head_dim = 0;    // may differ from dim / n_heads
  int64_t hidden_dim = 0;  // SwiGLU FFN width (per expert for MoE)
  int64_t vocab_size = 0;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  std::optional<int64_t> sliding_window;  // nullopt = full attention
  int64_t max_seq_len = 32768;            // positions allowed for full attention
  int64_t n_experts = 0;                  // 0 = dense FFN
  int64_t n_experts_per_tok = 0;
  bool tie_embeddings = false;            // LM head shares the token embedding

  bool is_moe() const { return n_experts > 0; }
  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }

  // Throws kCheckpoint naming the first inconsistent or out-of-bounds field and its bound.
  void validate() const;

  // "mistral-7b-v0.1", "mistral-7b-v0.3", "mixtral-8x7b": the published shapes, for benchmarks
  // without a checkpoint. Throws kInvalidRequest naming the known presets.
  static ModelConfig preset(const std::string& name);

  static ModelConfig from_hf_json(const Json& json, const std::string& source);
  static ModelConfig from_mistral_json(const Json& json, const std::string& source);
};

}  // namespace mc
