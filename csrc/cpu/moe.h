// CPU reference of the Mixtral sparse MoE FFN: route each token to its top-K experts, then run
// each expert once over all of its tokens (grouped by a counting sort).
#pragma once

#include <cstdint>

#include "core/checkpoint.h"
#include "core/config.h"

namespace mc::cpu {

// y[T, D] = Σ_k weight[t, k] · w2_e(silu(w1_e x_t) * w3_e x_t) over the K experts e of token t.
void moe_ffn(const float* x, const LayerWeights& layer, const ModelConfig& config, int64_t T, float* y);

}  // namespace mc::cpu
