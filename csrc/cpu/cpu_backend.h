// The CPU backend: the reference implementation of every op. Activations and the KV cache are
// float32; weights stay in their stored format (float32, bfloat16 or float16) and are widened
// in registers, so a bf16 checkpoint takes its own size in memory, not twice that.
#pragma once

#include <memory>

#include "core/backend.h"

namespace mc::cpu {

std::unique_ptr<Backend> make_backend();

}  // namespace mc::cpu
