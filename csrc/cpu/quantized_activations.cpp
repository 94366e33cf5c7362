#include "cpu/quantized_activations.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* inside the
// reduction intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace mc::cpu {
namespace {

constexpr int64_t kInt4Chunk = 128;  // columns of one 64-byte load of int4 weights

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// One token row quantized: int8 values (int4 path: in the chunk layout below), its scale, and
// (int4) the sum of its values in each group.
struct QuantizedRow {
  float scale = 1.0f;
  std::vector<int16_t> wide;      // int8 path: [K] values widened to int16 (vpdpwssd's operands)
  std::vector<int8_t> chunked;    // int4 path: per 128 columns, 64 bytes of the columns each
                                  // packed byte's low nibbles hold, then 64 of its high nibbles
  std::vector<int32_t> group_sums;  // int4 path: [K / G]
};

// The int4 chunk layout: the 64 packed bytes of 128 columns are 4 runs of 16 (run b: low nibble
// = column 32b + i, high = 32b + 16 + i), so byte j of the low half is column 32(j/16) + j%16 and
// of the high half 32(j/16) + 16 + j%16.
int64_t chunk_position(int64_t k) {
  const int64_t chunk = k / kInt4Chunk, c = k % kInt4Chunk, run = c / 32, i = c % 32;
  return chunk * kInt4Chunk + (i < 16 ? 0 : 64) + run * 16 + i % 16;
}

QuantizedRow quantize_row(const float* x, const WeightRef& w) {
  const int64_t K = w.cols;
  QuantizedRow row;
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  row.scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  std::vector<int8_t> q(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / row.scale), -127.0f, 127.0f));
  if (w.format == WeightFormat::kInt8) {
    row.wide.assign(q.begin(), q.end());
    return row;
  }
  row.chunked.resize(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) row.chunked[chunk_position(k)] = q[k];
  row.group_sums.assign(static_cast<size_t>(K / w.group_size), 0);
  for (int64_t k = 0; k < K; ++k) row.group_sums[k / w.group_size] += q[k];
  return row;
}

int64_t dot_int8(const int8_t* w, const int16_t* x, int64_t K) {
  if constexpr (kVnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 32) {
      const __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
      acc = _mm512_dpwssd_epi32(acc, wide, _mm512_loadu_si512(x + k));
    }
    return _mm512_reduce_add_epi32(acc);
#endif
  }
  int64_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += static_cast<int32_t>(w[k]) * x[k];
  return sum;
}

// Σ_g s[g] · (Σ_{k in g} q[k] · qx[k] − z[g] · Σ_{k in g} qx[k]) over one int4 row: per group
// the integer products go to int32 lanes (vpdpbusd: 4 unsigned nibbles x 4 signed bytes per
// lane), which are scaled into float lanes; one horizontal sum per row.
float dot_int4_row(const uint8_t* w, const QuantizedRow& x, const float* s, const float* z, int64_t groups,
                   int64_t G) {
  const int64_t chunks = G / kInt4Chunk;
  float zero_term = 0.0f;
  for (int64_t g = 0; g < groups; ++g) zero_term += s[g] * z[g] * static_cast<float>(x.group_sums[g]);
  if constexpr (kVnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
        const __m512i packed = _mm512_loadu_si512(w + c * 64);
        const __m512i lo = _mm512_and_si512(packed, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        acc = _mm512_dpbusd_epi32(acc, lo, _mm512_loadu_si512(x.chunked.data() + c * kInt4Chunk));
        acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(x.chunked.data() + c * kInt4Chunk + 64));
      }
      sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(s[g]), sum);
    }
    return _mm512_reduce_add_ps(sum) - zero_term;
#endif
  }
  float sum = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    int32_t dot = 0;
    for (int64_t j = g * chunks * 64; j < (g + 1) * chunks * 64; ++j) {
      const int64_t c = j / 64, b = j % 64;
      dot += (w[j] & 0x0F) * x.chunked[c * kInt4Chunk + b] + (w[j] >> 4) * x.chunked[c * kInt4Chunk + 64 + b];
    }
    sum += s[g] * static_cast<float>(dot);
  }
  return sum - zero_term;
}

}  // namespace

bool supports_quantized_activations(const WeightRef& w) {
  if (w.format == WeightFormat::kInt8) return w.cols % 32 == 0;
  if (w.format == WeightFormat::kInt4) return w.cols % kInt4Chunk == 0 && w.group_size % kInt4Chunk == 0;
  return false;
}

void linear_quantized_activations(const float* x, const WeightRef& w, float* y, int64_t T) {
  const int64_t N = w.rows, K = w.cols;
  std::vector<QuantizedRow> rows(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) rows[t] = quantize_row(x + t * K, w);
  const auto* scales = static_cast<const float*>(w.scales);
  const bool parallel = N * K * T >= (int64_t{1} << 18);
  if (w.format == WeightFormat::kInt8) {
    const auto* q = static_cast<const int8_t*>(w.data);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < T; ++t)
        y[t * N + n] = scales[n] * rows[t].scale * static_cast<float>(dot_int8(q + n * K, rows[t].wide.data(), K));
    return;
  }
  const auto* q = static_cast<const uint8_t*>(w.data);
  const auto* zeros = static_cast<const float*>(w.zeros);
  const int64_t G = w.group_size, groups = K / G;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = q + n * (K / 2);
    const float* s = scales + n * groups;
    const float* z = zeros + n * groups;
    for (int64_t t = 0; t < T; ++t) y[t * N + n] = rows[t].scale * dot_int4_row(row, rows[t], s, z, groups, G);
  }
}

}  // namespace mc::cpu
