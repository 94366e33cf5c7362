// The opt-in fast mode of the quantized CPU linear (WeightRef::quantize_activations): each token
// row of x is quantized to int8 (per row, symmetric: sx = max|x| / 127, qx = round(x / sx),
// ties to even) and multiplied with the integer weights in integer arithmetic, as llama.cpp's
// integer dot products do:
//   int8:  y[t, n] = s[n] · sx[t] · Σ_k q[n, k] · qx[t, k]
//   int4:  y[t, n] = sx[t] · Σ_g s[n, g] · (Σ_{k in g} q[n, k] · qx[t, k] − z[n, g] · Σ_{k in g} qx[t, k])
// (AVX512-VNNI: vpdpwssd for int8, vpdpbusd for int4; portable loops elsewhere). Results differ
// from the dequantized float model by the activations' rounding, not only float32 rounding.
#pragma once

#include <cstdint>

#include "core/weight.h"

namespace mc::cpu {

// Whether `w` can take the fast mode (int8: cols % 32 == 0; int4: cols and group_size multiples
// of 128); the caller falls back to the exact kernels otherwise.
bool supports_quantized_activations(const WeightRef& w);

// y[T, N] as above; x [T, K] float32, already in the stored column order (col_perm applied).
void linear_quantized_activations(const float* x, const WeightRef& w, float* y, int64_t T);

}  // namespace mc::cpu
