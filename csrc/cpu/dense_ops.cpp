#include "cpu/dense_ops.h"

#include <cmath>
#include <cstring>

namespace mc::cpu {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline float reduce(Vec v) {
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// Dot products of kRows weight rows with kTok token rows, sharing every load: weights are
// streamed from memory once per kTok tokens, which is what bounds decode.
template <int kRows, int kTok>
inline void dot_tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t rows, int64_t toks) {
  Vec acc[kRows][kTok] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec xv[kTok];
    for (int t = 0; t < kTok; ++t) xv[t] = load(x + t * K + k);
    for (int r = 0; r < kRows; ++r) {
      Vec wv = load(w + r * K + k);
      for (int t = 0; t < kTok; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < kRows && r < rows; ++r)
    for (int t = 0; t < kTok && t < toks; ++t) {
      float sum = reduce(acc[r][t]);
      for (int64_t kk = k; kk < K; ++kk) sum += w[r * K + kk] * x[t * K + kk];
      y[t * N + r] = sum;
    }
}

}  // namespace

void matmul(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
  constexpr int kRows = 4;
  constexpr int kTok = 2;
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  // Below ~256k multiply-adds a parallel region costs more than it saves (and on a busy
  // machine a barrier can wait a whole scheduler slice for a descheduled thread).
  const bool parallel = T * N * K >= (int64_t{1} << 18);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t block = 0; block < row_blocks; ++block) {
    const int64_t n = block * kRows;
    const int64_t rows = N - n < kRows ? N - n : kRows;
    for (int64_t t = 0; t < T; t += kTok) {
      const int64_t toks = T - t < kTok ? T - t : kTok;
      if (rows == kRows && toks == kTok) {
        dot_tile<kRows, kTok>(x + t * K, w + n * K, y + t * N + n, K, N, rows, toks);
      } else {
        // Edges: one row and one token at a time, reading only rows and tokens that exist.
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t tt = 0; tt < toks; ++tt)
            dot_tile<1, 1>(x + (t + tt) * K, w + (n + r) * K, y + (t + tt) * N + n + r, K, N, 1, 1);
      }
    }
  }
}

void rms_norm(const float* x, const float* weight, float* y, int64_t T, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (T * D >= (int64_t{1} << 17))
  for (int64_t t = 0; t < T; ++t) {
    const float* row = x + t * D;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < D; ++i) sum_sq += static_cast<double>(row[i]) * row[i];
    float inv_rms = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(D) + eps));
    for (int64_t i = 0; i < D; ++i) y[t * D + i] = weight[i] * (row[i] * inv_rms);
  }
}

void rope_tables(const int64_t* positions, const float* inv_freq, int64_t T, int64_t half, float* cos, float* sin) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < half; ++i) {
      float angle = static_cast<float>(positions[t]) * inv_freq[i];
      cos[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
}

void rope(float* x, const float* cos, const float* sin, int64_t T, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (T * heads * head_dim >= (int64_t{1} << 17))
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        float c = cos[t * half + i], s = sin[t * half + i];
        float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
}

void silu_mul(const float* gate, const float* up, float* out, int64_t count) {
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void embedding(const float* table, const int32_t* ids, float* out, int64_t T, int64_t D) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(out + t * D, table + static_cast<int64_t>(ids[t]) * D, D * sizeof(float));
}

void add_inplace(float* x, const float* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] += y[i];
}

}  // namespace mc::cpu
