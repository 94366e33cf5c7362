// What a backend (CPU reference, CUDA) implements: the forward pass over one flattened step.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/kv_layout.h"

namespace mc {

// One step's batch flattened like variable-length attention: all new tokens of all entries as
// one list of T tokens, entry e owning rows cu_seqlens[e] .. cu_seqlens[e + 1].
struct StepBatch {
  std::vector<int32_t> tokens;        // [T]
  std::vector<int64_t> positions;     // [T] absolute positions
  std::vector<int32_t> cu_seqlens;    // [n_entries + 1]
  std::vector<int64_t> start_pos;     // [n_entries] cached length before this step
  std::vector<int32_t> block_tables;  // [n_entries, max_blocks], -1 = unallocated
  int32_t max_blocks = 0;
  std::vector<int32_t> logit_rows;    // token rows whose logits are returned, in output order

  int32_t n_entries() const { return static_cast<int32_t>(start_pos.size()); }
  int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Runs every layer, writes the K/V that must stay cached into the pools, and writes logits
  // [batch.logit_rows.size(), vocab_size] (float32, host memory) to `logits`.
  virtual void forward(const StepBatch& batch, float* logits) = 0;
};

// What every backend is built from, besides its weights.
struct BackendInit {
  ModelConfig config;
  KvLayout layout;
  int64_t num_blocks = 0;
  DType dtype = DType::kF32;  // weights and activations (the CPU backend: float32)
  ProgressFn progress;        // weight upload progress, in bytes
};

// The CUDA backend (cuda/cuda_backend.cu; without CUDA, no_cuda.cpp fails with kUnsupported):
// from host weights of any float dtype, converted on the device, or from random weights drawn
// on the device (the same numbers random_weights() draws on the host).
std::unique_ptr<Backend> make_cuda_backend(const BackendInit& init, const ModelWeights& host_weights);
std::unique_ptr<Backend> make_random_cuda_backend(const BackendInit& init, uint64_t seed);

}  // namespace mc
