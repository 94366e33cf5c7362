#include "cpu/moe.h"

#include <algorithm>
#include <vector>

#include "core/op_params.h"
#include "cpu/dense_ops.h"

namespace mc::cpu {

void moe_route(const float* logits, int64_t T, int32_t E, int32_t K, int32_t* expert_ids, float* weights,
               int32_t* offsets, int32_t* sorted_pairs) {
  for (int64_t t = 0; t < T; ++t) route_top_k(logits + t * E, E, K, expert_ids + t * K, weights + t * K);
  std::fill(offsets, offsets + E + 1, 0);
  for (int64_t pair = 0; pair < T * K; ++pair) ++offsets[expert_ids[pair] + 1];
  for (int32_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> fill(offsets, offsets + E);
  for (int64_t pair = 0; pair < T * K; ++pair) sorted_pairs[fill[expert_ids[pair]]++] = static_cast<int32_t>(pair);
}

void moe_ffn(const float* x, const LayerWeights& layer, const ModelConfig& config, int64_t T, float* y) {
  const int64_t D = config.dim, F = config.hidden_dim;
  const int32_t E = static_cast<int32_t>(config.n_experts), K = static_cast<int32_t>(config.n_experts_per_tok);

  std::vector<float> logits(T * E);  // [T, E]
  matmul(x, layer.router.f32(), logits.data(), T, E, D);
  std::vector<int32_t> chosen(T * K);      // [T, K] expert ids
  std::vector<float> weights(T * K);       // [T, K] routing weights
  std::vector<int32_t> offsets(E + 1);     // [E + 1]
  std::vector<int32_t> pairs(T * K);       // [T * K] pair ids grouped by expert
  moe_route(logits.data(), T, E, K, chosen.data(), weights.data(), offsets.data(), pairs.data());

  std::fill(y, y + T * D, 0.0f);
  std::vector<float> xs, gate, up, out;
  for (int32_t e = 0; e < E; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    const ExpertWeights& expert = layer.experts[e];
    xs.resize(n * D);  // [n, D] this expert's tokens
    for (int64_t i = 0; i < n; ++i)
      std::copy_n(x + (pairs[offsets[e] + i] / K) * D, D, xs.data() + i * D);
    gate.resize(n * F);
    up.resize(n * F);
    out.resize(n * D);
    matmul(xs.data(), expert.w1.f32(), gate.data(), n, F, D);
    matmul(xs.data(), expert.w3.f32(), up.data(), n, F, D);
    silu_mul(gate.data(), up.data(), gate.data(), n * F);
    matmul(gate.data(), expert.w2.f32(), out.data(), n, D, F);
    // Experts are visited in index order, so each token sums its experts in a fixed order.
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pair = pairs[offsets[e] + i];
      float* row = y + (pair / K) * D;
      const float w = weights[pair];
      for (int64_t d = 0; d < D; ++d) row[d] += w * out[i * D + d];
    }
  }
}

}  // namespace mc::cpu
