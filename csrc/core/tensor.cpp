#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "core/checked_math.h"
#include "core/error.h"

namespace mc {

int64_t Tensor::numel() const {
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  return count;
}

Tensor Tensor::empty(DType dtype, std::vector<int64_t> shape) {
  Tensor tensor;
  tensor.dtype = dtype;
  tensor.shape = std::move(shape);
  const std::optional<int64_t> bytes_signed =
      checked_product({checked_product(tensor.shape).value_or(-1), static_cast<int64_t>(dtype_size(dtype))});
  if (!bytes_signed)
    fail(ErrorKind::kOutOfMemory, "cannot allocate a tensor of shape ", tensor.shape_str(),
         ": its size overflows (negative or absurdly large extents)");
  const auto bytes = static_cast<size_t>(*bytes_signed);
  // calloc takes large blocks straight from fresh zeroed pages, so untouched memory (most of a
  // big KV pool) costs nothing until it is written.
  void* memory = std::calloc(bytes == 0 ? 1 : bytes, 1);
  if (memory == nullptr) fail(ErrorKind::kOutOfMemory, "out of host memory allocating ", bytes, " bytes");
  tensor.data = memory;
  tensor.storage = std::shared_ptr<void>(memory, std::free);
  return tensor;
}

Tensor Tensor::view(void* data, DType dtype, std::vector<int64_t> shape) {
  Tensor tensor;
  tensor.data = data;
  tensor.dtype = dtype;
  tensor.shape = std::move(shape);
  return tensor;
}

float* Tensor::f32() const {
  if (dtype != DType::kF32) fail(ErrorKind::kInvalidRequest, "expected a float32 tensor, got ", dtype_name(dtype));
  return static_cast<float*>(data);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

std::string Tensor::shape_str() const { return mc::shape_str(shape); }

}  // namespace mc
