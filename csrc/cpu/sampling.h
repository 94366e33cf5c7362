// CPU reference of the sampling op (SampleParams in core/op_params.h), row by row.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/op_params.h"

namespace mc::cpu {

size_t sample_workspace_bytes(int32_t rows, int32_t vocab);
void sample(const SampleParams& p);

}  // namespace mc::cpu
