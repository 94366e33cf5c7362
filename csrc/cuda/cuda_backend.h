// The CUDA backend's entry points, in plain C++ (no CUDA headers), for the runtime. A build
// without CUDA links runtime/no_cuda.cpp instead, whose functions report no device.
#pragma once

#include <memory>

#include "core/backend.h"

namespace mc::cuda {

bool compiled();
// Visible CUDA devices. Never fails: a machine without a driver or a GPU reports 0.
int device_count();
// The backend on the current device: its own stream, cuBLAS handle (throws mc::Error naming
// what is missing when cuBLAS cannot be loaded).
std::unique_ptr<Backend> make_backend();

}  // namespace mc::cuda
