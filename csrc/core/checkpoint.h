// Loading a model directory in either layout:
//   Hugging Face: config.json + model.safetensors, or model-0000X-of-0000N.safetensors with
//                 model.safetensors.index.json; q/k rows permuted for half-rotation RoPE.
//   Mistral:      params.json + consolidated.safetensors; q/k rows in interleaved-pair order.
// Weights come out in one canonical form (HF's half-rotation q/k order), so the backends keep
// a single RoPE implementation.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"

namespace mc {

struct ExpertWeights {
  Tensor w1;  // gate projection [hidden_dim, dim]
  Tensor w2;  // down projection [dim, hidden_dim]
  Tensor w3;  // up projection   [hidden_dim, dim]
};

struct LayerWeights {
  Tensor attn_norm;  // [dim]
  Tensor wq;         // [n_heads * head_dim, dim]
  Tensor wk;         // [n_kv_heads * head_dim, dim]
  Tensor wv;         // [n_kv_heads * head_dim, dim]
  Tensor wo;         // [dim, n_heads * head_dim]
  Tensor ffn_norm;   // [dim]
  ExpertWeights ffn;                  // dense models
  Tensor router;                      // MoE: [n_experts, dim]
  std::vector<ExpertWeights> experts;  // MoE
};

struct ModelWeights {
  Tensor tok_embeddings;  // [vocab_size, dim]
  Tensor norm;            // [dim]
  Tensor output;          // [vocab_size, dim] (the embedding itself when tied)
  std::vector<LayerWeights> layers;
};

enum class CheckpointLayout { kHuggingFace, kMistral };

// Called after each tensor with bytes done and bytes in all.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

struct Checkpoint {
  CheckpointLayout layout = CheckpointLayout::kHuggingFace;
  ModelConfig config;
  ModelWeights weights;
};

// Reads only the config of a model directory.
ModelConfig read_model_config(const std::string& model_dir);

// Loads config and weights, converted to `dtype` (float32 weights stored as float32 in the
// file are memory-mapped, not copied).
Checkpoint load_checkpoint(const std::string& model_dir, DType dtype, const ProgressFn& progress);

}  // namespace mc
