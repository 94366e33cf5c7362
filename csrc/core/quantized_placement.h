// Quantized layer matrices moved to a backend's memory (for Backend::place_weights of a device
// backend; the CPU keeps its host copies). The WeightRefs the forward pass builds then point
// into device memory, with the same layout.
#pragma once

#include "core/backend.h"
#include "core/checkpoint.h"
#include "core/quantized.h"

namespace mc {

// A device copy of `host` (asynchronous: keep `host` alive until backend.synchronize()).
inline QuantizedMatrix to_backend(Backend& backend, const QuantizedMatrix& host) {
  if (!host.defined()) return host;
  QuantizedMatrix device = host;
  auto copy = [&](const std::shared_ptr<void>& from, size_t bytes) -> std::shared_ptr<void> {
    if (!from) return nullptr;
    std::shared_ptr<void> to = backend.allocate(bytes);
    backend.copy_to_device(to.get(), from.get(), bytes);
    return to;
  };
  device.data = copy(host.data, host.data_bytes());
  device.scales = copy(host.scales, host.scales_bytes());
  device.zeros = copy(host.zeros, host.zeros_bytes());
  device.col_perm = copy(host.col_perm, host.col_perm_bytes());
  return device;
}

// Every quantized layer matrix of `weights` moved to the backend, one layer at a time.
inline void place_quantized_layers(Backend& backend, ModelWeights& weights) {
  for (LayerWeights& layer : weights.layers) {
    LayerWeights host = layer;
    for (auto [from, to] : {std::pair{&host.wqkv_q, &layer.wqkv_q}, std::pair{&host.wo_q, &layer.wo_q},
                            std::pair{&host.w13_q, &layer.w13_q}, std::pair{&host.w2_q, &layer.w2_q}})
      *to = to_backend(backend, *from);
    backend.synchronize();  // before the host copies go
  }
}

}  // namespace mc
