// The op table a backend (cpu/, cuda/) implements. The runtime (runtime/model_runner.*) owns the
// layer loop and calls these ops; a backend only runs them, on its own device and stream, in
// call order. Every op takes one plain Params struct (core/op_params.h); pointers name memory
// of the backend's device, allocated through allocate().
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/op_params.h"

namespace mc {

// Bounds of every step the runtime will run, fixed at load: workspaces are sized from them once.
struct StepLimits {
  int32_t max_tokens = 0;       // token rows of one forward pass
  int32_t max_entries = 0;      // sequences of one forward pass
  int32_t max_logit_rows = 0;   // LM-head rows computed at once
  int64_t max_context = 0;      // most keys one query can see (max_seq_len, or the window)
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;  // "cpu" | "cuda"
  // The activation dtype for weights stored as `weights` (the CPU computes in float32; CUDA in
  // the weights' half dtype).
  virtual DType activation_dtype(DType weights) const = 0;

  // ---- memory (device memory for CUDA, host memory for the CPU) ----
  // Zero-filled device memory, freed with the last copy of the pointer.
  virtual std::shared_ptr<void> allocate(size_t bytes) = 0;
  // Host memory the backend copies from and to fastest (pinned for CUDA).
  virtual std::shared_ptr<void> allocate_host(size_t bytes) = 0;
  // Asynchronous in the backend's stream order; host buffers must stay valid until synchronize().
  virtual void copy_to_device(void* device, const void* host, size_t bytes) = 0;
  virtual void copy_to_host(void* host, const void* device, size_t bytes) = 0;
  virtual void synchronize() = 0;

  // ---- profiling ----
  // Named ranges around a group of ops (a layer, the LM head): NVTX ranges on CUDA, seen in
  // Nsight Systems next to each op's own range; nothing on the CPU. Use BackendRange.
  virtual void push_range(const char* /*name*/) {}
  virtual void pop_range() {}

  // ---- weights ----
  // The checkpoint's weights on this backend, as `dtype` (nullopt: as stored). Norm weights
  // become the activation dtype. Progress is reported in bytes.
  virtual ModelWeights place_weights(const ModelConfig& config, ModelWeights host, std::optional<DType> dtype,
                                     const ProgressFn& progress) = 0;
  // A random model drawn from `seed` (core/random.h: the same numbers on every backend);
  // progress in bytes.
  virtual ModelWeights random_weights(const ModelConfig& config, uint64_t seed, DType dtype,
                                      const ProgressFn& progress) = 0;

  // ---- scratch the ops need for any step within `limits` ----
  virtual size_t attention_workspace_bytes(const ModelConfig& config, const StepLimits& limits, DType act) = 0;
  virtual size_t moe_workspace_bytes(const ModelConfig& config, const StepLimits& limits, DType act) = 0;
  virtual size_t sample_workspace_bytes(int32_t rows, int32_t vocab) = 0;

  // ---- ops ----
  virtual void embedding(const EmbeddingParams& p) = 0;
  virtual void rms_norm(const RmsNormParams& p) = 0;
  virtual void linear(const LinearParams& p) = 0;
  virtual void qkv_rope(const QkvRopeParams& p) = 0;
  // Paged attention over the whole step: decode entries and prefill entries each take their kernel.
  virtual void attention(const AttentionParams& p) = 0;
  virtual void kv_append(const KvAppendParams& p) = 0;
  virtual void copy_blocks(const CopyBlocksParams& p) = 0;
  virtual void silu_mul(const SiluMulParams& p) = 0;
  // Mixtral's MoE FFN: routing (as moe_route) and the experts, added into the residual.
  virtual void moe(const MoeParams& p) = 0;
  // The routing step alone (for the backend-comparison tests of its exactness).
  virtual void moe_route(const MoeRouteParams& p) = 0;
  // Sampling over logits where they live (SamplingControls in core/op_params.h).
  virtual void sample(const SampleParams& p) = 0;
};

// Backend::push_range for the lifetime of the object.
class BackendRange {
 public:
  BackendRange(Backend& backend, const char* name) : backend_(backend) { backend_.push_range(name); }
  ~BackendRange() { backend_.pop_range(); }
  BackendRange(const BackendRange&) = delete;
  BackendRange& operator=(const BackendRange&) = delete;

 private:
  Backend& backend_;
};

}  // namespace mc
