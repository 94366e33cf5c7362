// Loading a model directory in either layout:
//   Hugging Face: config.json + model.safetensors, or model-0000X-of-0000N.safetensors with
//                 model.safetensors.index.json; q/k rows permuted for half-rotation RoPE.
//   Mistral:      params.json + consolidated.safetensors; q/k rows in interleaved-pair order.
// Weights come out in one canonical form (HF's half-rotation q/k order), so the backends keep
// a single RoPE implementation.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/quantized.h"
#include "core/tensor.h"

namespace mc {

// Weights in the layout the runtime computes with: the q/k/v projections stacked into one
// matrix and the gate/up projections into another (one GEMM each), MoE experts stacked.
struct LayerWeights {
  Tensor attn_norm;  // [dim]
  Tensor wqkv;       // [q_dim + 2 kv_dim, dim]: rows of wq, then wk, then wv
  Tensor wo;         // [dim, q_dim]
  Tensor ffn_norm;   // [dim]
  Tensor w13;        // dense: [2 hidden_dim, dim] (w1 rows, then w3); MoE: [n_experts, 2 hidden_dim, dim]
  Tensor w2;         // dense: [dim, hidden_dim]; MoE: [n_experts, dim, hidden_dim]
  Tensor router;     // MoE: [n_experts, dim]
  // The same four matrices when the model is quantized (the Tensors above are then empty).
  QuantizedMatrix wqkv_q, wo_q, w13_q, w2_q;

  WeightRef wqkv_ref() const { return wqkv_q.defined() ? wqkv_q.ref() : WeightRef::of(wqkv); }
  WeightRef wo_ref() const { return wo_q.defined() ? wo_q.ref() : WeightRef::of(wo); }
  WeightRef w13_ref() const { return w13_q.defined() ? w13_q.ref() : WeightRef::of(w13); }
  WeightRef w2_ref() const { return w2_q.defined() ? w2_q.ref() : WeightRef::of(w2); }
};

struct ModelWeights {
  Tensor tok_embeddings;  // [vocab_size, dim]
  Tensor norm;            // [dim]
  Tensor output;          // [vocab_size, dim] (the embedding itself when tied)
  std::vector<LayerWeights> layers;
  // How the layer matrices are stored: "" (float), "int8", "int4", or the checkpoint's packed
  // format "awq" / "gptq" (held as int4).
  std::string quantization;

  // The dtype of the float matrices (the layer matrices', else the embedding's).
  DType float_dtype() const {
    return layers.empty() || !layers[0].wqkv.defined() ? tok_embeddings.dtype : layers[0].wqkv.dtype;
  }
};

enum class CheckpointLayout { kHuggingFace, kMistral };

// Called after each tensor with bytes done and bytes in all.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

struct Checkpoint {
  CheckpointLayout layout = CheckpointLayout::kHuggingFace;
  ModelConfig config;
  ModelWeights weights;
};

// Reads only the config of a model directory.
ModelConfig read_model_config(const std::string& model_dir);

struct LoadOptions {
  std::optional<DType> dtype;  // float matrices converted to it; nullopt = kept as stored
  // Quantize-on-load of the layer matrices: kInt8 or kInt4 (nullopt: as stored). A checkpoint
  // already in AWQ or GPTQ form is read as int4 whatever this says (quantizing it is refused).
  std::optional<WeightFormat> quantize;
  int32_t group_size = kDefaultInt4GroupSize;
  bool quantize_activations = false;  // the CPU fast mode of the quantized matrices (WeightRef)
  // Whole tensors in their final form are views of the memory-mapped file (which must then not
  // be modified or truncated while they live: SIGBUS or changed weights); false copies every
  // tensor with pread (the file may change freely once the load returns).
  bool use_mmap = true;
  ProgressFn progress;         // bytes of tensors loaded so far / in all
};

// Loads config and weights. Tensors in their final form are memory-mapped views of the file
// (with use_mmap), the stacked ones (wqkv, w13, experts) are read into owned memory.
Checkpoint load_checkpoint(const std::string& model_dir, const LoadOptions& options);

// Quantizes every layer matrix (wqkv, wo, w13, w2) into its *_q form, dropping the float one.
void quantize_layers(ModelWeights& weights, WeightFormat format, int32_t group_size);
// Turns the CPU fast mode (WeightRef::quantize_activations) of every quantized layer matrix on
// or off; throws kInvalidRequest when turning it on for float weights.
void set_quantize_activations(ModelWeights& weights, bool on);

// Every checkpoint tensor of a model: Hugging Face name, shape, and where it goes: `target`
// (a tensor of `target_shape`) from element `offset` on. Stacked tensors have several slots.
struct WeightSlot {
  std::string name;
  std::vector<int64_t> shape;
  Tensor* target;
  std::vector<int64_t> target_shape;
  int64_t offset = 0;
  bool whole() const { return offset == 0 && shape == target_shape; }
};
std::vector<WeightSlot> weight_slots(const ModelConfig& config, ModelWeights& weights);

// Allocates every tensor of `weights` the slots name (shapes from the config), zero-filled.
void allocate_weights(const std::vector<WeightSlot>& slots, DType dtype);

// A random model in host memory as `dtype` (see core/random.h: the GPU draws the same numbers).
// `progress` is called after each tensor, in bytes.
ModelWeights random_weights(const ModelConfig& config, uint64_t seed, DType dtype, const ProgressFn& progress = {});

}  // namespace mc
