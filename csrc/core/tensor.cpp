#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

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
  size_t bytes = tensor.nbytes();
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
