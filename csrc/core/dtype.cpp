#include "core/dtype.h"

#include "core/error.h"

namespace mc {

DType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "f32" || name == "float") return DType::kF32;
  if (name == "bfloat16" || name == "bf16") return DType::kBF16;
  if (name == "float16" || name == "f16" || name == "half") return DType::kF16;
  fail(ErrorKind::kInvalidRequest, "unknown dtype '", name, "' (expected float32, bfloat16 or float16)");
}

void convert(const void* src, DType from, void* dst, DType to, size_t count) {
  if (from == to) {
    memcpy(dst, src, count * dtype_size(from));
    return;
  }
#pragma omp parallel for schedule(static) if (count > (size_t{1} << 20))
  for (size_t i = 0; i < count; ++i) {
    store_float(dst, to, i, load_float(src, from, i));
  }
}

}  // namespace mc
