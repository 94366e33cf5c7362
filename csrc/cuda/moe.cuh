// Mixtral's sparse MoE FFN on the GPU (the kernels behind CudaBackend::moe, after the router
// GEMM), with the CPU backend's semantics (cpu/moe.cpp):
//   y[t] = Σ_k weight[t, k] · w2_e(silu(w1_e x_t) * w3_e x_t),  e = expert_ids[t, k]
// in three steps with no host round trip: route (top-k + counting sort by expert), gate/up
// (each active expert's w1|w3 read once for all of its tokens, SiLU fused), down (w2 read once
// per active expert, the routing weight applied and the result added straight into the f32
// residual stream: no separate combine pass).
// Shapes: T = tokens, E = experts, K = experts per token, D = dim, F = expert FFN width,
// P = T * K (token, expert) pairs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "core/op_params.h"
#include "cuda/common.cuh"

namespace mc::cuda {

// Router logits -> per-token top-k, then pairs grouped by expert (MoeRouteParams of
// core/op_params.h). n_experts <= 64, top_k <= 8.
void moe_route(const MoeRouteParams& p, cudaStream_t stream);

// Expert weights are stacked per layer: w13 [E, 2F, D] (rows 0..F-1 = w1, F..2F-1 = w3 of each
// expert), w2 [E, D, F].
struct MoeExpertsParams {
  const void* x = nullptr;               // [T, D] half: the normed hidden state
  const void* w13 = nullptr;             // [E, 2F, D] half
  const void* w2 = nullptr;              // [E, D, F] half
  const int32_t* expert_offsets = nullptr;  // [E + 1] from moe_route
  const int32_t* sorted_pairs = nullptr;    // [P]
  const float* weights = nullptr;           // [T, K]
  float* residual = nullptr;             // [T, D] f32: y is ADDED here (atomically, two experts per row)
  int32_t n_tokens = 0;
  int32_t n_experts = 0;
  int32_t top_k = 0;
  int64_t dim = 0;
  int64_t hidden = 0;                    // F
  DType dtype = DType::kBF16;
};

// Scratch for the activations [P, F] half (and whatever the chosen path needs).
size_t moe_workspace_bytes(const MoeExpertsParams& p);

// The whole MoE op's scratch in one workspace, each piece 256-byte aligned: router logits
// [T, E] f32, expert ids [T, K], weights [T, K], expert offsets [E + 1], sorted pairs [P], then
// moe_workspace_bytes(p) for the experts. Every piece grows with T, so a workspace laid out for
// the most tokens of a step holds the layout of any smaller step.
struct MoeScratch {
  float* router_logits = nullptr;
  int32_t* expert_ids = nullptr;
  float* weights = nullptr;
  int32_t* expert_offsets = nullptr;
  int32_t* sorted_pairs = nullptr;
  void* experts = nullptr;
  size_t bytes = 0;  // of all the pieces
};
// The layout for p's sizes (n_tokens, n_experts, top_k, dim, hidden) from `workspace`; with a
// null workspace only `bytes` is set.
MoeScratch moe_scratch(const MoeExpertsParams& p, void* workspace);

// Picks by token count (host-known): a GEMV-style path for decode-sized batches (each active
// expert's weights streamed once, all of its tokens served from registers/shared memory), a
// tensor-core grouped-GEMM path for prefill. Experts with no tokens read no weights.
void moe_experts(const MoeExpertsParams& p, void* workspace, cudaStream_t stream);

}  // namespace mc::cuda
