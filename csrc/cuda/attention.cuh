// Paged GQA attention on the GPU: decode (one new token per entry) and prefill (chunks),
// over the rolling-buffer cache, with the same semantics as cpu::paged_attention.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "core/op_params.h"
#include "cuda/common.cuh"

namespace mc::cuda {

// The element type of AttentionParamsT is erased (bf16 or f16, named by dtype); the host also
// passes bounds it knows so the dispatch can plan splits without reading device memory.
struct CudaAttentionParams {
  AttentionParamsT<void> tensors;  // pointers as in op_params.h, element type = dtype
  DType dtype = DType::kBF16;
  int32_t n_tokens = 0;            // T = cu_seqlens[n_entries]
  int32_t max_query_len = 0;       // largest entry token count (1 = pure decode)
  int64_t max_context = 0;         // largest number of keys any query of the step can see
};

// Scratch the dispatch needs (split-context partial results), in bytes; 0 allowed.
size_t attention_workspace_bytes(const CudaAttentionParams& p);

// Picks the decode kernel (flash-decoding, split over the context when it is long, each K/V
// block loaded once per KV head for its whole query group) when max_query_len == 1, else the
// tiled prefill kernel (online softmax, tensor cores). Supported head_dim: 64, 128.
void paged_attention(const CudaAttentionParams& p, void* workspace, cudaStream_t stream);

}  // namespace mc::cuda
