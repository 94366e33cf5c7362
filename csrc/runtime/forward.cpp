#include "runtime/forward.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/error.h"
#include "core/op_params.h"

namespace mc {
namespace {

size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Packs host arrays into one staging buffer (16-byte aligned) so they reach the device buffer
// in one copy: add() returns where each array will be on the device, valid once send() ran.
class MetaPacker {
 public:
  MetaPacker(Backend& backend, void* host, void* device, size_t capacity)
      : backend_(backend), host_(static_cast<uint8_t*>(host)), device_(static_cast<uint8_t*>(device)),
        capacity_(capacity) {}
  template <typename T>
  const T* add(const std::vector<T>& values) {
    const size_t offset = used_;
    const size_t bytes = values.size() * sizeof(T);
    if (offset + bytes > capacity_) fail(ErrorKind::kInvalidRequest, "step metadata exceeds its workspace");
    if (bytes > 0) std::memcpy(host_ + offset, values.data(), bytes);
    used_ = align16(offset + bytes);
    return reinterpret_cast<const T*>(device_ + offset);
  }
  void send() { backend_.copy_to_device(device_, host_, used_); }

 private:
  Backend& backend_;
  uint8_t* host_;
  uint8_t* device_;
  size_t capacity_;
  size_t used_ = 0;
};

// Per-row sampler outputs, packed: tokens, logprobs, ranks [R] then top ids and logprobs [R, 20].
struct SampleOut {
  int32_t* tokens;
  float* logprobs;
  int32_t* ranks;
  int32_t* top_ids;
  float* top_logprobs;
  SampleOut(void* base, int64_t rows) {
    auto* bytes = static_cast<uint8_t*>(base);
    tokens = reinterpret_cast<int32_t*>(bytes);
    logprobs = reinterpret_cast<float*>(bytes + align16(rows * 4));
    ranks = reinterpret_cast<int32_t*>(bytes + 2 * align16(rows * 4));
    top_ids = reinterpret_cast<int32_t*>(bytes + 3 * align16(rows * 4));
    top_logprobs = reinterpret_cast<float*>(bytes + 3 * align16(rows * 4) + align16(rows * 4 * ForwardPass::kMaxLogprobs));
  }
};

size_t sample_out_bytes(int64_t rows) { return 3 * align16(rows * 4) + 2 * align16(rows * 4 * ForwardPass::kMaxLogprobs); }

}  // namespace

ForwardPass::ForwardPass(Backend& backend, const ModelConfig& config, ModelWeights weights, KvLayout layout,
                         int64_t num_blocks, const StepLimits& limits)
    : backend_(backend),
      config_(config),
      weights_(std::move(weights)),
      act_(backend.activation_dtype(weights_.float_dtype())),
      layout_(layout),
      limits_(limits) {
  for (int64_t l = 0; l < config.n_layers; ++l) layer_range_names_.push_back("layer " + std::to_string(l));
  const size_t elem = dtype_size(act_);
  const int64_t T = limits.max_tokens, S = limits.max_entries, R = limits.max_logit_rows;
  const int64_t D = config.dim, F = config.hidden_dim, V = config.vocab_size;
  const int64_t q_dim = config.q_dim(), kv_dim = config.kv_dim();
  max_table_blocks_ = layout.ring_blocks > 0
                          ? layout.ring_blocks
                          : static_cast<int32_t>((config.max_seq_len + layout.block_size - 1) / layout.block_size);

  resize_kv_pools(num_blocks);

  ws_.meta_bytes = align16(T * 4) + align16(T * 8) + align16((S + 1) * 4) + align16(S * 8) +
                   align16(static_cast<size_t>(S) * max_table_blocks_ * 4) + align16(T * 4);
  ws_.meta = backend.allocate(ws_.meta_bytes);
  ws_.meta_host = backend.allocate_host(ws_.meta_bytes);
  ws_.residual = backend.allocate(T * D * sizeof(float));
  ws_.hidden = backend.allocate(T * D * elem);
  ws_.qkv = backend.allocate(T * (q_dim + 2 * kv_dim) * elem);
  ws_.q = backend.allocate(T * q_dim * elem);
  ws_.k = backend.allocate(T * kv_dim * elem);
  ws_.v = backend.allocate(T * kv_dim * elem);
  ws_.attn = backend.allocate(T * q_dim * elem);
  ws_.proj = backend.allocate(T * D * elem);
  if (!config.is_moe()) {
    ws_.gate_up = backend.allocate(T * 2 * F * elem);
    ws_.ffn_act = backend.allocate(T * F * elem);
  }
  ws_.rows = backend.allocate(R * D * elem);
  ws_.logits = backend.allocate(R * V * sizeof(float));
  ws_.logits_host = backend.allocate_host(R * V * sizeof(float));
  ws_.attention_scratch = backend.allocate(backend.attention_workspace_bytes(config, limits, act_));
  ws_.moe_scratch = backend.allocate(backend.moe_workspace_bytes(config, limits, act_));
  ws_.sample_out = backend.allocate(sample_out_bytes(T));
  ws_.sample_out_host = backend.allocate_host(sample_out_bytes(T));
  ws_.sample_scratch = backend.allocate(backend.sample_workspace_bytes(R, static_cast<int32_t>(V)));
  std::vector<float> inv_freq = rope_inv_freq(config.head_dim, config.rope_theta);
  ws_.inv_freq = backend.allocate(inv_freq.size() * sizeof(float));
  backend.copy_to_device(ws_.inv_freq.get(), inv_freq.data(), inv_freq.size() * sizeof(float));
  backend.synchronize();
}

void ForwardPass::run(const StepBatch& batch, float* logits, const PassSampling* sampling,
                      std::vector<SampledToken>* sampled) {
  const int64_t T = batch.n_tokens();
  const int32_t S = batch.n_entries();
  if (T > limits_.max_tokens || S > limits_.max_entries || batch.max_blocks > max_table_blocks_)
    fail(ErrorKind::kInvalidRequest, "forward pass of ", T, " tokens, ", S, " entries exceeds its limits (",
         limits_.max_tokens, " tokens, ", limits_.max_entries, " entries)");
  const int64_t D = config_.dim;

  // ---- the paged-KV view of this pass, built once ----
  MetaPacker packer(backend_, ws_.meta_host.get(), ws_.meta.get(), ws_.meta_bytes);
  const int32_t* tokens = packer.add(batch.tokens);
  const int64_t* positions = packer.add(batch.positions);
  const int32_t* cu_seqlens = packer.add(batch.cu_seqlens);
  const int64_t* start_pos = packer.add(batch.start_pos);
  const int32_t* tables = packer.add(batch.block_tables);
  const int32_t* rows = packer.add(batch.logit_rows);
  packer.send();

  PagedKvView kv;
  kv.block_tables = tables;
  kv.cu_seqlens = cu_seqlens;
  kv.start_pos = start_pos;
  kv.n_entries = S;
  kv.max_blocks = batch.max_blocks;
  kv.layout = layout_;
  kv.plan_from_host(batch.cu_seqlens.data(), batch.start_pos.data());
  if (kv.n_decode != batch.n_decode) fail(ErrorKind::kInvalidRequest, "decode entries must come first in a pass");

  const auto compute_start = std::chrono::steady_clock::now();
  auto* x = static_cast<float*>(ws_.residual.get());  // [T, D] f32 residual stream
  void* h = ws_.hidden.get();

  EmbeddingParams embed;
  embed.table = WeightRef::of(weights_.tok_embeddings);
  embed.ids = tokens;
  embed.out = x;
  embed.n_tokens = T;
  backend_.embedding(embed);

  RmsNormParams norm;
  norm.residual = x;
  norm.n_tokens = norm.n_rows = T;
  norm.dim = D;
  norm.eps = static_cast<float>(config_.norm_eps);
  norm.dtype = act_;
  norm.out = h;

  LinearParams linear;
  linear.n_tokens = T;
  linear.x_dtype = linear.y_dtype = act_;

  QkvRopeParams rope;
  rope.qkv = ws_.qkv.get();
  rope.q = ws_.q.get();
  rope.k = ws_.k.get();
  rope.v = ws_.v.get();
  rope.positions = positions;
  rope.inv_freq = static_cast<const float*>(ws_.inv_freq.get());
  rope.n_tokens = T;
  rope.n_heads = static_cast<int32_t>(config_.n_heads);
  rope.n_kv_heads = static_cast<int32_t>(config_.n_kv_heads);
  rope.head_dim = static_cast<int32_t>(config_.head_dim);
  rope.dtype = act_;

  AttentionParams attention;
  AttentionParamsT<void>& at = attention.tensors;
  at.q = rope.q;
  at.k_new = rope.k;
  at.v_new = rope.v;
  at.out = ws_.attn.get();
  at.kv = kv;
  at.n_heads = rope.n_heads;
  at.n_kv_heads = rope.n_kv_heads;
  at.head_dim = rope.head_dim;
  at.scale = attention_scale(config_.head_dim);
  attention.dtype = act_;
  attention.n_tokens = static_cast<int32_t>(T);
  attention.max_query_len = kv.max_query_len();
  attention.max_context = kv.max_context();
  attention.workspace = ws_.attention_scratch.get();

  KvAppendParams append;
  KvAppendParamsT<void>& ap = append.tensors;
  ap.k = rope.k;
  ap.v = rope.v;
  ap.kv = kv;
  ap.n_kv_heads = rope.n_kv_heads;
  ap.head_dim = rope.head_dim;
  append.dtype = act_;

  const void* pending = nullptr;  // [T, D] output not yet added to the residual x
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    BackendRange layer_range(backend_, layer_range_names_[l].c_str());
    const LayerWeights& layer = weights_.layers[l];
    norm.weight = layer.attn_norm.data;
    norm.delta = pending;  // the previous layer's FFN output joins the residual here
    backend_.rms_norm(norm);

    linear.x = h;
    linear.w = layer.wqkv_ref();
    linear.y = ws_.qkv.get();
    backend_.linear(linear);
    backend_.qkv_rope(rope);

    at.k_pool = k_pools_[l].get();
    at.v_pool = v_pools_[l].get();
    backend_.attention(attention);
    // Only now, after the chunk has been attended, may its K/V enter the (rolling) cache.
    ap.k_pool = k_pools_[l].get();
    ap.v_pool = v_pools_[l].get();
    backend_.kv_append(append);

    linear.x = at.out;
    linear.w = layer.wo_ref();
    linear.y = ws_.proj.get();
    backend_.linear(linear);

    norm.weight = layer.ffn_norm.data;
    norm.delta = ws_.proj.get();
    backend_.rms_norm(norm);

    if (config_.is_moe()) {
      MoeParams moe;
      moe.x = h;
      moe.router = WeightRef::of(layer.router);
      moe.w13 = layer.w13_ref();
      moe.w2 = layer.w2_ref();
      moe.residual = x;
      moe.n_tokens = T;
      moe.top_k = static_cast<int32_t>(config_.n_experts_per_tok);
      moe.dtype = act_;
      moe.workspace = ws_.moe_scratch.get();
      backend_.moe(moe);
      pending = nullptr;  // the experts added their output into x already
    } else {
      linear.x = h;
      linear.w = layer.w13_ref();
      linear.y = ws_.gate_up.get();
      backend_.linear(linear);
      SiluMulParams silu;
      silu.gate_up = ws_.gate_up.get();
      silu.out = ws_.ffn_act.get();
      silu.n_tokens = T;
      silu.hidden = config_.hidden_dim;
      silu.dtype = act_;
      backend_.silu_mul(silu);
      linear.x = ws_.ffn_act.get();
      linear.w = layer.w2_ref();
      linear.y = ws_.proj.get();
      backend_.linear(linear);
      pending = ws_.proj.get();
    }
  }
  lm_head(batch, rows, pending, logits, sampling, sampled);
  compute_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - compute_start).count();
}

void ForwardPass::resize_kv_pools(int64_t num_blocks) {
  const size_t pool_bytes =
      static_cast<size_t>(num_blocks) * layout_.block_size * config_.kv_dim() * dtype_size(act_);
  std::vector<std::shared_ptr<void>> k_pools, v_pools;
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    k_pools.push_back(backend_.allocate(pool_bytes));
    v_pools.push_back(backend_.allocate(pool_bytes));
  }
  backend_.synchronize();  // no pass still reads the old pools
  k_pools_ = std::move(k_pools);
  v_pools_ = std::move(v_pools);
}

void ForwardPass::copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  if (src_dst.empty()) return;
  std::vector<int32_t> src, dst;
  for (const auto& [from, to] : src_dst) {
    src.push_back(from);
    dst.push_back(to);
  }
  CopyBlocksParams p;
  p.src = src.data();
  p.dst = dst.data();
  p.n = static_cast<int32_t>(src.size());
  p.block_bytes = static_cast<size_t>(layout_.block_size) * config_.kv_dim() * dtype_size(act_);
  for (size_t l = 0; l < k_pools_.size(); ++l) {
    p.k_pool = k_pools_[l].get();
    p.v_pool = v_pools_[l].get();
    backend_.copy_blocks(p);
  }
  backend_.synchronize();
}

SampleParams ForwardPass::upload_sampling(const PassSampling& s) {
  const size_t rows = s.controls.size();
  if (s.history_offsets.size() != rows + 1 || s.bias_offsets.size() != rows + 1 || s.banned_offsets.size() != rows + 1 ||
      s.output_counts.size() != s.history_ids.size() || s.bias_values.size() != s.bias_ids.size())
    fail(ErrorKind::kInvalidRequest, "inconsistent sampling inputs");
  const size_t bytes = align16(rows * sizeof(SamplingControls)) + 3 * align16((rows + 1) * 4) +
                       align16(s.history_ids.size() * 4) + align16(s.output_counts.size() * 4) +
                       align16(s.bias_ids.size() * 4) + align16(s.bias_values.size() * 4) +
                       align16(s.banned_ids.size() * 4);
  if (bytes > ws_.sample_in_bytes) {
    // Grows only: the first steps with long histories set its size for the rest.
    ws_.sample_in_bytes = std::max(bytes, 2 * ws_.sample_in_bytes);
    ws_.sample_in = backend_.allocate(ws_.sample_in_bytes);
    ws_.sample_in_host = backend_.allocate_host(ws_.sample_in_bytes);
  }
  MetaPacker packer(backend_, ws_.sample_in_host.get(), ws_.sample_in.get(), ws_.sample_in_bytes);
  SampleParams p;
  p.controls = packer.add(s.controls);
  p.history_offsets = packer.add(s.history_offsets);
  p.history_ids = packer.add(s.history_ids);
  p.output_counts = packer.add(s.output_counts);
  p.bias_offsets = packer.add(s.bias_offsets);
  p.bias_ids = packer.add(s.bias_ids);
  p.bias_values = packer.add(s.bias_values);
  p.banned_offsets = packer.add(s.banned_offsets);
  p.banned_ids = packer.add(s.banned_ids);
  packer.send();
  p.vocab = static_cast<int32_t>(config_.vocab_size);
  p.max_logprobs = kMaxLogprobs;
  p.workspace = ws_.sample_scratch.get();
  return p;
}

void ForwardPass::lm_head(const StepBatch& batch, const int32_t* rows, const void* pending, float* logits,
                          const PassSampling* sampling, std::vector<SampledToken>* sampled) {
  BackendRange range(backend_, "lm_head");
  const int64_t V = config_.vocab_size, D = config_.dim;
  const auto total = static_cast<int64_t>(batch.logit_rows.size());
  auto* logits_host = static_cast<float*>(ws_.logits_host.get());
  RmsNormParams norm;
  norm.residual = static_cast<float*>(ws_.residual.get());
  norm.weight = weights_.norm.data;
  norm.n_tokens = batch.n_tokens();
  norm.dim = D;
  norm.eps = static_cast<float>(config_.norm_eps);
  norm.dtype = act_;
  norm.out = ws_.rows.get();
  norm.delta = pending;  // added to the residual once, with the first chunk of rows
  LinearParams head;
  head.x = ws_.rows.get();
  head.w = WeightRef::of(weights_.output);
  head.y = ws_.logits.get();
  head.x_dtype = act_;
  head.y_dtype = DType::kF32;
  if (sampling != nullptr && static_cast<int64_t>(sampling->controls.size()) != total)
    fail(ErrorKind::kInvalidRequest, "sampling controls for ", sampling->controls.size(), " rows, the pass has ", total);
  SampleParams sample;
  SampleOut out(ws_.sample_out.get(), limits_.max_tokens);
  if (sampling != nullptr) sample = upload_sampling(*sampling);
  // The LM head runs on at most max_logit_rows rows at a time: its workspace is fixed.
  for (int64_t first = 0; first < total; first += limits_.max_logit_rows) {
    const int64_t n = std::min<int64_t>(limits_.max_logit_rows, total - first);
    norm.rows = rows + first;
    norm.n_rows = n;
    backend_.rms_norm(norm);
    norm.delta = nullptr;
    head.n_tokens = n;
    backend_.linear(head);
    if (sampling == nullptr) {
      backend_.copy_to_host(logits_host, ws_.logits.get(), static_cast<size_t>(n * V) * sizeof(float));
      backend_.synchronize();
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(logits + batch.logit_dest[first + r] * V, logits_host + r * V, V * sizeof(float));
      continue;
    }
    // Rows [first, first + n) of the pass: the CSR offsets stay absolute.
    SampleParams chunk = sample;
    chunk.logits = static_cast<const float*>(ws_.logits.get());
    chunk.controls += first;
    chunk.history_offsets += first;
    chunk.bias_offsets += first;
    chunk.banned_offsets += first;
    chunk.n_rows = static_cast<int32_t>(n);
    chunk.tokens = out.tokens + first;
    chunk.token_logprobs = out.logprobs + first;
    chunk.token_ranks = out.ranks + first;
    chunk.top_ids = out.top_ids + first * kMaxLogprobs;
    chunk.top_logprobs = out.top_logprobs + first * kMaxLogprobs;
    backend_.sample(chunk);
  }
  if (sampling != nullptr && total > 0) {
    // Only the sampler's outputs come back: ids, and logprobs for the rows that asked.
    backend_.copy_to_host(ws_.sample_out_host.get(), ws_.sample_out.get(), sample_out_bytes(limits_.max_tokens));
    backend_.synchronize();
    SampleOut host(ws_.sample_out_host.get(), limits_.max_tokens);
    for (int64_t r = 0; r < total; ++r) {
      SampledToken& token = (*sampled)[batch.logit_dest[r]];
      token.token = host.tokens[r];
      const int32_t n_logprobs = sampling->controls[r].n_logprobs;
      if (n_logprobs < 0) continue;
      token.logprob = host.logprobs[r];
      token.rank = host.ranks[r];
      token.top.clear();
      for (int32_t j = 0; j < std::min(n_logprobs, kMaxLogprobs); ++j)
        token.top.emplace_back(host.top_ids[r * kMaxLogprobs + j], host.top_logprobs[r * kMaxLogprobs + j]);
    }
  }
  if (total == 0) backend_.synchronize();
}

}  // namespace mc
