#include "core/quantized.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "core/error.h"

namespace mc {
namespace {

std::shared_ptr<void> zeroed(size_t bytes) {
  void* memory = std::calloc(bytes == 0 ? 1 : bytes, 1);
  if (memory == nullptr) fail(ErrorKind::kOutOfMemory, "out of host memory allocating ", bytes, " bytes");
  return std::shared_ptr<void>(memory, std::free);
}

// Round to nearest, ties to even (the current FP rounding mode; torch.round agrees).
float round_even(float value) { return std::nearbyint(value); }

void quantize_int8_row(const float* w, int64_t cols, int8_t* q, float* scale) {
  float amax = 0.0f;
  for (int64_t k = 0; k < cols; ++k) amax = std::max(amax, std::fabs(w[k]));
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  for (int64_t k = 0; k < cols; ++k) q[k] = static_cast<int8_t>(std::clamp(round_even(w[k] / s), -127.0f, 127.0f));
  *scale = s;
}

void quantize_int4_row(const float* w, int64_t cols, int32_t group_size, uint8_t* q, float* scales, float* zeros) {
  for (int64_t g = 0; g < cols / group_size; ++g) {
    const float* x = w + g * group_size;
    float lo = 0.0f, hi = 0.0f;
    for (int32_t k = 0; k < group_size; ++k) {
      lo = std::min(lo, x[k]);
      hi = std::max(hi, x[k]);
    }
    float s = (hi - lo) / 15.0f;
    if (s == 0.0f) s = 1.0f;
    const float z = std::clamp(round_even(-lo / s), 0.0f, 15.0f);
    for (int32_t k = 0; k < group_size; ++k)
      set_int4(q, g * group_size + k, static_cast<uint8_t>(std::clamp(round_even(x[k] / s) + z, 0.0f, 15.0f)));
    scales[g] = s;
    zeros[g] = z;
  }
}

}  // namespace

QuantizedMatrix QuantizedMatrix::allocate(WeightFormat format, int64_t count, int64_t rows, int64_t cols,
                                          int32_t group_size, bool with_col_perm) {
  QuantizedMatrix m;
  m.format = format;
  m.count = count;
  m.rows = rows;
  m.cols = cols;
  m.group_size = format == WeightFormat::kInt4 ? group_size : 0;
  m.data = zeroed(m.data_bytes());
  m.scales = zeroed(m.scales_bytes());
  if (format == WeightFormat::kInt4) m.zeros = zeroed(m.zeros_bytes());
  if (with_col_perm) m.col_perm = zeroed(static_cast<size_t>(count * cols) * sizeof(int32_t));
  return m;
}

WeightRef QuantizedMatrix::ref() const {
  WeightRef ref;
  ref.format = format;
  ref.data = data.get();
  ref.count = count;
  ref.rows = rows;
  ref.cols = cols;
  ref.scales = scales.get();
  ref.zeros = zeros.get();
  ref.group_size = group_size;
  ref.col_perm = static_cast<const int32_t*>(col_perm.get());
  ref.quantize_activations = quantize_activations;
  return ref;
}

QuantizedMatrix quantize(const Tensor& matrix, WeightFormat format, int32_t group_size) {
  const WeightRef src = WeightRef::of(matrix);
  if (format == WeightFormat::kInt4) {
    if (group_size <= 0 || group_size % 32 != 0)
      fail(ErrorKind::kInvalidRequest, "int4 group size must be a positive multiple of 32, got ", group_size);
    if (src.cols % group_size != 0)
      fail(ErrorKind::kUnsupported, "int4 quantization needs the input width (", src.cols,
           ") to be a multiple of the group size ", group_size);
  } else if (format != WeightFormat::kInt8) {
    fail(ErrorKind::kInvalidRequest, "quantize: ", weight_format_name(format), " is not a quantized format");
  }
  QuantizedMatrix out = QuantizedMatrix::allocate(format, src.count, src.rows, src.cols, group_size, false);
  const WeightRef dst = out.ref();
  const int64_t rows = src.count * src.rows, K = src.cols;
#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      convert(static_cast<const uint8_t*>(matrix.data) + r * K * static_cast<int64_t>(dtype_size(matrix.dtype)),
              matrix.dtype, row.data(), DType::kF32, static_cast<size_t>(K));
      auto* q = static_cast<uint8_t*>(out.data.get()) + r * dst.row_bytes();
      auto* scales = static_cast<float*>(out.scales.get()) + r * dst.groups();
      if (format == WeightFormat::kInt8) {
        quantize_int8_row(row.data(), K, reinterpret_cast<int8_t*>(q), scales);
      } else {
        quantize_int4_row(row.data(), K, group_size, q, scales, static_cast<float*>(out.zeros.get()) + r * dst.groups());
      }
    }
  }
  return out;
}

WeightFormat parse_quantization(const std::string& name) {
  if (name == "int8") return WeightFormat::kInt8;
  if (name == "int4") return WeightFormat::kInt4;
  fail(ErrorKind::kInvalidRequest, "unknown quantization '", name, "' (expected None, 'int8' or 'int4')");
}

}  // namespace mc
