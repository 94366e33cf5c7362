// CPU reference ops on float32 row-major matrices. T = rows (tokens), D = width.
#pragma once

#include <cstdint>

namespace mc::cpu {

// y[T, N] = x[T, K] · w[N, K]ᵀ (the nn.Linear convention: weights are [out, in]).
void matmul(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K);

// y[T, D] = x / sqrt(mean(x²) + eps) * weight, statistics in double.
void rms_norm(const float* x, const float* weight, float* y, int64_t T, int64_t D, float eps);

// Half-rotation RoPE in place on x[T, heads, Dh]: each pair (i, i + Dh/2) of token t rotates
// by the angle whose cos/sin are cos[t, i], sin[t, i] (tables [T, Dh/2] from rope_tables).
void rope(float* x, const float* cos, const float* sin, int64_t T, int64_t heads, int64_t head_dim);

// Tables for rope(): angle = float(pos) * inv_freq[i] in float32 like the reference
// implementations (so long positions round the same way), cos/sin of it exactly.
void rope_tables(const int64_t* positions, const float* inv_freq, int64_t T, int64_t half, float* cos, float* sin);

// out[i] = silu(gate[i]) * up[i]
void silu_mul(const float* gate, const float* up, float* out, int64_t count);

// out[T, D] = table[ids[t]]
void embedding(const float* table, const int32_t* ids, float* out, int64_t T, int64_t D);

// x[i] += y[i]
void add_inplace(float* x, const float* y, int64_t count);

}  // namespace mc::cpu
