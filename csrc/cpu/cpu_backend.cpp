#include "cpu/cpu_backend.h"

#include <cmath>
#include <cstring>

#include "core/op_params.h"
#include "cpu/attention.h"
#include "cpu/dense_ops.h"
#include "cpu/moe.h"

namespace mc::cpu {

CpuBackend::CpuBackend(const ModelConfig& config, ModelWeights weights, KvLayout layout, int64_t num_blocks)
    : config_(config), weights_(std::move(weights)), layout_(layout) {
  for (int64_t l = 0; l < config.n_layers; ++l) {
    k_pools_.push_back(Tensor::empty(DType::kF32, {num_blocks, layout.block_size, config.n_kv_heads, config.head_dim}));
    v_pools_.push_back(Tensor::empty(DType::kF32, {num_blocks, layout.block_size, config.n_kv_heads, config.head_dim}));
  }
  inv_freq_ = rope_inv_freq(config.head_dim, config.rope_theta);
}

void CpuBackend::forward(const StepBatch& batch, float* logits) {
  const int64_t T = batch.n_tokens(), D = config_.dim, F = config_.hidden_dim;
  const int64_t half = config_.head_dim / 2;
  rope_cos_.resize(T * half);
  rope_sin_.resize(T * half);
  rope_tables(batch.positions.data(), inv_freq_.data(), T, half, rope_cos_.data(), rope_sin_.data());

  std::vector<float> x(T * D);  // [T, D] residual stream
  embedding(weights_.tok_embeddings.f32(), batch.tokens.data(), x.data(), T, D);
  std::vector<float> h(T * D), ffn_out(T * D);
  std::vector<float> gate, up;
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    const LayerWeights& layer = weights_.layers[l];
    attention_block(layer, l, batch, x.data());

    rms_norm(x.data(), layer.ffn_norm.f32(), h.data(), T, D, static_cast<float>(config_.norm_eps));
    if (config_.is_moe()) {
      moe_ffn(h.data(), layer, config_, T, ffn_out.data());
    } else {
      gate.resize(T * F);
      up.resize(T * F);
      matmul(h.data(), layer.ffn.w1.f32(), gate.data(), T, F, D);
      matmul(h.data(), layer.ffn.w3.f32(), up.data(), T, F, D);
      silu_mul(gate.data(), up.data(), gate.data(), T * F);
      matmul(gate.data(), layer.ffn.w2.f32(), ffn_out.data(), T, D, F);
    }
    add_inplace(x.data(), ffn_out.data(), T * D);
  }

  // Final norm and LM head only for the rows whose logits were asked for.
  const int64_t R = static_cast<int64_t>(batch.logit_rows.size());
  std::vector<float> rows(R * D);
  for (int64_t r = 0; r < R; ++r) std::memcpy(&rows[r * D], &x[batch.logit_rows[r] * D], D * sizeof(float));
  rms_norm(rows.data(), weights_.norm.f32(), rows.data(), R, D, static_cast<float>(config_.norm_eps));
  matmul(rows.data(), weights_.output.f32(), logits, R, config_.vocab_size, D);
}

void CpuBackend::attention_block(const LayerWeights& layer, int64_t layer_index, const StepBatch& batch, float* x) {
  const int64_t T = batch.n_tokens(), D = config_.dim;
  const int64_t q_dim = config_.q_dim(), kv_dim = config_.kv_dim();
  std::vector<float> h(T * D), q(T * q_dim), k(T * kv_dim), v(T * kv_dim), attn(T * q_dim), o(T * D);
  rms_norm(x, layer.attn_norm.f32(), h.data(), T, D, static_cast<float>(config_.norm_eps));
  matmul(h.data(), layer.wq.f32(), q.data(), T, q_dim, D);
  matmul(h.data(), layer.wk.f32(), k.data(), T, kv_dim, D);
  matmul(h.data(), layer.wv.f32(), v.data(), T, kv_dim, D);
  rope(q.data(), rope_cos_.data(), rope_sin_.data(), T, config_.n_heads, config_.head_dim);
  rope(k.data(), rope_cos_.data(), rope_sin_.data(), T, config_.n_kv_heads, config_.head_dim);

  AttentionParams params;
  params.q = q.data();
  params.k_new = k.data();
  params.v_new = v.data();
  params.k_pool = k_pools_[layer_index].f32();
  params.v_pool = v_pools_[layer_index].f32();
  params.block_tables = batch.block_tables.data();
  params.cu_seqlens = batch.cu_seqlens.data();
  params.start_pos = batch.start_pos.data();
  params.out = attn.data();
  params.n_entries = batch.n_entries();
  params.max_blocks = batch.max_blocks;
  params.n_heads = static_cast<int32_t>(config_.n_heads);
  params.n_kv_heads = static_cast<int32_t>(config_.n_kv_heads);
  params.head_dim = static_cast<int32_t>(config_.head_dim);
  params.scale = attention_scale(config_.head_dim);
  params.layout = layout_;
  paged_attention(params);

  // The chunk has been attended: only now may its K/V enter the (possibly rolling) cache.
  KvAppendParams append;
  append.k = k.data();
  append.v = v.data();
  append.k_pool = k_pools_[layer_index].f32();
  append.v_pool = v_pools_[layer_index].f32();
  append.block_tables = batch.block_tables.data();
  append.cu_seqlens = batch.cu_seqlens.data();
  append.start_pos = batch.start_pos.data();
  append.n_entries = batch.n_entries();
  append.max_blocks = batch.max_blocks;
  append.n_kv_heads = params.n_kv_heads;
  append.head_dim = params.head_dim;
  append.layout = layout_;
  kv_append(append);
  matmul(attn.data(), layer.wo.f32(), o.data(), T, D, q_dim);
  add_inplace(x, o.data(), T * D);
}

}  // namespace mc::cpu
