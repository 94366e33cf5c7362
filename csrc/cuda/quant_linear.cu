#include "cuda/quant_linear.cuh"

#include <algorithm>
#include <type_traits>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/gemm.h"

namespace mc::cuda {
namespace {

constexpr int kWarps = 4;  // output rows per block of the GEMV kernels, one per warp
constexpr int kThreads = kWarps * 32;
constexpr int kFlatThreads = 256;

// A quantized matrix (or stack) as the kernels read it; rows of a stack are numbered globally
// (matrix e, row r -> e * rows + r).
struct QuantMatrix {
  const uint8_t* data = nullptr;  // [count * rows, row_bytes]
  const float* scales = nullptr;  // int8: [count * rows]; int4: [count * rows, groups]
  const float* zeros = nullptr;   // int4: [count * rows, groups]
  const int32_t* col_perm = nullptr;  // int4: [count, cols] or null
  int64_t rows = 0, cols = 0, groups = 1, row_bytes = 0;
  int32_t group_size = 0;
};

QuantMatrix quant_matrix(const WeightRef& w) {
  QuantMatrix m;
  m.data = static_cast<const uint8_t*>(w.data);
  m.scales = static_cast<const float*>(w.scales);
  m.zeros = static_cast<const float*>(w.zeros);
  m.col_perm = w.col_perm;
  m.rows = w.rows;
  m.cols = w.cols;
  m.groups = w.groups();
  m.row_bytes = w.row_bytes();
  m.group_size = w.group_size;
  return m;
}

template <WeightFormat F>
struct Chunk;  // columns held by one 16-byte chunk of a packed row
template <>
struct Chunk<WeightFormat::kInt8> {
  static constexpr int kCols = 16;
};
template <>
struct Chunk<WeightFormat::kInt4> {
  static constexpr int kCols = 32;
};

// The kCols weights of 16-byte chunk c of global row r, dequantized in registers exactly as
// w = (q - z) · s in f32. int4 chunk bytes: byte i = column i (low nibble), 16 + i (high).
template <WeightFormat F>
__device__ __forceinline__ void dequant_chunk(const QuantMatrix& m, int64_t r, int64_t c, float* w) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(m.data + r * m.row_bytes) + c);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (F == WeightFormat::kInt8) {
    const float s = __ldg(m.scales + r);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const auto q = static_cast<int8_t>((words[i / 4] >> (8 * (i % 4))) & 0xFFu);
      w[i] = static_cast<float>(q) * s;
    }
  } else {
    const int64_t g = (c * 32) / m.group_size;
    const float s = __ldg(m.scales + r * m.groups + g);
    const float z = __ldg(m.zeros + r * m.groups + g);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t byte = (words[i / 4] >> (8 * (i % 4))) & 0xFFu;
      w[i] = (static_cast<float>(byte & 0xFu) - z) * s;
      w[16 + i] = (static_cast<float>(byte >> 4) - z) * s;
    }
  }
}

// kCols consecutive activations from col0 (16-byte aligned), widened to f32.
template <typename T, int kCols>
__device__ __forceinline__ void load_x(const T* row, int64_t col0, float* out) {
  const auto* packs = reinterpret_cast<const Pack<T, 8>*>(row + col0);
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j) {
    const Pack<T, 8> v = packs[j];
#pragma unroll
    for (int e = 0; e < 8; ++e) out[j * 8 + e] = to_float(v.v[e]);
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Dot products of global row r with the first n_tok of kTok activation rows, by one warp: lane
// l takes chunks l, l + 32, ... (a warp-wide 512-byte contiguous read per step), so each packed
// byte is loaded once and used for every token. Every lane returns the full sums.
template <typename T, WeightFormat F, int kTok>
__device__ __forceinline__ void warp_dot(const QuantMatrix& m, int64_t r, const T* const (&x_rows)[kTok], int n_tok,
                                         float (&acc)[kTok]) {
  constexpr int kCols = Chunk<F>::kCols;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < kTok; ++t) acc[t] = 0.0f;
  // Act-order int4: stored column k reads input perm[k] (scalar gathers; the linear op permutes
  // x into scratch instead and passes no perm).
  const int32_t* perm = m.col_perm ? m.col_perm + (r / m.rows) * m.cols : nullptr;
  for (int64_t c = lane; c < m.cols / kCols; c += 32) {
    float w[kCols];
    dequant_chunk<F>(m, r, c, w);
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      if (t < n_tok) {
        float x[kCols];
        if (perm == nullptr) {
          load_x<T, kCols>(x_rows[t], c * kCols, x);
        } else {
#pragma unroll
          for (int i = 0; i < kCols; ++i) x[i] = to_float(x_rows[t][__ldg(perm + c * kCols + i)]);
        }
#pragma unroll
        for (int i = 0; i < kCols; ++i) acc[t] = fmaf(w[i], x[i], acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTok; ++t) acc[t] = warp_sum(acc[t]);
}

// ---- linear ----

template <typename T, typename Out, WeightFormat F, int kTok>
__global__ void __launch_bounds__(kThreads) quant_gemv_kernel(const T* __restrict__ x, QuantMatrix m,
                                                               Out* __restrict__ y, int n_tok) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= m.rows) return;
  const T* x_rows[kTok];
#pragma unroll
  for (int t = 0; t < kTok; ++t) x_rows[t] = x + static_cast<int64_t>(t < n_tok ? t : 0) * m.cols;
  float acc[kTok];
  warp_dot<T, F, kTok>(m, n, x_rows, n_tok, acc);
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int t = 0; t < kTok; ++t)
      if (t < n_tok) y[static_cast<int64_t>(t) * m.rows + n] = from_float<Out>(acc[t]);
  }
}

// x_perm[t, k] = x[t, perm[k]]: the inputs in the stored (act-order regrouped) column order.
template <typename T>
__global__ void permute_columns_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm,
                                       T* __restrict__ out, int64_t n, int64_t K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = x[(i / K) * K + perm[i % K]];
}

// One thread per 16-byte chunk: its kCols weights dequantized to T at their input columns.
template <typename T, WeightFormat F>
__global__ void dequantize_kernel(QuantMatrix m, int64_t total_rows, T* __restrict__ out) {
  constexpr int kCols = Chunk<F>::kCols;
  const int64_t chunks = m.cols / kCols;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total_rows * chunks) return;
  const int64_t r = i / chunks, c = i % chunks;
  float w[kCols];
  dequant_chunk<F>(m, r, c, w);
  T* row = out + r * m.cols;
  const int32_t* perm = m.col_perm ? m.col_perm + (r / m.rows) * m.cols : nullptr;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t k = c * kCols + j;
    row[perm ? perm[k] : k] = from_float<T>(w[j]);
  }
}

template <typename Fn>
void dispatch_format(WeightFormat format, Fn&& fn) {
  switch (format) {
    case WeightFormat::kInt8: fn(std::integral_constant<WeightFormat, WeightFormat::kInt8>{}); return;
    case WeightFormat::kInt4: fn(std::integral_constant<WeightFormat, WeightFormat::kInt4>{}); return;
    default: break;
  }
  fail(ErrorKind::kUnsupported, "CUDA quantized linear: ", weight_format_name(format), " is not a quantized format");
}

// The GEMV instance for n_tok tokens: the smallest power-of-two kTok >= n_tok.
template <typename T, typename Out, WeightFormat F>
void launch_gemv(const T* x, const QuantMatrix& m, Out* y, int n_tok, cudaStream_t stream) {
  const unsigned blocks = ceil_div(m.rows, kWarps);
  auto launch = [&](auto tok) {
    quant_gemv_kernel<T, Out, F, decltype(tok)::value><<<blocks, kThreads, 0, stream>>>(x, m, y, n_tok);
  };
  if (n_tok <= 1) launch(std::integral_constant<int, 1>{});
  else if (n_tok <= 2) launch(std::integral_constant<int, 2>{});
  else if (n_tok <= 4) launch(std::integral_constant<int, 4>{});
  else if (n_tok <= 8) launch(std::integral_constant<int, 8>{});
  else launch(std::integral_constant<int, 16>{});
  MC_CUDA_CHECK_LAUNCH();
}

void check_widths(const WeightRef& w, const char* op) {
  if (!is_quantized(w.format))
    fail(ErrorKind::kInvalidRequest, "CUDA ", op, ": ", weight_format_name(w.format), " is not a quantized format");
  const int64_t chunk_cols = w.format == WeightFormat::kInt8 ? 16 : 32;
  if (w.cols % chunk_cols != 0 || (w.format == WeightFormat::kInt4 && (w.group_size <= 0 || w.group_size % 32 != 0)))
    fail(ErrorKind::kUnsupported, "CUDA ", op, ": ", weight_format_name(w.format), " needs cols a multiple of ",
         chunk_cols, " (and int4 groups of a multiple of 32), got cols ", w.cols, ", group_size ", w.group_size);
}

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

size_t quant_linear_workspace_bytes(const WeightRef& w, int64_t max_tokens, DType act_dtype) {
  const size_t elem = dtype_size(act_dtype);
  size_t bytes = 0;
  if (max_tokens > kQuantGemvMaxTokens) bytes = static_cast<size_t>(w.rows * w.cols) * elem;
  if (w.col_perm != nullptr) bytes = std::max(bytes, static_cast<size_t>(kQuantGemvMaxTokens * w.cols) * elem);
  return aligned(bytes);
}

void dequantize_weights(const WeightRef& w, void* out, DType dtype, cudaStream_t stream) {
  check_widths(w, "dequantize");
  const QuantMatrix m = quant_matrix(w);
  const int64_t total_rows = w.count * w.rows;
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(w.format, [&](auto format) {
      constexpr WeightFormat F = decltype(format)::value;
      const int64_t chunks = total_rows * (w.cols / Chunk<F>::kCols);
      dequantize_kernel<T, F><<<ceil_div(chunks, kFlatThreads), kFlatThreads, 0, stream>>>(m, total_rows,
                                                                                           static_cast<T*>(out));
      MC_CUDA_CHECK_LAUNCH();
    });
  });
}

void quant_linear(const QuantLinearParams& p, void* workspace, Gemm& gemm, cudaStream_t stream) {
  check_widths(p.w, "linear");
  if (p.n_tokens == 0 || p.w.rows == 0) return;
  if (p.n_tokens > kQuantGemvMaxTokens) {
    dequantize_weights(p.w, workspace, p.act_dtype, stream);
    gemm.linear(p.x, workspace, p.y, p.n_tokens, p.w.rows, p.w.cols, p.act_dtype, p.out_dtype, stream);
    return;
  }
  const QuantMatrix m = quant_matrix(p.w);
  const int n_tok = static_cast<int>(p.n_tokens);
  dispatch_half(p.act_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p.x);
    if (m.col_perm != nullptr) {
      const int64_t n = p.n_tokens * m.cols;
      permute_columns_kernel<T><<<ceil_div(n, kFlatThreads), kFlatThreads, 0, stream>>>(x, m.col_perm,
                                                                                       static_cast<T*>(workspace), n,
                                                                                       m.cols);
      MC_CUDA_CHECK_LAUNCH();
      x = static_cast<const T*>(workspace);
    }
    QuantMatrix gemv = m;
    gemv.col_perm = nullptr;  // x is already in stored order
    dispatch_format(p.w.format, [&](auto format) {
      constexpr WeightFormat F = decltype(format)::value;
      if (p.out_dtype == DType::kF32) {
        launch_gemv<T, float, F>(x, gemv, static_cast<float*>(p.y), n_tok, stream);
      } else if (p.out_dtype == p.act_dtype) {
        launch_gemv<T, T, F>(x, gemv, static_cast<T*>(p.y), n_tok, stream);
      } else {
        fail(ErrorKind::kInvalidRequest, "CUDA quantized linear: output must be float32 or the activation dtype");
      }
    });
  });
}

// ---- MoE experts ----

namespace {

// Gate/up of expert blockIdx.y for its pairs, kQuantMoeTokenChunk at a time: act[i, f] =
// silu(w1_e[f] · x_t) * (w3_e[f] · x_t), i = the pair's place in sorted order, t = its token.
template <typename T, WeightFormat F>
__global__ void __launch_bounds__(kThreads) quant_moe_gate_up_kernel(const T* __restrict__ x, QuantMatrix w13,
                                                                      const int32_t* __restrict__ offsets,
                                                                      const int32_t* __restrict__ pairs, int top_k,
                                                                      T* __restrict__ act) {
  constexpr int kTok = kQuantMoeTokenChunk;
  const int e = blockIdx.y;
  const int32_t begin = offsets[e], end = offsets[e + 1];
  const int64_t F2 = w13.rows, Fh = F2 / 2, D = w13.cols;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (begin == end || f >= Fh) return;
  for (int32_t chunk = begin; chunk < end; chunk += kTok) {
    const int n_tok = min(kTok, end - chunk);
    const T* x_rows[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) x_rows[j] = x + static_cast<int64_t>(pairs[chunk + (j < n_tok ? j : 0)] / top_k) * D;
    float gate[kTok], up[kTok];
    warp_dot<T, F, kTok>(w13, e * F2 + f, x_rows, n_tok, gate);
    warp_dot<T, F, kTok>(w13, e * F2 + Fh + f, x_rows, n_tok, up);
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int j = 0; j < kTok; ++j)
        if (j < n_tok)
          act[static_cast<int64_t>(chunk + j) * Fh + f] = from_float<T>(gate[j] / (1.0f + expf(-gate[j])) * up[j]);
    }
  }
}

// Down of expert blockIdx.y: residual[t, d] += weight(pair) · (w2_e[d] · act[i]).
template <typename T, WeightFormat F>
__global__ void __launch_bounds__(kThreads) quant_moe_down_kernel(const T* __restrict__ act, QuantMatrix w2,
                                                                   const int32_t* __restrict__ offsets,
                                                                   const int32_t* __restrict__ pairs,
                                                                   const float* __restrict__ weights, int top_k,
                                                                   float* __restrict__ residual) {
  constexpr int kTok = kQuantMoeTokenChunk;
  const int e = blockIdx.y;
  const int32_t begin = offsets[e], end = offsets[e + 1];
  const int64_t D = w2.rows, Fh = w2.cols;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (begin == end || d >= D) return;
  for (int32_t chunk = begin; chunk < end; chunk += kTok) {
    const int n_tok = min(kTok, end - chunk);
    const T* x_rows[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) x_rows[j] = act + static_cast<int64_t>(chunk + (j < n_tok ? j : 0)) * Fh;
    float out[kTok];
    warp_dot<T, F, kTok>(w2, e * D + d, x_rows, n_tok, out);
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int j = 0; j < kTok; ++j)
        if (j < n_tok) {
          const int32_t pair = pairs[chunk + j];
          atomicAdd(residual + static_cast<int64_t>(pair / top_k) * D + d, weights[pair] * out[j]);
        }
    }
  }
}

}  // namespace

size_t quant_moe_workspace_bytes(const QuantMoeParams& p) {
  return aligned(static_cast<size_t>(p.n_tokens) * p.top_k * p.w2.cols * dtype_size(p.act_dtype));
}

void quant_moe_experts(const QuantMoeParams& p, void* workspace, cudaStream_t stream) {
  check_widths(p.w13, "moe w13");
  check_widths(p.w2, "moe w2");
  if (p.w13.format != p.w2.format)
    fail(ErrorKind::kInvalidRequest, "CUDA quantized moe: w13 and w2 must share one format");
  if (p.n_tokens == 0) return;
  const QuantMatrix w13 = quant_matrix(p.w13), w2 = quant_matrix(p.w2);
  const auto E = static_cast<unsigned>(p.w13.count);
  dispatch_half(p.act_dtype, [&](auto tag) {
    using T = decltype(tag);
    T* act = static_cast<T*>(workspace);
    dispatch_format(p.w13.format, [&](auto format) {
      constexpr WeightFormat F = decltype(format)::value;
      quant_moe_gate_up_kernel<T, F><<<dim3(ceil_div(w13.rows / 2, kWarps), E), kThreads, 0, stream>>>(
          static_cast<const T*>(p.x), w13, p.expert_offsets, p.sorted_pairs, p.top_k, act);
      MC_CUDA_CHECK_LAUNCH();
      quant_moe_down_kernel<T, F><<<dim3(ceil_div(w2.rows, kWarps), E), kThreads, 0, stream>>>(
          act, w2, p.expert_offsets, p.sorted_pairs, p.weights, p.top_k, p.residual);
      MC_CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace mc::cuda
