// The model runner: one call to step() runs a batch of (sequence, new tokens) entries, mixing
// prefill chunks and decode tokens, through the paged KV cache, and returns logits.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/block_manager.h"
#include "core/checkpoint.h"
#include "core/config.h"

namespace mc {

struct ModelOptions {
  std::string device = "cpu";  // "cpu" | "cuda" | "auto"
  std::optional<DType> dtype;  // unset: float32 on the CPU, bfloat16 on CUDA
  int32_t block_size = 16;
  int64_t num_blocks = 0;      // 0 = default_num_blocks()
  ProgressFn progress;         // called while weights load
  bool use_mmap = true;        // false: weights read into private memory (the file may change after load)
};

struct StepEntry {
  int32_t seq = 0;
  std::vector<int64_t> tokens;  // wide so that out-of-range ids are caught, not wrapped
};

class Model {
 public:
  static std::unique_ptr<Model> load(const std::string& model_dir, const ModelOptions& options);
  // A model of `config` with random weights drawn from `seed` (core/random.h), built directly
  // on the device: for benchmarks without a checkpoint.
  static std::unique_ptr<Model> from_config(const ModelConfig& config, uint64_t seed, const ModelOptions& options);

  const ModelConfig& config() const { return config_; }
  const std::string& device() const { return device_; }
  DType dtype() const { return dtype_; }
  int32_t block_size() const { return blocks_.layout().block_size; }
  int64_t num_blocks() const { return blocks_.num_blocks(); }

  // Thread-safe: calls from several threads are serialized.
  int32_t add_sequence();
  void free_sequence(int32_t seq);
  int64_t blocks_in_use(int32_t seq) const;
  int64_t sequence_length(int32_t seq) const;
  int64_t free_blocks() const;

  // Rows of logits step() writes: one per entry, or one per token with all_logits.
  static int64_t logit_rows(const std::vector<StepEntry>& entries, bool all_logits);

  // Validates the whole batch first (nothing changes on error), appends each entry's K/V to
  // its sequence and writes logits [logit_rows, vocab_size] to `logits` in entry order.
  void step(const std::vector<StepEntry>& entries, bool all_logits, float* logits);

  // Enough blocks for four sequences at full length (a window's ring under sliding-window
  // attention), capped near 8 GiB of K/V in `dtype` unless one sequence needs more.
  static int64_t default_num_blocks(const ModelConfig& config, int32_t block_size, DType dtype);

 private:
  Model(ModelConfig config, KvLayout layout, int64_t num_blocks, std::string device, DType dtype);
  // Checks options, resolves device and dtype, and builds the model with no backend yet.
  static std::unique_ptr<Model> prepare(const ModelConfig& config, const ModelOptions& options);
  BackendInit backend_init(const ModelOptions& options) const;
  void validate(const std::vector<StepEntry>& entries) const;

  ModelConfig config_;
  BlockManager blocks_;
  std::string device_;
  DType dtype_;
  std::unique_ptr<Backend> backend_;
  mutable std::mutex mutex_;  // guards blocks_ and the backend's cache
};

}  // namespace mc
