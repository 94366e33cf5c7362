#include "cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "cpu/attention.h"
#include "cpu/dense_ops.h"
#include "cpu/moe.h"
#include "cpu/sampling.h"

namespace mc::cpu {
namespace {

void require_f32(DType dtype, const char* op) {
  if (dtype != DType::kF32)
    fail(ErrorKind::kInvalidRequest, "CPU ", op, ": activations must be float32, got ", dtype_name(dtype));
}

// `tensor` as `dtype`: itself when it already is, else a converted copy.
Tensor converted(const Tensor& tensor, DType dtype) {
  if (!tensor.defined() || tensor.dtype == dtype) return tensor;
  Tensor out = Tensor::empty(dtype, tensor.shape);
  convert(tensor.data, tensor.dtype, out.data, dtype, static_cast<size_t>(tensor.numel()));
  return out;
}

// Matrices as `dtype` (unset: as they are), norm weights as float32 (the activation dtype).
ModelWeights place(const ModelConfig& config, ModelWeights w, std::optional<DType> dtype) {
  auto matrix = [&](Tensor& t) {
    if (dtype) t = converted(t, *dtype);
  };
  matrix(w.tok_embeddings);
  w.norm = converted(w.norm, DType::kF32);
  for (LayerWeights& layer : w.layers) {
    layer.attn_norm = converted(layer.attn_norm, DType::kF32);
    layer.ffn_norm = converted(layer.ffn_norm, DType::kF32);
    for (Tensor* t : {&layer.wqkv, &layer.wo, &layer.w13, &layer.w2, &layer.router}) matrix(*t);
  }
  if (config.tie_embeddings) {
    w.output = w.tok_embeddings;
  } else {
    matrix(w.output);
  }
  return w;
}

class CpuBackend : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  DType activation_dtype(DType) const override { return DType::kF32; }

  std::shared_ptr<void> allocate(size_t bytes) override {
    // calloc takes large blocks straight from fresh zeroed pages: workspace and KV-pool pages
    // that no step touches cost no resident memory.
    void* memory = std::calloc(bytes == 0 ? 1 : bytes, 1);
    if (memory == nullptr) fail(ErrorKind::kOutOfMemory, "out of host memory allocating ", bytes, " bytes");
    return std::shared_ptr<void>(memory, std::free);
  }
  std::shared_ptr<void> allocate_host(size_t bytes) override { return allocate(bytes); }
  void copy_to_device(void* device, const void* host, size_t bytes) override { std::memcpy(device, host, bytes); }
  void copy_to_host(void* host, const void* device, size_t bytes) override { std::memcpy(host, device, bytes); }
  void synchronize() override {}

  ModelWeights place_weights(const ModelConfig& config, ModelWeights host, std::optional<DType> dtype,
                             const ProgressFn&) override {
    return place(config, std::move(host), dtype);
  }
  ModelWeights random_weights(const ModelConfig& config, uint64_t seed, DType dtype,
                              const ProgressFn& progress) override {
    return place(config, mc::random_weights(config, seed, dtype, progress), std::nullopt);
  }

  size_t attention_workspace_bytes(const ModelConfig&, const StepLimits&, DType) override { return 0; }
  size_t moe_workspace_bytes(const ModelConfig& c, const StepLimits& limits, DType) override {
    if (!c.is_moe()) return 0;
    return cpu::moe_workspace_bytes(limits.max_tokens, c.n_experts, c.n_experts_per_tok, c.dim, c.hidden_dim);
  }

  size_t sample_workspace_bytes(int32_t rows, int32_t vocab) override { return cpu::sample_workspace_bytes(rows, vocab); }

  void embedding(const EmbeddingParams& p) override { cpu::embedding(p); }
  void rms_norm(const RmsNormParams& p) override {
    require_f32(p.dtype, "rms_norm");
    cpu::rms_norm(p);
  }
  void linear(const LinearParams& p) override {
    require_f32(p.x_dtype, "linear");
    require_f32(p.y_dtype, "linear");
    cpu::linear(static_cast<const float*>(p.x), p.w, static_cast<float*>(p.y), p.n_tokens);
  }
  void qkv_rope(const QkvRopeParams& p) override {
    require_f32(p.dtype, "qkv_rope");
    cpu::qkv_rope(p);
  }
  void attention(const AttentionParams& p) override {
    require_f32(p.dtype, "attention");
    paged_attention(typed<float>(p.tensors));
  }
  void kv_append(const KvAppendParams& p) override {
    require_f32(p.dtype, "kv_append");
    cpu::kv_append(typed<float>(p.tensors));
  }
  void copy_blocks(const CopyBlocksParams& p) override {
    for (int32_t i = 0; i < p.n; ++i)
      for (void* pool : {p.k_pool, p.v_pool})
        std::memcpy(static_cast<uint8_t*>(pool) + p.dst[i] * p.block_bytes,
                    static_cast<const uint8_t*>(pool) + p.src[i] * p.block_bytes, p.block_bytes);
  }
  void silu_mul(const SiluMulParams& p) override {
    require_f32(p.dtype, "silu_mul");
    cpu::silu_mul(p);
  }
  void moe(const MoeParams& p) override {
    require_f32(p.dtype, "moe");
    cpu::moe(p);
  }
  void sample(const SampleParams& p) override { cpu::sample(p); }
  void moe_route(const MoeRouteParams& p) override {
    cpu::moe_route(p.router_logits, p.n_tokens, p.n_experts, p.top_k, p.expert_ids, p.weights, p.expert_offsets,
                   p.sorted_pairs);
  }
};

}  // namespace

std::unique_ptr<Backend> make_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace mc::cpu
