#include "core/dtype.h"

#include "core/error.h"

namespace mc {

DType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "f32" || name == "float") return DType::kF32;
  if (name == "bfloat16" || name == "bf16") return DType::kBF16;
  if (name == "float16" || name == "f16" || name == "half") return DType::kF16;
  fail(ErrorKind::kInvalidRequest, "unknown dtype '", name, "' (expected float32, bfloat16 or float16)");
}

void convert_to_f32(const void* src, DType dtype, size_t count, float* dst) {
  switch (dtype) {
    case DType::kF32:
      memcpy(dst, src, count * 4);
      return;
    case DType::kBF16: {
      auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(in[i]);
      return;
    }
    case DType::kF16: {
      auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = f16_to_f32(in[i]);
      return;
    }
  }
}

}  // namespace mc
