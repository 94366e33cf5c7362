// The sampling op on the GPU: SampleParams (core/op_params.h), same semantics as cpu::sample.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/op_params.h"
#include "cuda/common.cuh"

namespace mc::cuda {

// Scratch: the processed rows [R, V] f32.
size_t sample_workspace_bytes(int32_t rows, int32_t vocab);
void sample(const SampleParams& p, cudaStream_t stream);

}  // namespace mc::cuda
