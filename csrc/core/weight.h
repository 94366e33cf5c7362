// A reference to one weight matrix (or a stack of them, for MoE experts) in the format it is
// stored in. Backends dispatch on `format` inside their one `linear` op, so a new storage format
// (int8 per channel, int4 per group: the scale/zero/group fields) is one more case there, not a
// second forward pass.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/tensor.h"

namespace mc {

enum class WeightFormat {
  kF32,
  kBF16,
  kF16,
  // int8 per output row, symmetric: data int8 [count, rows, cols], scales f32 [count, rows];
  // w[r, k] = q[r, k] * s[r].
  kInt8,
  // int4 in groups of `group_size` along cols, with zero points: data [count, rows, cols / 2]
  // bytes, each run of 32 columns in 16 bytes, byte i = q[i] | q[i + 16] << 4 (llama.cpp's Q4
  // nibble order: one 16-byte load unpacks to 32 consecutive columns); scales and zeros f32
  // [count, rows, cols / group_size]; w[r, k] = (q[r, k] - z[r, g]) * s[r, g], g = k / group_size.
  kInt4,
};

inline WeightFormat weight_format_of(DType dtype) {
  switch (dtype) {
    case DType::kF32: return WeightFormat::kF32;
    case DType::kBF16: return WeightFormat::kBF16;
    case DType::kF16: return WeightFormat::kF16;
  }
  return WeightFormat::kF32;
}

inline bool is_quantized(WeightFormat format) { return format == WeightFormat::kInt8 || format == WeightFormat::kInt4; }

// The element type of a float format (float32 for the quantized ones, which dequantize to it).
inline DType dtype_of(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32: return DType::kF32;
    case WeightFormat::kBF16: return DType::kBF16;
    case WeightFormat::kF16: return DType::kF16;
    case WeightFormat::kInt8:
    case WeightFormat::kInt4: return DType::kF32;
  }
  return DType::kF32;
}

inline const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32: return "float32";
    case WeightFormat::kBF16: return "bfloat16";
    case WeightFormat::kF16: return "float16";
    case WeightFormat::kInt8: return "int8";
    case WeightFormat::kInt4: return "int4";
  }
  return "?";
}

struct WeightRef {
  WeightFormat format = WeightFormat::kF32;
  const void* data = nullptr;  // [count, rows, cols] elements of `format`, row-major (int4: packed)
  int64_t count = 1;           // stacked matrices (the experts of a MoE layer), else 1
  int64_t rows = 0;            // N: outputs of y = x · wᵀ
  int64_t cols = 0;            // K: inputs
  // Quantized formats only (unused by the float formats): per-row or per-group scales and zero
  // points, and the group length along `cols`.
  const void* scales = nullptr;  // f32: int8 [count, rows]; int4 [count, rows, groups()]
  const void* zeros = nullptr;   // f32, int4 only: [count, rows, groups()]
  int32_t group_size = 0;        // int4: columns per group (divides cols, a multiple of 32)
  // int4 only, or null: [count, cols] input column of each stored column (GPTQ act-order
  // regrouped at load), so y[r] = Σ_k w[r, k] · x[col_perm[k]].
  const int32_t* col_perm = nullptr;
  // Quantized formats, CPU: the opt-in fast mode that quantizes activations to int8 per row and
  // uses integer dot products (cpu/quantized_activations.h); false = exact dequantization.
  bool quantize_activations = false;

  // A float matrix [rows, cols] or a stack [count, rows, cols] held by `tensor`.
  static WeightRef of(const Tensor& tensor) {
    WeightRef ref;
    ref.format = weight_format_of(tensor.dtype);
    ref.data = tensor.data;
    if (tensor.shape.size() == 3) {
      ref.count = tensor.shape[0];
      ref.rows = tensor.shape[1];
      ref.cols = tensor.shape[2];
    } else if (tensor.shape.size() == 2) {
      ref.rows = tensor.shape[0];
      ref.cols = tensor.shape[1];
    } else {
      ref.rows = 1;
      ref.cols = tensor.shape.empty() ? 0 : tensor.shape[0];
    }
    return ref;
  }
  // Matrix `index` of a stack, as a reference of its own.
  WeightRef matrix(int64_t index) const {
    WeightRef ref = *this;
    ref.count = 1;
    ref.data = static_cast<const uint8_t*>(data) + index * rows * row_bytes();
    if (format == WeightFormat::kInt8) ref.scales = static_cast<const float*>(scales) + index * rows;
    if (format == WeightFormat::kInt4) {
      ref.scales = static_cast<const float*>(scales) + index * rows * groups();
      ref.zeros = static_cast<const float*>(zeros) + index * rows * groups();
      if (col_perm != nullptr) ref.col_perm = col_perm + index * cols;
    }
    return ref;
  }
  // Bytes of one float element (float formats only).
  size_t element_bytes() const { return format == WeightFormat::kF32 ? 4 : 2; }
  // Bytes of one stored row of any format.
  int64_t row_bytes() const {
    switch (format) {
      case WeightFormat::kInt8: return cols;
      case WeightFormat::kInt4: return cols / 2;
      default: return cols * static_cast<int64_t>(element_bytes());
    }
  }
  int64_t groups() const { return format == WeightFormat::kInt4 && group_size > 0 ? cols / group_size : 1; }
};

}  // namespace mc
