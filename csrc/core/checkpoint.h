// Loading a model directory in either layout:
//   Hugging Face: config.json + model.safetensors, or model-0000X-of-0000N.safetensors with
//                 model.safetensors.index.json; q/k rows permuted for half-rotation RoPE.
//   Mistral:      params.json + consolidated.safetensors; q/k rows in interleaved-pair order.
// Weights come out in one canonical form (HF's half-rotation q/k order), so the backends keep
// a single RoPE implementation.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
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

// Loads config and weights. With `dtype` set, weights are converted to it; without, they keep
// the dtype stored in the file. Tensors already in their final form are views of the file, not
// copies: with use_mmap, views of its memory mapping (the file must then not be modified or
// truncated while they live: SIGBUS or changed weights); without, of a private copy read at
// load time (the file may change freely afterwards).
Checkpoint load_checkpoint(const std::string& model_dir, std::optional<DType> dtype, const ProgressFn& progress,
                           bool use_mmap = true);

// Every weight tensor of a model: Hugging Face name, shape, and its slot in `weights`.
struct WeightSlot {
  std::string name;
  std::vector<int64_t> shape;
  Tensor* target;
};
std::vector<WeightSlot> weight_slots(const ModelConfig& config, ModelWeights& weights);

// A random model in float32 host memory (see core/random.h: the GPU draws the same numbers).
ModelWeights random_weights(const ModelConfig& config, uint64_t seed);

}  // namespace mc
