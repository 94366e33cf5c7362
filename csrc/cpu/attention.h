// CPU reference of paged GQA attention with causal and sliding-window masks, and of the
// K/V append into the paged cache.
#pragma once

#include "core/op_params.h"

namespace mc::cpu {

void paged_attention(const AttentionParamsT<float>& p);

// Appends a step's K/V to the pools (after paged_attention has read the prefix).
void kv_append(const KvAppendParamsT<float>& p);

}  // namespace mc::cpu
