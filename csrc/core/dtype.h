// Element types of tensors and the scalar conversions between them.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "core/hd.h"

namespace mc {

enum class DType { kF32, kBF16, kF16 };

inline size_t dtype_size(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kBF16: return "bfloat16";
    case DType::kF16: return "float16";
  }
  return "?";
}

// Accepts "float32"/"f32", "bfloat16"/"bf16", "float16"/"f16"/"half"; throws kInvalidRequest.
DType parse_dtype(const std::string& name);

MC_HD inline float bf16_to_f32(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  memcpy(&value, &wide, 4);
  return value;
}

// Round to nearest even, NaN kept quiet (the rounding add must not turn a NaN into Inf).
MC_HD inline uint16_t f32_to_bf16(float value) {
  uint32_t bits;
  memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// IEEE binary16 -> binary32, exact for normals, subnormals, Inf and NaN.
MC_HD inline float f16_to_f32(uint16_t half) {
  uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal: shift the mantissa up until its leading one becomes the implicit bit.
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float value;
  memcpy(&value, &bits, 4);
  return value;
}

// Round to nearest even, like torch's float -> half conversion (overflow to Inf, NaN kept).
MC_HD inline uint16_t f32_to_f16(float value) {
  uint32_t bits;
  memcpy(&bits, &value, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u); // rounds to >= 65520: Inf
  if (abs < 0x38800000u) {
    // Subnormal half (or zero): value / 2^-24 rounded to nearest even, done in float arithmetic.
    float magnitude;
    memcpy(&magnitude, &abs, 4);
    const float scaled = magnitude * 16777216.0f;  // exact: a power of two
    uint32_t q = static_cast<uint32_t>(scaled);
    const float rest = scaled - static_cast<float>(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

// Element i of an array of `dtype`, as float32; and the reverse (rounded to nearest even).
inline float load_float(const void* src, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(src)[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
  }
  return 0.0f;
}
inline void store_float(void* dst, DType dtype, size_t i, float value) {
  switch (dtype) {
    case DType::kF32: static_cast<float*>(dst)[i] = value; return;
    case DType::kBF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(value); return;
    case DType::kF16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(value); return;
  }
}

// Converts `count` elements of `from` at `src` to `to` at `dst` (any of the float dtypes).
void convert(const void* src, DType from, void* dst, DType to, size_t count);

}  // namespace mc
