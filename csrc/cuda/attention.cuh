// Paged GQA attention on the GPU: decode (one new token per entry) and prefill (chunks),
// over the rolling-buffer cache, with the same semantics as cpu::paged_attention. Takes the
// attention op's params of core/op_params.h (element type bf16 or f16, named by dtype).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/op_params.h"
#include "cuda/common.cuh"

namespace mc::cuda {

// Scratch paged_attention needs (split-context partial results) for any decode part within p's
// bounds: at most p.n_tokens decode tokens, at most p.max_context keys, p's heads. 0 allowed.
size_t attention_workspace_bytes(const AttentionParams& p);

// The step's decode entries [0, kv.n_decode) take the decode kernel (flash-decoding, split
// over the context when it is long, each K/V block loaded once per KV head for its whole query
// group), the other entries the tiled prefill kernel (online softmax, tensor cores). Without
// decode entries (kv.n_decode = 0) the whole step takes the decode kernel when max_query_len
// is 1, else the prefill kernel; a query group too large for the decode kernel always takes
// the prefill kernel. Split partials go to p.workspace (attention_workspace_bytes of the
// step's bounds). Supported head_dim: 64, 128.
void paged_attention(const AttentionParams& p, cudaStream_t stream);

}  // namespace mc::cuda
