// CPU reference of paged GQA attention with causal and sliding-window masks.
#pragma once

#include "core/op_params.h"

namespace mc::cpu {

void paged_attention(const AttentionParams& p);

}  // namespace mc::cpu
