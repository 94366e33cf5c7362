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
};

inline WeightFormat weight_format_of(DType dtype) {
  switch (dtype) {
    case DType::kF32: return WeightFormat::kF32;
    case DType::kBF16: return WeightFormat::kBF16;
    case DType::kF16: return WeightFormat::kF16;
  }
  return WeightFormat::kF32;
}

// The element type of a float format.
inline DType dtype_of(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32: return DType::kF32;
    case WeightFormat::kBF16: return DType::kBF16;
    case WeightFormat::kF16: return DType::kF16;
  }
  return DType::kF32;
}

inline const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32: return "float32";
    case WeightFormat::kBF16: return "bfloat16";
    case WeightFormat::kF16: return "float16";
  }
  return "?";
}

struct WeightRef {
  WeightFormat format = WeightFormat::kF32;
  const void* data = nullptr;  // [count, rows, cols] elements of `format`, row-major
  int64_t count = 1;           // stacked matrices (the experts of a MoE layer), else 1
  int64_t rows = 0;            // N: outputs of y = x · wᵀ
  int64_t cols = 0;            // K: inputs
  // Quantized formats only (unused by the float formats): per-row or per-group scales and zero
  // points, and the group length along `cols`.
  const void* scales = nullptr;
  const void* zeros = nullptr;
  int32_t group_size = 0;

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
    ref.data = static_cast<const uint8_t*>(data) + index * rows * cols * element_bytes();
    return ref;
  }
  size_t element_bytes() const { return format == WeightFormat::kF32 ? 4 : 2; }
};

}  // namespace mc
