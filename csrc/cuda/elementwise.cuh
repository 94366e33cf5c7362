// The small memory-bound ops of a layer. Each takes a plain Params struct and a stream.
// Shapes: T = tokens of the step, D = dim, H / KVH = query / key-value heads, Dh = head_dim,
// F = FFN width. "half" = the activation dtype (bf16 or f16) named by `dtype`.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/op_params.h"
#include "cuda/common.cuh"

namespace mc::cuda {

// out[t, :] (f32) = table[ids[t], :] (half). Starts the f32 residual stream.
struct EmbeddingParams {
  const void* table = nullptr;   // [V, D] half
  const int32_t* ids = nullptr;  // [T]
  float* out = nullptr;          // [T, D] f32
  int64_t n_tokens = 0;
  int64_t dim = 0;
  DType dtype = DType::kBF16;
};
void embedding(const EmbeddingParams& p, cudaStream_t stream);

// RMSNorm fused with the residual add, statistics in f32:
//   if delta:  residual[t] += delta[t]            (every row t < n_tokens, in place)
//   out[r] = residual[row_r] / sqrt(mean(residual[row_r]^2) + eps) * weight,
//   row_r = rows ? rows[r] : r, for r < n_rows  (rows picks the LM-head rows)
struct RmsNormParams {
  float* residual = nullptr;       // [T, D] f32, updated in place when delta is set
  const void* delta = nullptr;     // [T, D] half, or null
  const void* weight = nullptr;    // [D] half
  void* out = nullptr;             // [n_rows, D] half
  const int32_t* rows = nullptr;   // [n_rows] or null (= identity, n_rows == n_tokens)
  int64_t n_tokens = 0;
  int64_t n_rows = 0;
  int64_t dim = 0;
  float eps = 1e-5f;
  DType dtype = DType::kBF16;
};
void rms_norm(const RmsNormParams& p, cudaStream_t stream);

// Half-rotation RoPE in place on q [T, H, Dh] and k [T, KVH, Dh]: pair (i, i + Dh/2) of token t
// turns by angle = float(positions[t]) * inv_freq[i] (an f32 product, as the reference
// implementations and the CPU backend compute it), cos/sin taken in double of that angle.
struct RopeParams {
  void* q = nullptr;
  void* k = nullptr;
  const int64_t* positions = nullptr;  // [T]
  const float* inv_freq = nullptr;     // [Dh / 2]
  int64_t n_tokens = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kBF16;
};
void rope(const RopeParams& p, cudaStream_t stream);

// K/V append into the paged cache (semantics in op_params.h, same as cpu::kv_append); the
// element type of the tensors is erased, named by dtype.
struct CudaKvAppendParams {
  KvAppendParamsT<void> tensors;
  DType dtype = DType::kBF16;
  int32_t n_tokens = 0;  // T = cu_seqlens[n_entries]
};
void kv_append(const CudaKvAppendParams& p, cudaStream_t stream);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, F + i]: the fused w1|w3 projection's halves.
struct SiluMulParams {
  const void* gate_up = nullptr;  // [T, 2F] half
  void* out = nullptr;            // [T, F] half
  int64_t n_tokens = 0;
  int64_t hidden = 0;             // F
  DType dtype = DType::kBF16;
};
void silu_mul(const SiluMulParams& p, cudaStream_t stream);

}  // namespace mc::cuda
