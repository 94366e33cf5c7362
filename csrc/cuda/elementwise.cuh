// Launchers of the memory-bound ops of a layer. Each takes its plain Params struct of
// core/op_params.h (semantics there, shared with the CPU backend) and a stream. On the GPU the
// activation dtype ("half" below) is bf16 or f16, named by each struct's dtype.
#pragma once

#include "core/op_params.h"
#include "cuda/common.cuh"

namespace mc::cuda {

// out[t, :] (f32) = table[ids[t], :]; the table (a WeightRef [V, D]) must be half.
void embedding(const EmbeddingParams& p, cudaStream_t stream);

// RMSNorm fused with the residual add (residual f32; delta, weight, out half).
void rms_norm(const RmsNormParams& p, cudaStream_t stream);

// The fused q|k|v projection's output [T, (H + 2 KVH) * Dh] split into q [T, H, Dh] and
// k [T, KVH, Dh] with RoPE applied (out of place) and v [T, KVH, Dh] (copied).
void qkv_rope(const QkvRopeParams& p, cudaStream_t stream);

// K/V append into the paged cache; the token count is p.tensors.kv.n_tokens.
void kv_append(const KvAppendParams& p, cudaStream_t stream);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, F + i].
void silu_mul(const SiluMulParams& p, cudaStream_t stream);

}  // namespace mc::cuda
