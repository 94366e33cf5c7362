// The CUDA backend: bf16/f16 weights and activations, f32 residual stream and accumulation,
// cuBLAS for the projections, our kernels for everything else. Shapes: T = tokens of the step,
// R = rows whose logits are returned, D = dim, F = FFN width, V = vocab.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/random.h"
#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/gemm.h"
#include "cuda/moe.cuh"
#include "cuda/weights.cuh"

namespace mc {
namespace cuda {
namespace {

// Device memory owned through a shared_ptr, so a Tensor (core/tensor.h) can hold it.
std::shared_ptr<void> device_alloc(size_t bytes) {
  void* ptr = nullptr;
  cudaError_t status = cudaMalloc(&ptr, std::max<size_t>(bytes, 1));
  if (status != cudaSuccess) {
    cudaGetLastError();
    fail(ErrorKind::kOutOfMemory, "cudaMalloc of ", bytes, " bytes failed: ", cudaGetErrorString(status));
  }
  return std::shared_ptr<void>(ptr, [](void* p) { cudaFree(p); });
}

Tensor device_tensor(DType dtype, std::vector<int64_t> shape) {
  Tensor tensor = Tensor::view(nullptr, dtype, std::move(shape));
  tensor.storage = device_alloc(tensor.nbytes());
  tensor.data = tensor.storage.get();
  return tensor;
}

// A grow-only device scratch buffer: per-step activations are reused across steps.
class Scratch {
 public:
  void* get(size_t bytes) {
    if (bytes > bytes_) {
      memory_ = device_alloc(bytes);
      bytes_ = bytes;
    }
    return memory_.get();
  }

 private:
  std::shared_ptr<void> memory_;
  size_t bytes_ = 0;
};

// Step metadata packed into one host buffer and sent with one copy; offsets are 16-aligned.
class MetaPacker {
 public:
  template <typename T>
  size_t add(const std::vector<T>& values) {
    size_t offset = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(offset + values.size() * sizeof(T));
    if (!values.empty()) std::memcpy(bytes_.data() + offset, values.data(), values.size() * sizeof(T));
    return offset;
  }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(const BackendInit& init);
  ~CudaBackend() override;

  void upload(const ModelWeights& host);
  void randomize(uint64_t seed);
  void forward(const StepBatch& batch, float* logits) override;

 private:
  // Allocates every weight on the device; w1 and w3 share one [2F, D] buffer per layer so the
  // gate and up projections run as one GEMM. MoE layers stack their experts: w13 [E, 2F, D] and
  // w2 [E, D, F], the layout the MoE kernels read.
  std::vector<WeightSlot> allocate_weights();
  // Adds the layer's sparse-MoE FFN output of h [T, D] straight into the residual x.
  void moe_ffn(const LayerWeights& layer, const void* h, float* x, int64_t T);
  void linear(const void* x, const Tensor& w, void* y, int64_t T, DType out) {
    gemm_.linear(x, w.data, y, T, w.shape[0], w.shape[1], dtype_, out, stream_);
  }

  ModelConfig config_;
  KvLayout layout_;
  DType dtype_;
  ProgressFn progress_;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  Gemm gemm_;
  ModelWeights weights_;            // device memory
  std::vector<Tensor> k_pools_;     // per layer [num_blocks, block_size, KVH, Dh]
  std::vector<Tensor> v_pools_;
  Tensor inv_freq_;                 // [Dh / 2] f32
  Scratch meta_, residual_, hidden_, q_, k_, v_, attn_, proj_, gate_up_, act_, rows_, logits_, workspace_;
  Scratch router_logits_, expert_ids_, expert_weights_, expert_offsets_, sorted_pairs_, moe_workspace_;
};

CudaBackend::CudaBackend(const BackendInit& init)
    : config_(init.config), layout_(init.layout), dtype_(init.dtype), progress_(init.progress) {
  MC_CUDA_CHECK(cudaGetDevice(&device_));
  MC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  const int64_t half = config_.head_dim / 2;
  std::vector<float> inv_freq = rope_inv_freq(config_.head_dim, config_.rope_theta);
  inv_freq_ = device_tensor(DType::kF32, {half});
  MC_CUDA_CHECK(cudaMemcpy(inv_freq_.data, inv_freq.data(), half * sizeof(float), cudaMemcpyHostToDevice));
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    for (auto* pools : {&k_pools_, &v_pools_}) {
      pools->push_back(device_tensor(dtype_, {init.num_blocks, layout_.block_size, config_.n_kv_heads, config_.head_dim}));
      MC_CUDA_CHECK(cudaMemsetAsync(pools->back().data, 0, pools->back().nbytes(), stream_));
    }
  }
}

CudaBackend::~CudaBackend() {
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
}

std::vector<WeightSlot> CudaBackend::allocate_weights() {
  std::vector<WeightSlot> slots = weight_slots(config_, weights_);
  const int64_t F = config_.hidden_dim, D = config_.dim;
  const size_t elem = dtype_size(dtype_);
  // A view of `rows` x `cols` at element offset `offset` of `base`, sharing its memory.
  auto view = [&](const Tensor& base, int64_t offset, int64_t rows, int64_t cols) {
    Tensor tensor = Tensor::view(static_cast<uint8_t*>(base.data) + offset * elem, dtype_, {rows, cols});
    tensor.storage = base.storage;
    return tensor;
  };
  for (LayerWeights& layer : weights_.layers) {
    if (!config_.is_moe()) {
      Tensor w13 = device_tensor(dtype_, {2 * F, D});
      layer.ffn.w1 = view(w13, 0, F, D);
      layer.ffn.w3 = view(w13, F * D, F, D);
      continue;
    }
    const int64_t E = config_.n_experts;
    Tensor w13 = device_tensor(dtype_, {E, 2 * F, D});
    Tensor w2 = device_tensor(dtype_, {E, D, F});
    for (int64_t e = 0; e < E; ++e) {
      layer.experts[e].w1 = view(w13, e * 2 * F * D, F, D);
      layer.experts[e].w3 = view(w13, e * 2 * F * D + F * D, F, D);
      layer.experts[e].w2 = view(w2, e * D * F, D, F);
    }
  }
  for (WeightSlot& slot : slots)
    if (!slot.target->defined()) *slot.target = device_tensor(dtype_, slot.shape);
  return slots;
}

void CudaBackend::upload(const ModelWeights& host) {
  NvtxRange range("upload weights");
  ModelWeights& host_view = const_cast<ModelWeights&>(host);  // only read: slots name the host tensors
  std::vector<WeightSlot> sources = weight_slots(config_, host_view);
  std::vector<WeightSlot> targets = allocate_weights();
  int64_t total = 0, done = 0;
  for (const WeightSlot& slot : sources) total += static_cast<int64_t>(slot.target->nbytes());
  Scratch staging;
  for (size_t i = 0; i < sources.size(); ++i) {
    const Tensor& src = *sources[i].target;
    Tensor& dst = *targets[i].target;
    if (src.dtype == dtype_) {
      MC_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyHostToDevice, stream_));
    } else {
      void* raw = staging.get(src.nbytes());
      MC_CUDA_CHECK(cudaMemcpyAsync(raw, src.data, src.nbytes(), cudaMemcpyHostToDevice, stream_));
      convert_weights(raw, src.dtype, dst.data, dtype_, src.numel(), stream_);
    }
    // The staging buffer is reused by the next tensor: finish this one first.
    MC_CUDA_CHECK(cudaStreamSynchronize(stream_));
    done += static_cast<int64_t>(src.nbytes());
    if (progress_) progress_(done, total);
  }
  if (config_.tie_embeddings) weights_.output = weights_.tok_embeddings;
}

void CudaBackend::randomize(uint64_t seed) {
  NvtxRange range("random weights");
  std::vector<WeightSlot> slots = allocate_weights();
  for (size_t i = 0; i < slots.size(); ++i) {
    const Tensor& dst = *slots[i].target;
    fill_random_weights(dst.data, dtype_, dst.numel(), weight_stream(seed, i), slots[i].shape.size() == 1, stream_);
  }
  MC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (config_.tie_embeddings) weights_.output = weights_.tok_embeddings;
}

void CudaBackend::moe_ffn(const LayerWeights& layer, const void* h, float* x, int64_t T) {
  const int64_t E = config_.n_experts, K = config_.n_experts_per_tok;
  auto* router_logits = static_cast<float*>(router_logits_.get(T * E * sizeof(float)));  // [T, E] f32
  linear(h, layer.router, router_logits, T, DType::kF32);

  MoeRouteParams route;
  route.router_logits = router_logits;
  route.expert_ids = static_cast<int32_t*>(expert_ids_.get(T * K * sizeof(int32_t)));
  route.weights = static_cast<float*>(expert_weights_.get(T * K * sizeof(float)));
  route.expert_offsets = static_cast<int32_t*>(expert_offsets_.get((E + 1) * sizeof(int32_t)));
  route.sorted_pairs = static_cast<int32_t*>(sorted_pairs_.get(T * K * sizeof(int32_t)));
  route.n_tokens = static_cast<int32_t>(T);
  route.n_experts = static_cast<int32_t>(E);
  route.top_k = static_cast<int32_t>(K);
  moe_route(route, stream_);

  MoeExpertsParams experts;
  experts.x = h;
  experts.w13 = layer.experts[0].w1.data;  // the stacked [E, 2F, D] buffer starts at expert 0's w1
  experts.w2 = layer.experts[0].w2.data;   // [E, D, F]
  experts.expert_offsets = route.expert_offsets;
  experts.sorted_pairs = route.sorted_pairs;
  experts.weights = route.weights;
  experts.residual = x;
  experts.n_tokens = route.n_tokens;
  experts.n_experts = route.n_experts;
  experts.top_k = route.top_k;
  experts.dim = config_.dim;
  experts.hidden = config_.hidden_dim;
  experts.dtype = dtype_;
  moe_experts(experts, moe_workspace_.get(moe_workspace_bytes(experts)), stream_);
}

void CudaBackend::forward(const StepBatch& batch, float* logits) {
  NvtxRange step_range("step");
  MC_CUDA_CHECK(cudaSetDevice(device_));
  const int64_t T = batch.n_tokens(), R = static_cast<int64_t>(batch.logit_rows.size());
  const int64_t D = config_.dim, F = config_.hidden_dim, V = config_.vocab_size;
  const int64_t q_dim = config_.q_dim(), kv_dim = config_.kv_dim();
  const size_t elem = dtype_size(dtype_);

  MetaPacker packer;
  const size_t tokens_at = packer.add(batch.tokens);
  const size_t positions_at = packer.add(batch.positions);
  const size_t cu_seqlens_at = packer.add(batch.cu_seqlens);
  const size_t start_pos_at = packer.add(batch.start_pos);
  const size_t tables_at = packer.add(batch.block_tables);
  const size_t rows_at = packer.add(batch.logit_rows);
  auto* meta = static_cast<uint8_t*>(meta_.get(packer.bytes().size()));
  MC_CUDA_CHECK(cudaMemcpyAsync(meta, packer.bytes().data(), packer.bytes().size(), cudaMemcpyHostToDevice, stream_));
  const auto* tokens = reinterpret_cast<const int32_t*>(meta + tokens_at);
  const auto* positions = reinterpret_cast<const int64_t*>(meta + positions_at);
  const auto* cu_seqlens = reinterpret_cast<const int32_t*>(meta + cu_seqlens_at);
  const auto* start_pos = reinterpret_cast<const int64_t*>(meta + start_pos_at);
  const auto* tables = reinterpret_cast<const int32_t*>(meta + tables_at);
  const auto* rows = reinterpret_cast<const int32_t*>(meta + rows_at);

  // Host-known bounds the attention dispatch plans with.
  int32_t max_query_len = 0;
  int64_t max_context = 0;
  for (int32_t e = 0; e < batch.n_entries(); ++e) {
    const int32_t n = batch.cu_seqlens[e + 1] - batch.cu_seqlens[e];
    const int64_t end = batch.start_pos[e] + n;
    max_query_len = std::max(max_query_len, n);
    max_context = std::max(max_context, layout_.window > 0 ? std::min(layout_.window, end) : end);
  }

  auto* x = static_cast<float*>(residual_.get(T * D * sizeof(float)));  // [T, D] f32 residual
  void* h = hidden_.get(T * D * elem);                                  // [T, D] normed
  void* q = q_.get(T * q_dim * elem);                                   // [T, H, Dh]
  void* k = k_.get(T * kv_dim * elem);                                  // [T, KVH, Dh]
  void* v = v_.get(T * kv_dim * elem);
  void* attn = attn_.get(T * q_dim * elem);                             // [T, H, Dh]
  void* proj = proj_.get(T * D * elem);                                 // [T, D] o_proj / down_proj out
  void* gate_up = gate_up_.get(T * 2 * F * elem);                       // [T, 2F]
  void* act = act_.get(T * F * elem);                                   // [T, F]

  embedding({weights_.tok_embeddings.data, tokens, x, T, D, dtype_}, stream_);

  RmsNormParams norm;
  norm.residual = x;
  norm.n_tokens = norm.n_rows = T;
  norm.dim = D;
  norm.eps = static_cast<float>(config_.norm_eps);
  norm.dtype = dtype_;
  norm.out = h;

  CudaAttentionParams attention;
  AttentionParamsT<void>& at = attention.tensors;
  at.q = q;
  at.k_new = k;
  at.v_new = v;
  at.block_tables = tables;
  at.cu_seqlens = cu_seqlens;
  at.start_pos = start_pos;
  at.out = attn;
  at.n_entries = batch.n_entries();
  at.max_blocks = batch.max_blocks;
  at.n_heads = static_cast<int32_t>(config_.n_heads);
  at.n_kv_heads = static_cast<int32_t>(config_.n_kv_heads);
  at.head_dim = static_cast<int32_t>(config_.head_dim);
  at.scale = attention_scale(config_.head_dim);
  at.layout = layout_;
  attention.dtype = dtype_;
  attention.n_tokens = static_cast<int32_t>(T);
  attention.max_query_len = max_query_len;
  attention.max_context = max_context;
  void* workspace = workspace_.get(attention_workspace_bytes(attention));

  CudaKvAppendParams append;
  KvAppendParamsT<void>& ap = append.tensors;
  ap.k = k;
  ap.v = v;
  ap.block_tables = tables;
  ap.cu_seqlens = cu_seqlens;
  ap.start_pos = start_pos;
  ap.n_entries = batch.n_entries();
  ap.max_blocks = batch.max_blocks;
  ap.n_kv_heads = at.n_kv_heads;
  ap.head_dim = at.head_dim;
  ap.layout = layout_;
  append.dtype = dtype_;
  append.n_tokens = static_cast<int32_t>(T);

  const void* pending = nullptr;  // [T, D] output not yet added to the residual x
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    NvtxRange layer_range("layer");
    const LayerWeights& layer = weights_.layers[l];
    {
      NvtxRange op("attention_norm");
      norm.weight = layer.attn_norm.data;
      norm.delta = pending;  // the previous layer's FFN output joins the residual here
      rms_norm(norm, stream_);
    }
    {
      NvtxRange op("qkv_proj");
      linear(h, layer.wq, q, T, dtype_);
      linear(h, layer.wk, k, T, dtype_);
      linear(h, layer.wv, v, T, dtype_);
    }
    {
      NvtxRange op("rope");
      rope({q, k, positions, static_cast<const float*>(inv_freq_.data), T, at.n_heads, at.n_kv_heads, at.head_dim,
            dtype_},
           stream_);
    }
    {
      NvtxRange op("attention");
      at.k_pool = k_pools_[l].data;
      at.v_pool = v_pools_[l].data;
      paged_attention(attention, workspace, stream_);
    }
    {
      // After attention: a chunk must be read before it overwrites ring slots it still needs.
      NvtxRange op("kv_append");
      ap.k_pool = k_pools_[l].data;
      ap.v_pool = v_pools_[l].data;
      kv_append(append, stream_);
    }
    {
      NvtxRange op("o_proj");
      linear(attn, layer.wo, proj, T, dtype_);
    }
    {
      NvtxRange op("ffn_norm");
      norm.weight = layer.ffn_norm.data;
      norm.delta = proj;
      rms_norm(norm, stream_);
    }
    if (config_.is_moe()) {
      NvtxRange op("moe");
      moe_ffn(layer, h, x, T);
      pending = nullptr;  // the experts added their output into x already
    } else {
      NvtxRange op("ffn");
      Tensor w13 = Tensor::view(layer.ffn.w1.data, dtype_, {2 * F, D});
      linear(h, w13, gate_up, T, dtype_);
      silu_mul({gate_up, act, T, F, dtype_}, stream_);
      linear(act, layer.ffn.w2, proj, T, dtype_);
      pending = proj;
    }
  }

  NvtxRange head_range("lm_head");
  void* normed_rows = rows_.get(R * D * elem);  // [R, D]
  norm.weight = weights_.norm.data;
  norm.delta = pending;
  norm.rows = rows;
  norm.n_rows = R;
  norm.out = normed_rows;
  rms_norm(norm, stream_);
  auto* logits_device = static_cast<float*>(logits_.get(R * V * sizeof(float)));  // [R, V] f32
  linear(normed_rows, weights_.output, logits_device, R, DType::kF32);
  MC_CUDA_CHECK(cudaMemcpyAsync(logits, logits_device, R * V * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  MC_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(const BackendInit& init, const ModelWeights& host_weights) {
  auto backend = std::make_unique<cuda::CudaBackend>(init);
  backend->upload(host_weights);
  return backend;
}

std::unique_ptr<Backend> make_random_cuda_backend(const BackendInit& init, uint64_t seed) {
  auto backend = std::make_unique<cuda::CudaBackend>(init);
  backend->randomize(seed);
  return backend;
}

}  // namespace mc
