// CPU reference of the Mixtral sparse MoE FFN: route each token to its top-K experts, then run
// each expert once over all of its tokens (grouped by a counting sort).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/op_params.h"

namespace mc::cpu {

// Routing of T tokens (route_top_k of core/op_params.h) and the counting sort of their (token,
// slot) pairs by expert: expert e owns sorted_pairs[offsets[e] .. offsets[e + 1]), pair ids
// t * K + k ascending within an expert.
//   logits [T, E] -> expert_ids [T, K], weights [T, K], offsets [E + 1], sorted_pairs [T * K]
void moe_route(const float* logits, int64_t T, int32_t E, int32_t K, int32_t* expert_ids, float* weights,
               int32_t* offsets, int32_t* sorted_pairs);

// Scratch of moe() for T tokens, in bytes.
size_t moe_workspace_bytes(int64_t T, int64_t E, int64_t K, int64_t D, int64_t F);

// MoeParams on float32 activations: residual[t] += Σ_k weight[t, k] · expert_k(x_t).
void moe(const MoeParams& p);

}  // namespace mc::cpu
