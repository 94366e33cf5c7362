// Quantized weight matrices: owned storage of the int8 and int4 formats (core/weight.h names
// their layouts) and the quantize-on-load rules. Layer matrices (wqkv, wo, w13, w2, MoE experts)
// are quantized after they are stacked; embeddings, norms, the LM head and the router stay float.
//
// int8 (per output row, symmetric):  s = max|w[r, :]| / 127,  q = clamp(round(w / s), -127, 127)
// int4 (per group of G columns, asymmetric, the range widened to include 0):
//   lo = min(0, min w[r, g]), hi = max(0, max w[r, g]),  s = (hi - lo) / 15 (1 when 0),
//   z = clamp(round(-lo / s), 0, 15),  q = clamp(round(w / s) + z, 0, 15)
// all in float32, round = to nearest even; dequantized w = (q - z) · s.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/tensor.h"
#include "core/weight.h"

namespace mc {

constexpr int32_t kDefaultInt4GroupSize = 128;

struct QuantizedMatrix {
  WeightFormat format = WeightFormat::kF32;  // kInt8 or kInt4 once defined
  int64_t count = 1, rows = 0, cols = 0;
  int32_t group_size = 0;
  std::shared_ptr<void> data, scales, zeros, col_perm;  // see WeightRef; col_perm may stay null
  bool quantize_activations = false;                    // see WeightRef

  // Zero-filled storage for `format` (col_perm only with `with_col_perm`).
  static QuantizedMatrix allocate(WeightFormat format, int64_t count, int64_t rows, int64_t cols, int32_t group_size,
                                  bool with_col_perm);
  bool defined() const { return data != nullptr; }
  WeightRef ref() const;

  size_t data_bytes() const { return static_cast<size_t>(count * rows * ref().row_bytes()); }
  size_t scales_bytes() const { return static_cast<size_t>(count * rows * ref().groups()) * sizeof(float); }
  size_t zeros_bytes() const { return format == WeightFormat::kInt4 ? scales_bytes() : 0; }
  size_t col_perm_bytes() const { return col_perm ? static_cast<size_t>(count * cols) * sizeof(int32_t) : 0; }
  size_t nbytes() const { return data_bytes() + scales_bytes() + zeros_bytes() + col_perm_bytes(); }
};

// Writes column k's 4-bit value into an int4 row (k < cols, cols a multiple of 32).
inline void set_int4(uint8_t* row, int64_t k, uint8_t q) {
  uint8_t& byte = row[(k / 32) * 16 + k % 16];
  byte = (k % 32) < 16 ? static_cast<uint8_t>((byte & 0xF0) | q) : static_cast<uint8_t>((byte & 0x0F) | (q << 4));
}
inline uint8_t get_int4(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[(k / 32) * 16 + k % 16];
  return (k % 32) < 16 ? byte & 0x0F : byte >> 4;
}

// A float matrix [rows, cols] or stack [count, rows, cols] in `format` (kInt8, or kInt4 with
// `group_size`); throws kUnsupported when cols does not fit the format.
QuantizedMatrix quantize(const Tensor& matrix, WeightFormat format, int32_t group_size);

// "int8" | "int4" -> the format; throws kInvalidRequest naming anything else.
WeightFormat parse_quantization(const std::string& name);

}  // namespace mc
