// A tensor is a typed, shaped view of memory. The memory is either the caller's (Tensor::view:
// nothing is copied or freed) or owned through `storage` (Tensor::empty, or a view that keeps a
// memory-mapped file alive).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace mc {

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::shared_ptr<void> storage;  // keeps `data` alive when the tensor owns it

  // Zero-filled host memory.
  static Tensor empty(DType dtype, std::vector<int64_t> shape);
  // Caller-owned memory: the tensor never frees it.
  static Tensor view(void* data, DType dtype, std::vector<int64_t> shape);

  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  bool defined() const { return data != nullptr; }

  // Typed access; throws when the tensor does not hold float32.
  float* f32() const;

  std::string shape_str() const;
};

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace mc
