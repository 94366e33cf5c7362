// CPU ops on row-major float32 activations. Weights are read in their stored format (float32,
// bfloat16 or float16) and widened to float32 in registers. T = rows (tokens), D = width.
#pragma once

#include <cstdint>

#include "core/op_params.h"
#include "core/weight.h"

namespace mc::cpu {

// y[T, N] = x[T, K] · w[N, K]ᵀ (the nn.Linear convention: weights are [out, in]), f32 accumulate.
void linear(const float* x, const WeightRef& w, float* y, int64_t T);

// RmsNormParams on float32 activations (statistics in double).
void rms_norm(const RmsNormParams& p);

// QkvRopeParams on float32 activations.
void qkv_rope(const QkvRopeParams& p);

// SiluMulParams on float32 activations.
void silu_mul(const SiluMulParams& p);

// EmbeddingParams: rows of the table, widened to float32.
void embedding(const EmbeddingParams& p);

}  // namespace mc::cpu
