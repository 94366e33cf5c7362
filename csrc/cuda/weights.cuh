// Filling weight tensors on the device: conversion of uploaded checkpoint bytes to the
// activation dtype, and random weights (the same numbers as random_weights() on the host).
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "cuda/common.cuh"

namespace mc::cuda {

// dst[i] (dtype `to`, half) = src[i] (dtype `from`, any float dtype), i < count.
void convert_weights(const void* src, DType from, void* dst, DType to, int64_t count, cudaStream_t stream);

// dst[i] = 1 (norm weights) or kRandomWeightStd * normal_sample(stream_id, i).
void fill_random_weights(void* dst, DType dtype, int64_t count, uint64_t stream_id, bool ones, cudaStream_t stream);

}  // namespace mc::cuda
