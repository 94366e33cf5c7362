#include "cpu/moe.h"

#include <algorithm>
#include <vector>

#include "cpu/dense_ops.h"

namespace mc::cpu {
namespace {

// The workspace of moe(), carved in order: float arrays first, then int32 arrays.
struct MoeScratch {
  float* logits;       // [T, E]
  float* weights;      // [T, K]
  float* xs;           // [T, D] one expert's tokens (an expert takes a token at most once)
  float* gate_up;      // [T, 2F]
  float* act;          // [T, F]
  float* out;          // [T, D] one expert's output, then the token's sum
  float* sum;          // [T, D] Σ over the token's experts
  int32_t* expert_ids; // [T, K]
  int32_t* offsets;    // [E + 1]
  int32_t* pairs;      // [T * K]

  static size_t floats(int64_t T, int64_t E, int64_t K, int64_t D, int64_t F) {
    return static_cast<size_t>(T * (E + K + 3 * D + 3 * F));
  }
  static size_t ints(int64_t T, int64_t E, int64_t K) { return static_cast<size_t>(2 * T * K + E + 1); }

  MoeScratch(void* base, int64_t T, int64_t E, int64_t K, int64_t D, int64_t F) {
    float* f = static_cast<float*>(base);
    logits = f;
    weights = logits + T * E;
    xs = weights + T * K;
    gate_up = xs + T * D;
    act = gate_up + T * 2 * F;
    out = act + T * F;
    sum = out + T * D;
    auto* i = reinterpret_cast<int32_t*>(sum + T * D);
    expert_ids = i;
    offsets = expert_ids + T * K;
    pairs = offsets + E + 1;
  }
};

}  // namespace

void moe_route(const float* logits, int64_t T, int32_t E, int32_t K, int32_t* expert_ids, float* weights,
               int32_t* offsets, int32_t* sorted_pairs) {
  for (int64_t t = 0; t < T; ++t) route_top_k(logits + t * E, E, K, expert_ids + t * K, weights + t * K);
  std::fill(offsets, offsets + E + 1, 0);
  for (int64_t pair = 0; pair < T * K; ++pair) ++offsets[expert_ids[pair] + 1];
  for (int32_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> fill(offsets, offsets + E);
  for (int64_t pair = 0; pair < T * K; ++pair) sorted_pairs[fill[expert_ids[pair]]++] = static_cast<int32_t>(pair);
}

size_t moe_workspace_bytes(int64_t T, int64_t E, int64_t K, int64_t D, int64_t F) {
  return MoeScratch::floats(T, E, K, D, F) * sizeof(float) + MoeScratch::ints(T, E, K) * sizeof(int32_t);
}

void moe(const MoeParams& p) {
  const int64_t T = p.n_tokens, D = p.w2.rows, F = p.w2.cols;
  const int32_t E = static_cast<int32_t>(p.router.rows), K = p.top_k;
  const auto* x = static_cast<const float*>(p.x);
  MoeScratch s(p.workspace, T, E, K, D, F);

  linear(x, p.router, s.logits, T);  // [T, E]
  moe_route(s.logits, T, E, K, s.expert_ids, s.weights, s.offsets, s.pairs);

  std::fill(s.sum, s.sum + T * D, 0.0f);
  for (int32_t e = 0; e < E; ++e) {
    const int64_t n = s.offsets[e + 1] - s.offsets[e];
    if (n == 0) continue;
    const int32_t* pairs = s.pairs + s.offsets[e];
    for (int64_t i = 0; i < n; ++i) std::copy_n(x + (pairs[i] / K) * D, D, s.xs + i * D);
    linear(s.xs, p.w13.matrix(e), s.gate_up, n);
    SiluMulParams silu;
    silu.gate_up = s.gate_up;
    silu.out = s.act;
    silu.n_tokens = n;
    silu.hidden = F;
    silu_mul(silu);
    linear(s.act, p.w2.matrix(e), s.out, n);
    // Experts are visited in index order, so each token sums its experts in a fixed order.
    for (int64_t i = 0; i < n; ++i) {
      float* row = s.sum + (pairs[i] / K) * D;
      const float w = s.weights[pairs[i]];
      for (int64_t d = 0; d < D; ++d) row[d] += w * s.out[i * D + d];
    }
  }
  for (int64_t i = 0; i < T * D; ++i) p.residual[i] += s.sum[i];
}

}  // namespace mc::cpu
