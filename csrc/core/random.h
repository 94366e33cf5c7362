// Counter-based random numbers: sample i of stream s is a pure function of (s, i), so the CPU
// and the GPU generate the same random model for the same seed, in any order, in parallel.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/hd.h"

namespace mc {

// splitmix64's finalizer: a bijection that scrambles every input bit into every output bit.
MC_HD inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1]: 24 random bits, never 0 so that log() below is finite.
MC_HD inline float uniform_open0(uint64_t stream, uint64_t index) {
  uint64_t bits = mix64(stream ^ mix64(index + 0x9e3779b97f4a7c15ull)) >> 40;
  return (static_cast<float>(bits) + 1.0f) * (1.0f / 16777216.0f);
}

// Standard normal sample `index` of `stream` (Box-Muller over two uniforms).
MC_HD inline float normal_sample(uint64_t stream, uint64_t index) {
  float u1 = uniform_open0(stream, 2 * index);
  float u2 = uniform_open0(stream, 2 * index + 1);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
}

// The stream of weight tensor `slot` of a model drawn with `seed`.
MC_HD inline uint64_t weight_stream(uint64_t seed, uint64_t slot) { return mix64(seed * 0x100000001b3ull + slot); }

// Random models: matrices ~ N(0, kRandomWeightStd) (transformers' default init), norm
// weights 1.
constexpr float kRandomWeightStd = 0.02f;

}  // namespace mc
