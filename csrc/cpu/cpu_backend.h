// The CPU backend: float32 reference of the whole forward pass.
#pragma once

#include <vector>

#include "core/backend.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/kv_layout.h"
#include "core/tensor.h"

namespace mc::cpu {

class CpuBackend : public Backend {
 public:
  CpuBackend(const ModelConfig& config, ModelWeights weights, KvLayout layout, int64_t num_blocks);
  void forward(const StepBatch& batch, float* logits) override;

 private:
  void attention_block(const LayerWeights& layer, int64_t layer_index, const StepBatch& batch, float* x);

  ModelConfig config_;
  ModelWeights weights_;
  KvLayout layout_;
  std::vector<Tensor> k_pools_;  // per layer [num_blocks, block_size, n_kv_heads, head_dim]
  std::vector<Tensor> v_pools_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
  // Per-step scratch, [T, ...]
  std::vector<float> rope_cos_, rope_sin_;
};

}  // namespace mc::cpu
