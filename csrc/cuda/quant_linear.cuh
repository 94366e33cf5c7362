// Linear and MoE experts on int8 / int4 weights (formats: core/weight.h), half activations,
// f32 accumulation, with the CPU ops' semantics (cpu/dense_ops.cpp: w = (q - z) · s in f32).
//
// Two paths, picked by the host-known token count:
//   T <= kQuantGemvMaxTokens (decode): weight-only GEMV. One warp per output row; each lane
//     reads 16 bytes of the packed row per step (32 int4 or 16 int8 columns, one 128-bit load),
//     dequantizes them in registers and multiplies them with up to 16 token rows, so every
//     packed byte is read once per call. Bound by the bytes of the packed weights.
//   T > kQuantGemvMaxTokens (prefill): the matrix is dequantized into scratch in the activation
//     dtype, then the cuBLAS GEMM of the float path (the weights are read twice, which batch
//     sizes that large amortize; a tensor-core kernel dequantizing tiles in shared memory is the
//     next step).
// Act-order int4 (WeightRef::col_perm): the GEMV gathers x through the permutation into scratch
// first; the dequantize path scatters each column back to its input position instead.
//
// The MoE experts (quant_moe_experts) run the GEMV kernel body per expert over that expert's
// (token, slot) pairs from moe_route, in chunks of kQuantMoeTokenChunk tokens: gate/up with the
// SiLU fused, then down with the routing weight applied and added into the f32 residual.
// Shapes: T = tokens, N = rows (outputs), K = cols (inputs), E = experts, D = dim, F = expert
// FFN width, P = T * top_k pairs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "core/weight.h"

namespace mc::cuda {

class Gemm;

constexpr int kQuantGemvMaxTokens = 16;
constexpr int kQuantMoeTokenChunk = 8;

// y[T, N] = x[T, K] · dequant(w)ᵀ.
struct QuantLinearParams {
  const void* x = nullptr;  // [T, K] act (bf16 or f16)
  WeightRef w;              // [N, K] kInt8 or kInt4, device pointers (count 1)
  void* y = nullptr;        // [T, N] in out_dtype (act, or f32 for logits)
  int64_t n_tokens = 0;
  DType act_dtype = DType::kBF16;
  DType out_dtype = DType::kBF16;
};

// Scratch of quant_linear for any call with this weight shape and up to max_tokens tokens.
size_t quant_linear_workspace_bytes(const WeightRef& w, int64_t max_tokens, DType act_dtype);
// Throws kUnsupported for widths the kernels cannot read (int8: K % 16; int4: K % 32).
void quant_linear(const QuantLinearParams& p, void* workspace, Gemm& gemm, cudaStream_t stream);

// Every element of w as `dtype` [count, rows, cols] (input column order: col_perm undone).
void dequantize_weights(const WeightRef& w, void* out, DType dtype, cudaStream_t stream);

// The quantized counterpart of moe_experts (cuda/moe.cuh), same routing inputs.
struct QuantMoeParams {
  const void* x = nullptr;                  // [T, D] act: the normed hidden state
  WeightRef w13;                            // [E, 2F, D] quantized: rows 0..F-1 = w1, F..2F-1 = w3
  WeightRef w2;                             // [E, D, F] quantized
  const int32_t* expert_offsets = nullptr;  // [E + 1] from moe_route
  const int32_t* sorted_pairs = nullptr;    // [P]
  const float* weights = nullptr;           // [T, K]
  float* residual = nullptr;                // [T, D] f32: y is ADDED here (atomically)
  int32_t n_tokens = 0;
  int32_t top_k = 0;
  DType act_dtype = DType::kBF16;
};
size_t quant_moe_workspace_bytes(const QuantMoeParams& p);
void quant_moe_experts(const QuantMoeParams& p, void* workspace, cudaStream_t stream);

}  // namespace mc::cuda
