#include "cpu/dense_ops.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "cpu/quantized_activations.h"

namespace mc::cpu {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));
using U16Vec = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
using U32Vec = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
using HalfVec = _Float16 __attribute__((vector_size(kLanes * sizeof(_Float16))));

// kLanes weights widened to float32 (the compiler emits vpmovzxwd + shift for bf16, vcvtph2ps
// for f16): so a bf16 or f16 matrix streams half the bytes of an f32 one.
// (GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* inside
// the conversions below.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
struct F32 {
  using Elem = float;
  static Vec load(const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static float scalar(const float* p) { return *p; }
};
struct BF16 {
  using Elem = uint16_t;
  static Vec load(const uint16_t* p) {
#if defined(__AVX512F__)
    // Zero-extend 16 halves to 32 bits and shift them into the high half: the exact f32 value.
    const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
    return reinterpret_cast<Vec>(_mm512_castsi512_ps(wide));
#else
    U16Vec raw;
    std::memcpy(&raw, p, sizeof(U16Vec));
    U32Vec wide = __builtin_convertvector(raw, U32Vec) << 16;
    Vec v;
    std::memcpy(&v, &wide, sizeof(Vec));
    return v;
#endif
  }
  static float scalar(const uint16_t* p) { return bf16_to_f32(*p); }
};
struct F16 {
  using Elem = uint16_t;
  static Vec load(const uint16_t* p) {
#if defined(__AVX512F__)
    return reinterpret_cast<Vec>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#endif
    HalfVec raw;
    std::memcpy(&raw, p, sizeof(HalfVec));
    return __builtin_convertvector(raw, Vec);
  }
  static float scalar(const uint16_t* p) { return f16_to_f32(*p); }
};

#pragma GCC diagnostic pop

inline Vec load(const float* p) { return F32::load(p); }

inline float reduce(Vec v) {
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// Every float-format linear sums in one order, whatever the tile: kChains accumulators per
// (row, token); block j of kLanes columns (columns [j kLanes, (j + 1) kLanes)) goes to chain
// j % kChains, lane by lane in column order; then the chains are added lane-wise in order, the
// lanes in order, and the last K % kLanes columns one by one. So bf16 / f16 weights give the f32
// path's results on their (exactly) widened values bit for bit, and a token gives the same
// result at batch 1 and inside a batch. Four chains let a single weight row keep four FMAs in
// flight, so decode can stream one row at a time (see linear_as).
constexpr int kChains = 4;

// Dot products of kRows weight rows with kTok token rows, sharing every load: weights are
// streamed from memory once per kTok tokens, which is what bounds decode.
template <typename W, int kRows, int kTok>
inline void dot_tile(const float* x, const typename W::Elem* w, float* y, int64_t K, int64_t N) {
  Vec acc[kRows][kTok][kChains] = {};
  int64_t k = 0;
  for (; k + kChains * kLanes <= K; k += kChains * kLanes) {
    for (int c = 0; c < kChains; ++c) {
      Vec xv[kTok];
      for (int t = 0; t < kTok; ++t) xv[t] = load(x + t * K + k + c * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const Vec wv = W::load(w + r * K + k + c * kLanes);
        for (int t = 0; t < kTok; ++t) acc[r][t][c] += wv * xv[t];
      }
    }
  }
  // The last whole blocks (fewer than kChains) continue the rotation.
  for (int c = 0; k + kLanes <= K; k += kLanes, ++c) {
    Vec xv[kTok];
    for (int t = 0; t < kTok; ++t) xv[t] = load(x + t * K + k);
    for (int r = 0; r < kRows; ++r) {
      const Vec wv = W::load(w + r * K + k);
      for (int t = 0; t < kTok; ++t) acc[r][t][c] += wv * xv[t];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTok; ++t) {
      Vec chains = acc[r][t][0];
      for (int c = 1; c < kChains; ++c) chains += acc[r][t][c];
      float sum = reduce(chains);
      // An explicit fma: left to contraction, GCC fuses the tail for some formats and tiles and
      // not others, and the formats' results would differ in the last bit.
      for (int64_t kk = k; kk < K; ++kk) sum = std::fma(W::scalar(w + r * K + kk), x[t * K + kk], sum);
      y[t * N + r] = sum;
    }
}

// Decode at batch 1, rows [n, n + kRows) of one tile per iteration (the rest one at a time).
template <typename W, int kRows>
void decode_tiles(const float* x, const typename W::Elem* w, float* y, int64_t N, int64_t K, bool parallel) {
  const int64_t tiles = (N + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t n = tile * kRows;
    if (N - n >= kRows) {
      dot_tile<W, kRows, 1>(x, w + n * K, y + n, K, N);
    } else {
      for (int64_t r = n; r < N; ++r) dot_tile<W, 1, 1>(x, w + r * K, y + r, K, N);
    }
  }
}

template <typename W>
void linear_as(const float* x, const typename W::Elem* w, float* y, int64_t T, int64_t N, int64_t K) {
  constexpr int kRows = 4;
  constexpr int kTok = 2;
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  // Below ~256k multiply-adds a parallel region costs more than it saves (and on a busy
  // machine a barrier can wait a whole scheduler slice for a descheduled thread).
  const bool parallel = T * N * K >= (int64_t{1} << 18);
  if (T == 1) {
    // Decode at batch 1. While x (K floats) takes at most a third of L1 beside the weight
    // stream, one row at a time (kChains FMAs in flight): each thread then reads its rows as
    // one sequential stream, which the hardware prefetchers serve best (measured on a 2-core
    // Zen 5, one thread, K = 512-4096: bf16 at 1.1-1.6x the GB/s of eight interleaved rows).
    // Beyond that (K = 5632 measured slower one row at a time), re-reading x from L2 for every
    // row costs more: six rows share each x load (24 accumulators in registers).
    constexpr int64_t kOneRowMaxK = 4096;  // 16 KiB of x
    if (K <= kOneRowMaxK)
      decode_tiles<W, 1>(x, w, y, N, K, parallel);
    else
      decode_tiles<W, 6>(x, w, y, N, K, parallel);
    return;
  }
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t block = 0; block < row_blocks; ++block) {
    const int64_t n = block * kRows;
    const int64_t rows = N - n < kRows ? N - n : kRows;
    for (int64_t t = 0; t < T; t += kTok) {
      const int64_t toks = T - t < kTok ? T - t : kTok;
      if (rows == kRows && toks == kTok) {
        dot_tile<W, kRows, kTok>(x + t * K, w + n * K, y + t * N + n, K, N);
      } else if (rows == kRows) {
        // The odd last token: independent accumulators.
        dot_tile<W, kRows, 1>(x + t * K, w + n * K, y + t * N + n, K, N);
      } else {
        // Edges: one row and one token at a time, reading only rows and tokens that exist.
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t tt = 0; tt < toks; ++tt)
            dot_tile<W, 1, 1>(x + (t + tt) * K, w + (n + r) * K, y + (t + tt) * N + n + r, K, N);
      }
    }
  }
}

// ---- int8 and int4: dequantized in registers as w = (q - z) · s in f32, then the same f32
// multiply-adds as the float formats (so results match the dequantized float matrix up to f32
// summation order). Row r of the tile starts at row pointer w + r * row_bytes.

using I32Vec = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));
using I8Vec = int8_t __attribute__((vector_size(kLanes)));
using U8Vec = uint8_t __attribute__((vector_size(kLanes)));

// kLanes bytes widened to int32 lanes (vpmovsxbd / vpmovzxbd) with intrinsics: the compiler
// scalarizes a generic byte-vector conversion. (GCC 12's avx512fintrin.h trips
// -Wmaybe-uninitialized on its own _mm512_undefined_epi32 inside these.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline I32Vec widen_signed_bytes(const void* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<I32Vec>(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return reinterpret_cast<I32Vec>(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p))));
#else
  // Baseline x86-64 (MC_NATIVE=OFF): the generic conversion, slow but correct.
  I8Vec raw;
  std::memcpy(&raw, p, sizeof(raw));
  return __builtin_convertvector(raw, I32Vec);
#endif
}
inline I32Vec widen_unsigned_bytes(const void* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<I32Vec>(_mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return reinterpret_cast<I32Vec>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p))));
#else
  U8Vec raw;
  std::memcpy(&raw, p, sizeof(raw));
  return __builtin_convertvector(raw, I32Vec);
#endif
}
#pragma GCC diagnostic pop

inline Vec splat(float value) { return Vec{} + value; }

struct Int8Rows {
  const int8_t* data;
  const float* scales;  // [rows]
  int64_t K;
};

template <int kRows, int kTok>
inline void dot_tile_int8(const float* x, const Int8Rows& w, int64_t n, float* y, int64_t N) {
  const int64_t K = w.K;
  Vec acc[kRows][kTok] = {};
  Vec scale[kRows];
  for (int r = 0; r < kRows; ++r) scale[r] = splat(w.scales[n + r]);
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec xv[kTok];
    for (int t = 0; t < kTok; ++t) xv[t] = load(x + t * K + k);
    for (int r = 0; r < kRows; ++r) {
      const Vec wv = __builtin_convertvector(widen_signed_bytes(w.data + (n + r) * K + k), Vec) * scale[r];
      for (int t = 0; t < kTok; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTok; ++t) {
      float sum = reduce(acc[r][t]);
      for (int64_t kk = k; kk < K; ++kk)
        sum += static_cast<float>(w.data[(n + r) * K + kk]) * w.scales[n + r] * x[t * K + kk];
      y[t * N + r] = sum;
    }
}

struct Int4Rows {
  const uint8_t* data;  // [rows, K / 2]
  const float* scales;  // [rows, K / G]
  const float* zeros;   // [rows, K / G]
  int64_t K;
  int64_t G;
};

// Columns come in blocks of 32 (16 bytes: low nibbles = columns 0..15, high = 16..31); K and G
// are multiples of 32, so there is no scalar tail.
template <int kRows, int kTok>
inline void dot_tile_int4(const float* x, const Int4Rows& w, int64_t n, float* y, int64_t N) {
  const int64_t K = w.K, groups = K / w.G;
  Vec acc[kRows][kTok] = {};
  for (int64_t g = 0; g < groups; ++g) {
    Vec scale[kRows], zero[kRows];
    for (int r = 0; r < kRows; ++r) {
      scale[r] = splat(w.scales[(n + r) * groups + g]);
      zero[r] = splat(w.zeros[(n + r) * groups + g]);
    }
    for (int64_t block = g * w.G; block < (g + 1) * w.G; block += 32) {
      for (int half = 0; half < 16; half += kLanes) {
        Vec lo_x[kTok], hi_x[kTok];
        for (int t = 0; t < kTok; ++t) {
          lo_x[t] = load(x + t * K + block + half);
          hi_x[t] = load(x + t * K + block + 16 + half);
        }
        for (int r = 0; r < kRows; ++r) {
          const I32Vec wide = widen_unsigned_bytes(w.data + (n + r) * (K / 2) + block / 2 + half);
          const Vec lo = (__builtin_convertvector(wide & 0x0F, Vec) - zero[r]) * scale[r];
          const Vec hi = (__builtin_convertvector(wide >> 4, Vec) - zero[r]) * scale[r];
          for (int t = 0; t < kTok; ++t) acc[r][t] += lo * lo_x[t] + hi * hi_x[t];
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTok; ++t) y[t * N + r] = reduce(acc[r][t]);
}

// The tiling of linear_as over a quantized format's row set (see there).
template <typename Rows, void (*kTile4x2)(const float*, const Rows&, int64_t, float*, int64_t),
          void (*kTile4x1)(const float*, const Rows&, int64_t, float*, int64_t),
          void (*kTile1x1)(const float*, const Rows&, int64_t, float*, int64_t)>
void linear_rows(const float* x, const Rows& w, float* y, int64_t T, int64_t N) {
  constexpr int kRows = 4;
  constexpr int kTok = 2;
  const int64_t K = w.K;
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  const bool parallel = T * N * K >= (int64_t{1} << 18);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t block = 0; block < row_blocks; ++block) {
    const int64_t n = block * kRows;
    const int64_t rows = N - n < kRows ? N - n : kRows;
    for (int64_t t = 0; t < T; t += kTok) {
      const int64_t toks = T - t < kTok ? T - t : kTok;
      if (rows == kRows && toks == kTok) {
        kTile4x2(x + t * K, w, n, y + t * N + n, N);
      } else if (rows == kRows) {
        kTile4x1(x + t * K, w, n, y + t * N + n, N);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t tt = 0; tt < toks; ++tt) kTile1x1(x + (t + tt) * K, w, n + r, y + (t + tt) * N + n + r, N);
      }
    }
  }
}

void linear_int8(const float* x, const WeightRef& w, float* y, int64_t T) {
  if (w.quantize_activations && supports_quantized_activations(w)) return linear_quantized_activations(x, w, y, T);
  const Int8Rows rows{static_cast<const int8_t*>(w.data), static_cast<const float*>(w.scales), w.cols};
  linear_rows<Int8Rows, dot_tile_int8<4, 2>, dot_tile_int8<4, 1>, dot_tile_int8<1, 1>>(x, rows, y, T, w.rows);
}

void linear_int4(const float* x, const WeightRef& w, float* y, int64_t T) {
  if (w.cols % 32 != 0 || w.group_size <= 0 || w.group_size % 32 != 0 || w.cols % w.group_size != 0)
    fail(ErrorKind::kInvalidRequest, "CPU linear: int4 needs cols and group_size multiples of 32, got cols ", w.cols,
         ", group_size ", w.group_size);
  std::vector<float> permuted;
  if (w.col_perm != nullptr) {
    // Act-order: the stored columns are the inputs regrouped; gather x into that order once.
    permuted.resize(static_cast<size_t>(T * w.cols));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < w.cols; ++k) permuted[t * w.cols + k] = x[t * w.cols + w.col_perm[k]];
    x = permuted.data();
  }
  if (w.quantize_activations && supports_quantized_activations(w)) return linear_quantized_activations(x, w, y, T);
  const Int4Rows rows{static_cast<const uint8_t*>(w.data), static_cast<const float*>(w.scales),
                      static_cast<const float*>(w.zeros), w.cols, w.group_size};
  linear_rows<Int4Rows, dot_tile_int4<4, 2>, dot_tile_int4<4, 1>, dot_tile_int4<1, 1>>(x, rows, y, T, w.rows);
}

}  // namespace

void linear(const float* x, const WeightRef& w, float* y, int64_t T) {
  switch (w.format) {
    case WeightFormat::kF32:
      return linear_as<F32>(x, static_cast<const float*>(w.data), y, T, w.rows, w.cols);
    case WeightFormat::kBF16:
      return linear_as<BF16>(x, static_cast<const uint16_t*>(w.data), y, T, w.rows, w.cols);
    case WeightFormat::kF16:
      return linear_as<F16>(x, static_cast<const uint16_t*>(w.data), y, T, w.rows, w.cols);
    case WeightFormat::kInt8:
      return linear_int8(x, w, y, T);
    case WeightFormat::kInt4:
      return linear_int4(x, w, y, T);
  }
  fail(ErrorKind::kUnsupported, "CPU linear: unsupported weight format ", weight_format_name(w.format));
}

void rms_norm(const RmsNormParams& p) {
  float* residual = p.residual;
  const auto* delta = static_cast<const float*>(p.delta);
  const auto* weight = static_cast<const float*>(p.weight);
  auto* out = static_cast<float*>(p.out);
  const int64_t D = p.dim;
  if (delta != nullptr) {
#pragma omp parallel for schedule(static) if (p.n_tokens * D >= (int64_t{1} << 17))
    for (int64_t i = 0; i < p.n_tokens * D; ++i) residual[i] += delta[i];
  }
#pragma omp parallel for schedule(static) if (p.n_rows * D >= (int64_t{1} << 17))
  for (int64_t r = 0; r < p.n_rows; ++r) {
    const float* row = residual + (p.rows != nullptr ? p.rows[r] : r) * D;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < D; ++i) sum_sq += static_cast<double>(row[i]) * row[i];
    const float inv_rms = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(D) + p.eps));
    for (int64_t i = 0; i < D; ++i) out[r * D + i] = weight[i] * (row[i] * inv_rms);
  }
}

void qkv_rope(const QkvRopeParams& p) {
  const int64_t Dh = p.head_dim, half = Dh / 2;
  const int64_t q_dim = p.n_heads * Dh, kv_dim = p.n_kv_heads * Dh, row = q_dim + 2 * kv_dim;
  const auto* qkv = static_cast<const float*>(p.qkv);
  auto* q = static_cast<float*>(p.q);
  auto* k = static_cast<float*>(p.k);
  auto* v = static_cast<float*>(p.v);
#pragma omp parallel if (p.n_tokens * row >= (int64_t{1} << 17))
  {
    std::vector<float> cos(half), sin(half);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.n_tokens; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        // An f32 angle like the reference implementations (long positions round the same way).
        const float angle = static_cast<float>(p.positions[t]) * p.inv_freq[i];
        cos[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      const float* src = qkv + t * row;
      auto rotate = [&](const float* in, float* out, int64_t heads) {
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t i = 0; i < half; ++i) {
            const float a = in[h * Dh + i], b = in[h * Dh + i + half];
            out[h * Dh + i] = a * cos[i] - b * sin[i];
            out[h * Dh + i + half] = b * cos[i] + a * sin[i];
          }
      };
      rotate(src, q + t * q_dim, p.n_heads);
      rotate(src + q_dim, k + t * kv_dim, p.n_kv_heads);
      std::memcpy(v + t * kv_dim, src + q_dim + kv_dim, kv_dim * sizeof(float));
    }
  }
}

void silu_mul(const SiluMulParams& p) {
  const int64_t F = p.hidden;
  const auto* gate_up = static_cast<const float*>(p.gate_up);
  auto* out = static_cast<float*>(p.out);
#pragma omp parallel for schedule(static) if (p.n_tokens * F > 65536)
  for (int64_t t = 0; t < p.n_tokens; ++t)
    for (int64_t i = 0; i < F; ++i) {
      const float g = gate_up[t * 2 * F + i];
      out[t * F + i] = g / (1.0f + std::exp(-g)) * gate_up[t * 2 * F + F + i];
    }
}

void embedding(const EmbeddingParams& p) {
  if (is_quantized(p.table.format))
    fail(ErrorKind::kUnsupported, "CPU embedding: the table must be a float format, not ", weight_format_name(p.table.format));
  const int64_t D = p.table.cols;
  const DType dtype = dtype_of(p.table.format);
  const size_t row_bytes = static_cast<size_t>(D) * p.table.element_bytes();
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    const void* row = static_cast<const uint8_t*>(p.table.data) + static_cast<size_t>(p.ids[t]) * row_bytes;
    convert(row, dtype, p.out + t * D, DType::kF32, static_cast<size_t>(D));
  }
}

}  // namespace mc::cpu
