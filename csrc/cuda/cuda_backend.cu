// The CUDA backend: the op table of core/backend.h on one device and one stream. bf16/f16
// weights and activations, f32 residual stream and accumulation, cuBLAS for the projections,
// our kernels for everything else. The layer loop that calls these ops is runtime/forward.cpp.
#include "cuda/cuda_backend.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/quantized_placement.h"
#include "core/random.h"
#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/gemm.h"
#include "cuda/moe.cuh"
#include "cuda/quant_linear.cuh"
#include "cuda/sampling.cuh"
#include "cuda/weights.cuh"

namespace mc::cuda {
namespace {

void require_half(DType dtype, const char* what) {
  if (dtype == DType::kF32)
    fail(ErrorKind::kUnsupported, "CUDA ", what, ": the CUDA backend computes in bfloat16 or float16, not float32");
}

// A weight the kernels read as elements of the activation dtype.
void require_format(const WeightRef& w, DType act, const char* what) {
  if (dtype_of(w.format) != act)
    fail(ErrorKind::kUnsupported, "CUDA ", what, ": weight format ", weight_format_name(w.format),
         " with ", dtype_name(act), " activations (the CUDA backend takes weights in the activation dtype)");
}

int current_device() {
  int device = 0;
  MC_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// Every tensor a ModelWeights can hold, in one fixed order; the LM head only when it is not
// the embedding itself.
std::vector<Tensor*> tensors_of(ModelWeights& w, bool tied) {
  std::vector<Tensor*> tensors = {&w.tok_embeddings, &w.norm};
  if (!tied) tensors.push_back(&w.output);
  for (LayerWeights& layer : w.layers) {
    for (Tensor* t : {&layer.attn_norm, &layer.wqkv, &layer.wo, &layer.ffn_norm, &layer.w13, &layer.w2, &layer.router})
      tensors.push_back(t);
  }
  return tensors;
}

class CudaBackend : public Backend {
 public:
  CudaBackend() { MC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return "cuda"; }
  DType activation_dtype(DType weights) const override {
    require_half(weights, "weights");
    return weights;
  }

  // ---- memory ----
  std::shared_ptr<void> allocate(size_t bytes) override {
    std::shared_ptr<void> memory = device_alloc(bytes);
    if (bytes > 0) MC_CUDA_CHECK(cudaMemsetAsync(memory.get(), 0, bytes, stream_));
    MC_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return memory;
  }
  std::shared_ptr<void> allocate_host(size_t bytes) override {
    use_device();
    void* ptr = nullptr;
    const cudaError_t status = cudaMallocHost(&ptr, std::max<size_t>(bytes, 1));
    if (status != cudaSuccess) {
      cudaGetLastError();
      fail(ErrorKind::kOutOfMemory, "cudaMallocHost of ", bytes, " bytes failed: ", cudaGetErrorString(status));
    }
    return std::shared_ptr<void>(ptr, [](void* p) { cudaFreeHost(p); });
  }
  void copy_to_device(void* device, const void* host, size_t bytes) override {
    if (bytes == 0) return;
    use_device();
    MC_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void copy_to_host(void* host, const void* device, size_t bytes) override {
    if (bytes == 0) return;
    use_device();
    MC_CUDA_CHECK(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_));
  }
  void synchronize() override { MC_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  void push_range(const char* name) override { nvtxRangePushA(name); }
  void pop_range() override { nvtxRangePop(); }

  // ---- weights ----
  ModelWeights place_weights(const ModelConfig& config, ModelWeights host, std::optional<DType> dtype,
                             const ProgressFn& progress) override;
  ModelWeights random_weights(const ModelConfig& config, uint64_t seed, DType dtype,
                              const ProgressFn& progress) override;

  // ---- scratch ----
  size_t attention_workspace_bytes(const ModelConfig& config, const StepLimits& limits, DType act) override {
    use_device();  // the decode planning asks the current device for its SM count
    // The decode part of a step: at most max_entries single-token entries (so as many rows),
    // at most max_context keys each.
    AttentionParams p;
    p.tensors.n_heads = static_cast<int32_t>(config.n_heads);
    p.tensors.n_kv_heads = static_cast<int32_t>(config.n_kv_heads);
    p.tensors.head_dim = static_cast<int32_t>(config.head_dim);
    p.tensors.kv.n_entries = limits.max_entries;
    p.dtype = act;
    p.n_tokens = limits.max_entries;
    p.max_query_len = 1;
    p.max_context = limits.max_context;
    return cuda::attention_workspace_bytes(p);
  }
  size_t moe_workspace_bytes(const ModelConfig& config, const StepLimits& limits, DType act) override {
    if (!config.is_moe()) return 0;
    MoeExpertsParams experts;
    experts.n_tokens = limits.max_tokens;
    experts.n_experts = static_cast<int32_t>(config.n_experts);
    experts.top_k = static_cast<int32_t>(config.n_experts_per_tok);
    experts.dim = config.dim;
    experts.hidden = config.hidden_dim;
    experts.dtype = act;
    return moe_scratch(experts, nullptr).bytes;
  }

  // ---- ops ----
  void embedding(const EmbeddingParams& p) override {
    use_device();
    cuda::embedding(p, stream_);
  }
  void rms_norm(const RmsNormParams& p) override {
    use_device();
    cuda::rms_norm(p, stream_);
  }
  void linear(const LinearParams& p) override {
    use_device();
    if (is_quantized(p.w.format)) {
      // int8 / int4: the weight-only GEMV (<= 16 tokens) or dequantize + cuBLAS.
      QuantLinearParams q;
      q.x = p.x;
      q.w = p.w;
      q.y = p.y;
      q.n_tokens = p.n_tokens;
      q.act_dtype = p.x_dtype;
      q.out_dtype = p.y_dtype;
      NvtxRange range("quant_linear");
      quant_linear(q, quant_scratch(quant_linear_workspace_bytes(p.w, p.n_tokens, p.x_dtype)), gemm_, stream_);
      return;
    }
    require_format(p.w, p.x_dtype, "linear");
    if (p.w.count != 1)
      fail(ErrorKind::kInvalidRequest, "CUDA linear: a stack of ", p.w.count, " matrices is not one weight");
    NvtxRange range("linear");
    gemm_.linear(p.x, p.w.data, p.y, p.n_tokens, p.w.rows, p.w.cols, p.x_dtype, p.y_dtype, stream_);
  }
  void qkv_rope(const QkvRopeParams& p) override {
    use_device();
    cuda::qkv_rope(p, stream_);
  }
  void attention(const AttentionParams& p) override {
    use_device();
    cuda::paged_attention(p, stream_);
  }
  void kv_append(const KvAppendParams& p) override {
    use_device();
    cuda::kv_append(p, stream_);
  }
  void silu_mul(const SiluMulParams& p) override {
    use_device();
    cuda::silu_mul(p, stream_);
  }
  void copy_blocks(const CopyBlocksParams& p) override {
    use_device();
    NvtxRange range("copy_blocks");
    for (int32_t i = 0; i < p.n; ++i)
      for (void* pool : {p.k_pool, p.v_pool})
        MC_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(pool) + p.dst[i] * p.block_bytes,
                                      static_cast<const uint8_t*>(pool) + p.src[i] * p.block_bytes, p.block_bytes,
                                      cudaMemcpyDeviceToDevice, stream_));
  }
  void moe(const MoeParams& p) override;
  void moe_route(const MoeRouteParams& p) override {
    use_device();
    cuda::moe_route(p, stream_);
  }
  size_t sample_workspace_bytes(int32_t rows, int32_t vocab) override { return cuda::sample_workspace_bytes(rows, vocab); }
  void sample(const SampleParams& p) override {
    use_device();
    NvtxRange range("sample");
    cuda::sample(p, stream_);
  }

 private:
  // The caller (torch, another engine) may switch the thread's current device between calls;
  // the stream and the cuBLAS handle belong to device_.
  void use_device() const { MC_CUDA_CHECK(cudaSetDevice(device_)); }

  std::shared_ptr<void> device_alloc(size_t bytes) {
    use_device();
    void* ptr = nullptr;
    const cudaError_t status = cudaMalloc(&ptr, std::max<size_t>(bytes, 1));
    if (status != cudaSuccess) {
      cudaGetLastError();
      fail(ErrorKind::kOutOfMemory, "cudaMalloc of ", bytes, " bytes failed: ", cudaGetErrorString(status));
    }
    return std::shared_ptr<void>(ptr, [](void* p) { cudaFree(p); });
  }
  // A device tensor of `dtype` and `shape`, zero-filled.
  Tensor device_tensor(DType dtype, std::vector<int64_t> shape) {
    Tensor tensor = Tensor::view(nullptr, dtype, std::move(shape));
    tensor.storage = allocate(tensor.nbytes());
    tensor.data = tensor.storage.get();
    return tensor;
  }

  // Scratch of the quantized kernels, grown on first use to the largest step's need (so only
  // the first steps allocate).
  void* quant_scratch(size_t bytes) {
    if (bytes > quant_scratch_bytes_) {
      quant_scratch_ = device_alloc(bytes);
      quant_scratch_bytes_ = bytes;
    }
    return quant_scratch_.get();
  }

  int device_ = current_device();  // the backend's device: current at construction
  std::shared_ptr<void> quant_scratch_;
  size_t quant_scratch_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  Gemm gemm_;                       // its cuBLAS handle (opened on that device)
};

ModelWeights CudaBackend::place_weights(const ModelConfig& config, ModelWeights host, std::optional<DType> dtype,
                                        const ProgressFn& progress) {
  NvtxRange range("place weights");
  const DType target = dtype.value_or(host.layers.empty() ? host.tok_embeddings.dtype : host.layers[0].wqkv.dtype);
  require_half(target, "place_weights");
  ModelWeights device;
  device.layers.resize(host.layers.size());
  std::vector<Tensor*> sources = tensors_of(host, config.tie_embeddings);
  std::vector<Tensor*> targets = tensors_of(device, config.tie_embeddings);
  int64_t total = 0, done = 0;
  size_t staging_bytes = 0;  // the largest tensor that needs converting
  for (const Tensor* src : sources) {
    if (!src->defined()) continue;
    total += static_cast<int64_t>(src->nbytes());
    if (src->dtype != target) staging_bytes = std::max(staging_bytes, src->nbytes());
  }
  std::shared_ptr<void> staging = staging_bytes > 0 ? device_alloc(staging_bytes) : nullptr;
  for (size_t i = 0; i < sources.size(); ++i) {
    Tensor& src = *sources[i];
    if (!src.defined()) continue;  // a dense layer's router
    Tensor& dst = *targets[i];
    dst = device_tensor(target, src.shape);
    if (src.dtype == target) {
      MC_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyHostToDevice, stream_));
    } else {
      MC_CUDA_CHECK(cudaMemcpyAsync(staging.get(), src.data, src.nbytes(), cudaMemcpyHostToDevice, stream_));
      convert_weights(staging.get(), src.dtype, dst.data, target, src.numel(), stream_);
    }
    // The staging buffer is reused by the next tensor, and the host copy is released now.
    MC_CUDA_CHECK(cudaStreamSynchronize(stream_));
    done += static_cast<int64_t>(src.nbytes());
    src = Tensor();
    if (progress) progress(done, total);
  }
  // Quantized layer matrices (int8 / int4): device copies in the same layout.
  for (size_t l = 0; l < host.layers.size(); ++l) {
    const LayerWeights& from = host.layers[l];
    LayerWeights& to = device.layers[l];
    for (auto [src, dst] : {std::pair{&from.wqkv_q, &to.wqkv_q}, std::pair{&from.wo_q, &to.wo_q},
                            std::pair{&from.w13_q, &to.w13_q}, std::pair{&from.w2_q, &to.w2_q}})
      *dst = to_backend(*this, *src);
    synchronize();
  }
  device.quantization = host.quantization;
  if (config.tie_embeddings) device.output = device.tok_embeddings;
  return device;
}

ModelWeights CudaBackend::random_weights(const ModelConfig& config, uint64_t seed, DType dtype,
                                         const ProgressFn& progress) {
  NvtxRange range("random weights");
  require_half(dtype, "random_weights");
  config.validate();
  ModelWeights device;
  // The slots and their numbering of core's random_weights(): slot i draws from
  // weight_stream(seed, i) into its target from element `offset` on.
  std::vector<WeightSlot> slots = weight_slots(config, device);
  for (const WeightSlot& slot : slots)
    if (!slot.target->defined()) *slot.target = device_tensor(dtype, slot.target_shape);
  const size_t elem = dtype_size(dtype);
  int64_t total = 0, done = 0;
  for (const WeightSlot& slot : slots) {
    int64_t count = 1;
    for (int64_t extent : slot.shape) count *= extent;
    total += count * static_cast<int64_t>(elem);
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    const WeightSlot& slot = slots[i];
    int64_t count = 1;
    for (int64_t extent : slot.shape) count *= extent;
    void* dst = static_cast<uint8_t*>(slot.target->data) + static_cast<size_t>(slot.offset) * elem;
    fill_random_weights(dst, dtype, count, weight_stream(seed, i), slot.shape.size() == 1, stream_);
    done += count * static_cast<int64_t>(elem);
    if (progress) {
      // The host learns of each tensor once it is drawn (and can cancel between tensors).
      MC_CUDA_CHECK(cudaStreamSynchronize(stream_));
      progress(done, total);
    }
  }
  MC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (config.tie_embeddings) device.output = device.tok_embeddings;
  return device;
}

void CudaBackend::moe(const MoeParams& p) {
  use_device();
  const int64_t E = p.router.rows, D = p.router.cols, F = p.w2.cols;
  require_format(p.router, p.dtype, "moe router");
  const bool quantized = is_quantized(p.w13.format);
  if (!quantized) {
    require_format(p.w13, p.dtype, "moe w13");
    require_format(p.w2, p.dtype, "moe w2");
  }
  if (p.router.count != 1 || p.w13.count != E || p.w13.rows != 2 * F || p.w13.cols != D || p.w2.count != E ||
      p.w2.rows != D)
    fail(ErrorKind::kInvalidRequest, "CUDA moe: inconsistent weights: router [", p.router.rows, ", ", p.router.cols,
         "], w13 [", p.w13.count, ", ", p.w13.rows, ", ", p.w13.cols, "], w2 [", p.w2.count, ", ", p.w2.rows, ", ",
         p.w2.cols, "]");
  if (p.n_tokens < 0 || p.n_tokens > 0x7fffffff)
    fail(ErrorKind::kInvalidRequest, "CUDA moe: n_tokens ", p.n_tokens, " out of range");
  if (E > 0x7fffffff) fail(ErrorKind::kUnsupported, "CUDA moe: ", E, " experts");

  MoeExpertsParams experts;
  experts.x = p.x;
  experts.w13 = p.w13.data;
  experts.w2 = p.w2.data;
  experts.residual = p.residual;
  experts.n_tokens = static_cast<int32_t>(p.n_tokens);
  experts.n_experts = static_cast<int32_t>(E);
  experts.top_k = p.top_k;
  experts.dim = D;
  experts.hidden = F;
  experts.dtype = p.dtype;
  const MoeScratch scratch = moe_scratch(experts, p.workspace);  // also checks the sizes
  if (p.n_tokens == 0) return;
  if (p.workspace == nullptr) fail(ErrorKind::kInvalidRequest, "CUDA moe: no workspace");
  NvtxRange range("moe");

  gemm_.linear(p.x, p.router.data, scratch.router_logits, p.n_tokens, E, D, p.dtype, DType::kF32, stream_);

  MoeRouteParams route;
  route.router_logits = scratch.router_logits;
  route.expert_ids = scratch.expert_ids;
  route.weights = scratch.weights;
  route.expert_offsets = scratch.expert_offsets;
  route.sorted_pairs = scratch.sorted_pairs;
  route.n_tokens = experts.n_tokens;
  route.n_experts = experts.n_experts;
  route.top_k = experts.top_k;
  cuda::moe_route(route, stream_);

  if (quantized) {
    // Quantized experts: the same routing feeds their kernels.
    QuantMoeParams q;
    q.x = p.x;
    q.w13 = p.w13;
    q.w2 = p.w2;
    q.expert_offsets = route.expert_offsets;
    q.sorted_pairs = route.sorted_pairs;
    q.weights = route.weights;
    q.residual = p.residual;
    q.n_tokens = route.n_tokens;
    q.top_k = route.top_k;
    q.act_dtype = p.dtype;
    quant_moe_experts(q, quant_scratch(quant_moe_workspace_bytes(q)), stream_);
    return;
  }
  experts.expert_offsets = route.expert_offsets;
  experts.sorted_pairs = route.sorted_pairs;
  experts.weights = route.weights;
  moe_experts(experts, scratch.experts, stream_);
}

}  // namespace

std::unique_ptr<Backend> make_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace mc::cuda
