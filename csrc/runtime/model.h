// The model runner: one call to step() runs a batch of (sequence, new tokens) entries, mixing
// prefill chunks and decode tokens, through the paged KV cache, and returns logits. It owns the
// block manager and the backend; the layer loop is ForwardPass (runtime/forward.h).
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
#include "runtime/forward.h"

namespace mc {

struct ModelOptions {
  std::string device = "cpu";  // "cpu" | "cuda" | "auto"
  // Weight dtype. CPU: unset keeps the checkpoint's (float32 for from_config), any float dtype
  // converts (activations are float32 either way). CUDA: bfloat16 (default) or float16, for
  // weights and activations.
  std::optional<DType> dtype;
  // Quantize-on-load of the layer matrices (core/quantized.h): kInt8, or kInt4 in groups of
  // kDefaultInt4GroupSize; nullopt keeps them as stored (AWQ/GPTQ checkpoints load as int4).
  std::optional<WeightFormat> quantization;
  bool quantize_activations = false;  // CPU fast mode of quantized weights (cpu/quantized_activations.h)
  int32_t block_size = 16;
  int64_t num_blocks = 0;       // 0 = default_num_blocks()
  bool use_mmap = true;         // see LoadOptions
  int32_t max_step_tokens = 0;  // tokens of one forward pass (0 = 2048); larger steps run as several
  int32_t max_step_seqs = 0;    // sequences of one forward pass (0 = 256)
  ProgressFn progress;          // called while weights load
};

struct StepEntry {
  int32_t seq = 0;
  std::vector<int64_t> tokens;  // wide so that out-of-range ids are caught, not wrapped
};

// How to sample the next token after an entry's last token (see SamplingControls).
struct EntrySampling {
  SamplingControls controls;
  const std::vector<int32_t>* history_ids = nullptr;    // distinct prompt and output tokens
  const std::vector<int32_t>* output_counts = nullptr;  // their counts in the output
  const std::vector<std::pair<int32_t, float>>* logit_bias = nullptr;
  const std::vector<int32_t>* banned = nullptr;         // masked this step (min_tokens)
};

class Model {
 public:
  static std::unique_ptr<Model> load(const std::string& model_dir, const ModelOptions& options);
  // A model of `config` with random weights drawn from `seed` (core/random.h), built directly
  // on the device: for benchmarks without a checkpoint.
  static std::unique_ptr<Model> from_config(const ModelConfig& config, uint64_t seed, const ModelOptions& options);
  ~Model();

  const ModelConfig& config() const { return config_; }
  const std::string& device() const { return device_; }
  DType dtype() const { return dtype_; }  // of the float weight matrices
  // How the layer matrices are stored: "" (float), "int8", "int4", "awq" or "gptq".
  const std::string& quantization() const { return quantization_; }
  int32_t block_size() const { return blocks_.layout().block_size; }
  int64_t num_blocks() const { return blocks_.num_blocks(); }
  const StepLimits& step_limits() const { return forward_->limits(); }
  double compute_seconds() const { return forward_->compute_seconds(); }  // see ForwardPass

  // Thread-safe: calls from several threads are serialized.
  int32_t add_sequence();
  // A copy of `seq` (its cached K/V copied into fresh blocks): decoding it leaves `seq` as is.
  // Throws kCacheFull when the pool lacks blocks_in_use(seq) free blocks.
  int32_t fork_sequence(int32_t seq);
  void free_sequence(int32_t seq);
  int64_t blocks_in_use(int32_t seq) const;
  int64_t sequence_length(int32_t seq) const;
  int64_t free_blocks() const;

  // Rows of logits step() writes: one per entry, or one per token with all_logits.
  static int64_t logit_rows(const std::vector<StepEntry>& entries, bool all_logits);

  // Validates the whole batch first (nothing changes on error), appends each entry's K/V to
  // its sequence and writes logits [logit_rows, vocab_size] to `logits` in entry order. A step
  // beyond the forward pass's limits runs as several passes (long prompts in chunks).
  void step(const std::vector<StepEntry>& entries, bool all_logits, float* logits);

  // The same step, sampling on the backend instead of returning logits: entry e with
  // sampling[e] set gets (*sampled)[e]; the others (prompt chunks not yet complete) none.
  void step_and_sample(const std::vector<StepEntry>& entries, const std::vector<const EntrySampling*>& sampling,
                       std::vector<SampledToken>* sampled);

  // A KV cache of num_blocks blocks (0 = default_num_blocks) in place of the current one, which
  // must hold no sequence (throws kInvalidRequest otherwise); on any error nothing changes.
  void resize_kv_cache(int64_t num_blocks);

  // Blocks that appending n tokens to `seq` would newly take (0 for a new sequence: seq = -1).
  int64_t blocks_needed(int32_t seq, int64_t n) const;

  // Enough blocks for four sequences at full length (a window's ring under sliding-window
  // attention), capped near 8 GiB of K/V in `kv_dtype` unless one sequence needs more.
  static int64_t default_num_blocks(const ModelConfig& config, int32_t block_size, DType kv_dtype);

 private:
  Model(ModelConfig config, KvLayout layout, int64_t num_blocks, std::string device, DType dtype,
        std::unique_ptr<Backend> backend);
  // Checks options, resolves device and dtype, creates the backend; no weights yet.
  static std::unique_ptr<Model> prepare(const ModelConfig& config, const ModelOptions& options, DType dtype);
  void start(ModelWeights weights, const ModelOptions& options);
  void validate(const std::vector<StepEntry>& entries) const;
  void run_step(const std::vector<StepEntry>& entries, bool all_logits, float* logits,
                const std::vector<const EntrySampling*>* sampling, std::vector<SampledToken>* sampled);

  ModelConfig config_;
  BlockManager blocks_;
  std::string device_;
  DType dtype_;
  std::string quantization_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<ForwardPass> forward_;
  mutable std::mutex mutex_;  // guards blocks_ and the backend's cache
};

}  // namespace mc
