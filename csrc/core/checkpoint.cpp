#include "core/checkpoint.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "core/checked_math.h"
#include "core/error.h"
#include "core/json.h"
#include "core/packed_checkpoint.h"
#include "core/random.h"
#include "core/safetensors.h"

namespace mc {
namespace {

bool is_file(const std::string& path) {
  struct stat info {};
  return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

bool is_dir(const std::string& path) {
  struct stat info {};
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorKind::kCheckpoint, "cannot read ", path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

Json read_json(const std::string& path) {
  try {
    return Json::parse(read_text(path));
  } catch (const Error& e) {
    fail(ErrorKind::kCheckpoint, path, ": ", e.what());
  }
}

void require_dir(const std::string& model_dir) {
  if (!is_dir(model_dir)) fail(ErrorKind::kFileNotFound, "model directory not found: ", model_dir);
}

CheckpointLayout detect_layout(const std::string& model_dir) {
  if (is_file(model_dir + "/config.json")) return CheckpointLayout::kHuggingFace;
  if (is_file(model_dir + "/params.json")) return CheckpointLayout::kMistral;
  fail(ErrorKind::kFileNotFound, model_dir, " holds neither config.json (Hugging Face layout) nor params.json",
       " (Mistral consolidated layout)");
}

ModelConfig read_config(const std::string& model_dir, CheckpointLayout layout) {
  if (layout == CheckpointLayout::kHuggingFace) {
    std::string path = model_dir + "/config.json";
    return ModelConfig::from_hf_json(read_json(path), path);
  }
  std::string path = model_dir + "/params.json";
  return ModelConfig::from_mistral_json(read_json(path), path);
}

// Every tensor name of the checkpoint, mapped to the file holding it.
class TensorIndex {
 public:
  void add_file(const std::string& path) {
    auto file = SafetensorsFile::open(path);
    for (const auto& [name, entry] : file->entries()) {
      auto [it, inserted] = where_.emplace(name, Location{file, &entry});
      if (!inserted) fail(ErrorKind::kCheckpoint, "tensor '", name, "' appears in both ", it->second.file->path(), " and ", path);
    }
    files_.push_back(std::move(file));
  }

  struct Location {
    std::shared_ptr<SafetensorsFile> file;
    const SafetensorsEntry* entry;
  };
  const Location* find(const std::string& name) const {
    auto it = where_.find(name);
    return it == where_.end() ? nullptr : &it->second;
  }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Location> where_;
};

TensorIndex open_hf_files(const std::string& model_dir) {
  TensorIndex index;
  std::string single = model_dir + "/model.safetensors";
  std::string index_path = model_dir + "/model.safetensors.index.json";
  if (is_file(index_path)) {
    Json json = read_json(index_path);
    const Json* weight_map = json.find("weight_map");
    if (!weight_map) fail(ErrorKind::kCheckpoint, index_path, " has no 'weight_map'");
    std::set<std::string> shards;
    for (const auto& [name, file] : weight_map->object(index_path + " weight_map"))
      shards.insert(file.string(index_path + " weight_map entry '" + name + "'"));
    for (const std::string& shard : shards) {
      if (shard.find('/') != std::string::npos) fail(ErrorKind::kCheckpoint, index_path, " names a shard outside the directory: ", shard);
      if (!is_file(model_dir + "/" + shard)) fail(ErrorKind::kFileNotFound, index_path, " names a missing shard: ", shard);
      index.add_file(model_dir + "/" + shard);
    }
  } else if (is_file(single)) {
    index.add_file(single);
  } else {
    fail(ErrorKind::kFileNotFound, model_dir, " has neither model.safetensors nor model.safetensors.index.json");
  }
  return index;
}

TensorIndex open_mistral_files(const std::string& model_dir) {
  std::string path = model_dir + "/consolidated.safetensors";
  if (!is_file(path)) fail(ErrorKind::kFileNotFound, model_dir, " has params.json but no consolidated.safetensors");
  TensorIndex index;
  index.add_file(path);
  return index;
}

// Consolidated q/k rows rotate interleaved pairs (x0,x1),(x2,x3)...; HF order pairs
// (x_i, x_{i+d/2}). Within each head, HF row r takes consolidated row 2r (first half) or
// 2(r - d/2) + 1 (second half). Rows are moved as bytes, whatever the dtype.
// The caller guarantees n_heads * head_dim rows of row_bytes in both buffers (see load_tensor).
void permute_rows_to_half_rotation(const uint8_t* src, uint8_t* dst, int64_t n_heads, int64_t head_dim,
                                   size_t row_bytes) {
  int64_t half = head_dim / 2;
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t r = 0; r < head_dim; ++r) {
      int64_t from = r < half ? 2 * r : 2 * (r - half) + 1;
      std::copy_n(src + (h * head_dim + from) * row_bytes, row_bytes, dst + (h * head_dim + r) * row_bytes);
    }
}

enum class RowOrder { kAsStored, kInterleavedHeads };

// One checkpoint tensor and where it goes (see WeightSlot), with the row order it is stored in.
struct WeightRequest {
  WeightSlot slot;
  RowOrder rows = RowOrder::kAsStored;
  int64_t rope_heads = 0;  // heads to permute for kInterleavedHeads
};

struct NameScheme {
  std::string embed, norm, output;
  std::string layer_prefix;  // followed by the layer index and '.'
  std::string attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, router, experts;  // experts: followed by E.wN.weight
};

NameScheme scheme_for(CheckpointLayout layout) {
  if (layout == CheckpointLayout::kHuggingFace)
    return {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.",
            "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
            "mlp.gate_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight",
            "block_sparse_moe.gate.weight", "block_sparse_moe.experts."};
  return {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.",
          "attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
          "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
          "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
          "feed_forward.gate.weight", "feed_forward.experts."};
}

std::vector<WeightRequest> plan_weights(const ModelConfig& c, CheckpointLayout layout, ModelWeights& w) {
  NameScheme names = scheme_for(layout);
  RowOrder qk_rows = layout == CheckpointLayout::kMistral ? RowOrder::kInterleavedHeads : RowOrder::kAsStored;
  const int64_t D = c.dim, F = c.hidden_dim, E = c.n_experts;
  const std::vector<int64_t> qkv_shape = {c.q_dim() + 2 * c.kv_dim(), D};
  std::vector<WeightRequest> plan;
  auto whole = [&](std::string name, std::vector<int64_t> shape, Tensor* target) {
    plan.push_back({{std::move(name), shape, target, shape, 0}});
  };
  // A piece of a stacked tensor, starting at element `offset` of it.
  auto piece = [&](std::string name, std::vector<int64_t> shape, Tensor* target, std::vector<int64_t> target_shape,
                   int64_t offset, RowOrder rows = RowOrder::kAsStored, int64_t rope_heads = 0) {
    plan.push_back({{std::move(name), std::move(shape), target, std::move(target_shape), offset}, rows, rope_heads});
  };
  whole(names.embed, {c.vocab_size, D}, &w.tok_embeddings);
  w.layers.resize(c.n_layers);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    LayerWeights& layer = w.layers[i];
    std::string prefix = names.layer_prefix + std::to_string(i) + ".";
    whole(prefix + names.attn_norm, {D}, &layer.attn_norm);
    piece(prefix + names.wq, {c.q_dim(), D}, &layer.wqkv, qkv_shape, 0, qk_rows, c.n_heads);
    piece(prefix + names.wk, {c.kv_dim(), D}, &layer.wqkv, qkv_shape, c.q_dim() * D, qk_rows, c.n_kv_heads);
    piece(prefix + names.wv, {c.kv_dim(), D}, &layer.wqkv, qkv_shape, (c.q_dim() + c.kv_dim()) * D);
    whole(prefix + names.wo, {D, c.q_dim()}, &layer.wo);
    whole(prefix + names.ffn_norm, {D}, &layer.ffn_norm);
    if (!c.is_moe()) {
      piece(prefix + names.w1, {F, D}, &layer.w13, {2 * F, D}, 0);
      whole(prefix + names.w2, {D, F}, &layer.w2);
      piece(prefix + names.w3, {F, D}, &layer.w13, {2 * F, D}, F * D);
      continue;
    }
    whole(prefix + names.router, {E, D}, &layer.router);
    for (int64_t e = 0; e < E; ++e) {
      std::string expert = prefix + names.experts + std::to_string(e) + ".";
      piece(expert + "w1.weight", {F, D}, &layer.w13, {E, 2 * F, D}, e * 2 * F * D);
      piece(expert + "w2.weight", {D, F}, &layer.w2, {E, D, F}, e * D * F);
      piece(expert + "w3.weight", {F, D}, &layer.w13, {E, 2 * F, D}, e * 2 * F * D + F * D);
    }
  }
  whole(names.norm, {D}, &w.norm);
  if (!c.tie_embeddings) whole(names.output, {c.vocab_size, D}, &w.output);
  return plan;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  return count;
}

// Copies one checkpoint tensor into its (allocated) target: read with pread, rows permuted to
// the half-rotation order if stored interleaved, converted to the target's dtype.
void copy_into_target(const TensorIndex::Location& where, const WeightRequest& request) {
  const SafetensorsEntry& entry = *where.entry;
  const DType stored = *entry.dtype;
  Tensor& target = *request.slot.target;
  uint8_t* dst = static_cast<uint8_t*>(target.data) + request.slot.offset * static_cast<int64_t>(dtype_size(target.dtype));
  const int64_t count = numel_of(request.slot.shape);
  if (request.rows == RowOrder::kAsStored && stored == target.dtype) {
    where.file->read_into(entry, dst);
    return;
  }
  std::vector<uint8_t> raw(entry.nbytes);
  where.file->read_into(entry, raw.data());
  if (request.rows == RowOrder::kInterleavedHeads) {
    // Checked by load_checkpoint; restated where memory depends on it.
    const auto& shape = request.slot.shape;
    if (shape.size() != 2 || request.rope_heads <= 0 || shape[0] % request.rope_heads != 0 ||
        (shape[0] / request.rope_heads) % 2 != 0 || entry.shape != shape)
      fail(ErrorKind::kCheckpoint, "tensor '", entry.name, "' of shape ", mc::shape_str(entry.shape),
           " cannot be split into ", request.rope_heads, " heads of even size");
    std::vector<uint8_t> permuted(entry.nbytes);
    const size_t row_bytes = static_cast<size_t>(request.slot.shape[1]) * dtype_size(stored);
    permute_rows_to_half_rotation(raw.data(), permuted.data(), request.rope_heads,
                                  request.slot.shape[0] / request.rope_heads, row_bytes);
    raw.swap(permuted);
  }
  convert(raw.data(), stored, dst, target.dtype, static_cast<size_t>(count));
}

// Bytes of all weights of `config` as `dtype` (bounded configs cannot overflow this).
int64_t weight_bytes(const ModelConfig& c, DType dtype) {
  const int64_t ffn = 3 * c.hidden_dim * c.dim * (c.is_moe() ? c.n_experts : 1) + (c.is_moe() ? c.n_experts * c.dim : 0);
  const int64_t attention = 2 * c.q_dim() * c.dim + 2 * c.kv_dim() * c.dim;
  const int64_t per_layer = attention + ffn + 2 * c.dim;
  return static_cast<int64_t>(dtype_size(dtype)) *
         (c.n_layers * per_layer + (c.tie_embeddings ? 1 : 2) * c.vocab_size * c.dim + c.dim);
}

// The quantized form of each layer matrix a slot can target (wqkv -> wqkv_q, ...), for the
// packed (AWQ/GPTQ) pieces and quantize-on-load.
std::map<const Tensor*, QuantizedMatrix*> quantized_targets(ModelWeights& w) {
  std::map<const Tensor*, QuantizedMatrix*> targets;
  for (LayerWeights& layer : w.layers) {
    targets[&layer.wqkv] = &layer.wqkv_q;
    targets[&layer.wo] = &layer.wo_q;
    targets[&layer.w13] = &layer.w13_q;
    targets[&layer.w2] = &layer.w2_q;
  }
  return targets;
}

RawTensorReader raw_reader(const TensorIndex& index) {
  return [&index](const std::string& name) -> std::optional<RawTensor> {
    const TensorIndex::Location* where = index.find(name);
    if (!where) return std::nullopt;
    RawTensor raw{where->entry->dtype_name, where->entry->shape, std::vector<uint8_t>(where->entry->nbytes)};
    where->file->read_into(*where->entry, raw.bytes.data());
    return raw;
  };
}

// The slot's piece of its stacked target as a packed module: its name without ".weight", and
// its rows' place in the stack ([rows, cols] or [count, rows, cols]).
PackedPiece packed_piece(const WeightSlot& slot, QuantizedMatrix* target) {
  PackedPiece piece;
  piece.module = slot.name.substr(0, slot.name.size() - std::string(".weight").size());
  piece.rows = slot.shape[0];
  piece.cols = slot.shape[1];
  piece.target = target;
  const std::vector<int64_t>& stack = slot.target_shape;
  piece.target_count = stack.size() == 3 ? stack[0] : 1;
  piece.target_rows = stack[stack.size() - 2];
  const int64_t row = slot.offset / piece.cols;
  piece.index = row / piece.target_rows;
  piece.row0 = row % piece.target_rows;
  return piece;
}

// The layer's four matrices quantized, their float forms dropped.
void quantize_layer(LayerWeights& layer, WeightFormat format, int32_t group_size) {
  for (auto [dense, quantized] : {std::pair{&layer.wqkv, &layer.wqkv_q}, std::pair{&layer.wo, &layer.wo_q},
                                  std::pair{&layer.w13, &layer.w13_q}, std::pair{&layer.w2, &layer.w2_q}}) {
    *quantized = quantize(*dense, format, group_size);
    *dense = Tensor();
  }
}

}  // namespace

void quantize_layers(ModelWeights& weights, WeightFormat format, int32_t group_size) {
  for (LayerWeights& layer : weights.layers) quantize_layer(layer, format, group_size);
  weights.quantization = weight_format_name(format);
}

void set_quantize_activations(ModelWeights& weights, bool on) {
  if (on && weights.quantization.empty())
    fail(ErrorKind::kInvalidRequest, "quantize_activations needs quantized weights (quantization='int8' or 'int4', ",
         "or an AWQ / GPTQ checkpoint)");
  for (LayerWeights& layer : weights.layers)
    for (QuantizedMatrix* m : {&layer.wqkv_q, &layer.wo_q, &layer.w13_q, &layer.w2_q}) m->quantize_activations = on;
}

std::vector<WeightSlot> weight_slots(const ModelConfig& config, ModelWeights& weights) {
  std::vector<WeightSlot> slots;
  for (WeightRequest& request : plan_weights(config, CheckpointLayout::kHuggingFace, weights))
    slots.push_back(std::move(request.slot));
  return slots;
}

void allocate_weights(const std::vector<WeightSlot>& slots, DType dtype) {
  for (const WeightSlot& slot : slots)
    if (!slot.target->defined()) *slot.target = Tensor::empty(dtype, slot.target_shape);
}

ModelWeights random_weights(const ModelConfig& config, uint64_t seed, DType dtype, const ProgressFn& progress) {
  config.validate();
  // Random weights are written in full, so a model larger than the machine would be killed
  // for memory halfway; say so up front instead.
  const int64_t needed = weight_bytes(config, dtype);
  const int64_t physical = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  if (physical > 0 && needed > physical)
    fail(ErrorKind::kOutOfMemory, "random ", dtype_name(dtype), " weights of this config need ", needed,
         " bytes of host memory; this machine has ", physical);
  ModelWeights weights;
  std::vector<WeightSlot> slots = weight_slots(config, weights);
  allocate_weights(slots, dtype);
  int64_t total_bytes = 0, done_bytes = 0;
  for (const WeightSlot& slot : slots) total_bytes += numel_of(slot.shape) * static_cast<int64_t>(dtype_size(dtype));
  for (size_t slot = 0; slot < slots.size(); ++slot) {
    const Tensor& target = *slots[slot].target;
    const int64_t n = numel_of(slots[slot].shape);
    const int64_t offset = slots[slot].offset;
    const uint64_t stream = weight_stream(seed, slot);
    const bool is_norm = slots[slot].shape.size() == 1;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      store_float(target.data, dtype, static_cast<size_t>(offset + i),
                  is_norm ? 1.0f : kRandomWeightStd * normal_sample(stream, i));
    }
    done_bytes += n * static_cast<int64_t>(dtype_size(dtype));
    if (progress) progress(done_bytes, total_bytes);
  }
  if (config.tie_embeddings) weights.output = weights.tok_embeddings;
  return weights;
}

ModelConfig read_model_config(const std::string& model_dir) {
  require_dir(model_dir);
  return read_config(model_dir, detect_layout(model_dir));
}

Checkpoint load_checkpoint(const std::string& model_dir, const LoadOptions& options) {
  require_dir(model_dir);
  Checkpoint checkpoint;
  checkpoint.layout = detect_layout(model_dir);
  checkpoint.config = read_config(model_dir, checkpoint.layout);
  std::optional<PackedQuantization> packed;
  if (checkpoint.layout == CheckpointLayout::kHuggingFace)
    packed = packed_quantization(read_json(model_dir + "/config.json"), model_dir + "/config.json");
  if (packed && options.quantize)
    fail(ErrorKind::kInvalidRequest, model_dir, " is already quantized (", packed->name(), "); load it without ",
         "quantization='", weight_format_name(*options.quantize), "'");
  TensorIndex index = checkpoint.layout == CheckpointLayout::kHuggingFace ? open_hf_files(model_dir)
                                                                            : open_mistral_files(model_dir);
  std::vector<WeightRequest> plan = plan_weights(checkpoint.config, checkpoint.layout, checkpoint.weights);
  if (packed) {
    // Packed layer matrices are decoded (and checked) piece by piece; the rest loads as usual.
    const std::map<const Tensor*, QuantizedMatrix*> targets = quantized_targets(checkpoint.weights);
    const RawTensorReader read = raw_reader(index);
    std::vector<WeightRequest> float_plan;
    for (WeightRequest& request : plan) {
      auto target = targets.find(request.slot.target);
      if (target == targets.end()) {
        float_plan.push_back(std::move(request));
        continue;
      }
      try {
        read_packed_piece(*packed, read, packed_piece(request.slot, target->second));
      } catch (const Error& e) {
        fail(e.kind(), model_dir, ": ", e.what());
      }
    }
    for (const auto& [dense, quantized] : targets) drop_identity_col_perm(*quantized);
    plan = std::move(float_plan);
    checkpoint.weights.quantization = packed->name();
  }

  // Check every tensor's presence, dtype and shape before allocating or converting anything.
  int64_t total_bytes = 0;
  std::vector<const TensorIndex::Location*> sources;
  for (const WeightRequest& request : plan) {
    const std::string& name = request.slot.name;
    const TensorIndex::Location* where = index.find(name);
    if (!where) fail(ErrorKind::kCheckpoint, model_dir, ": missing tensor '", name, "'");
    const SafetensorsEntry& entry = *where->entry;
    if (!entry.dtype)
      fail(ErrorKind::kCheckpoint, model_dir, ": tensor '", name, "' has dtype ", entry.dtype_name,
           "; weights must be F32, BF16 or F16");
    if (entry.shape != request.slot.shape)
      fail(ErrorKind::kCheckpoint, model_dir, ": tensor '", name, "' has shape ", shape_str(entry.shape),
           " but the config implies ", shape_str(request.slot.shape), " (config inconsistent with the weights?)");
    total_bytes += static_cast<int64_t>(entry.nbytes);
    sources.push_back(where);
  }

  // Quantize-on-load works layer by layer, as soon as a layer's last tensor is in: only one
  // layer is ever held in float. Its matrices are copied, not mapped, so that their float pages
  // leave memory once quantized.
  std::map<const Tensor*, int64_t> layer_of;
  std::vector<size_t> last_request(checkpoint.weights.layers.size(), 0);
  if (options.quantize) {
    for (size_t l = 0; l < checkpoint.weights.layers.size(); ++l) {
      LayerWeights& layer = checkpoint.weights.layers[l];
      for (const Tensor* t : {&layer.wqkv, &layer.wo, &layer.w13, &layer.w2}) layer_of[t] = static_cast<int64_t>(l);
    }
    for (size_t i = 0; i < plan.size(); ++i)
      if (auto it = layer_of.find(plan[i].slot.target); it != layer_of.end()) last_request[it->second] = i;
  }

  int64_t done_bytes = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    const WeightRequest& request = plan[i];
    const SafetensorsEntry& entry = *sources[i]->entry;
    const DType dtype = options.dtype.value_or(*entry.dtype);
    Tensor& target = *request.slot.target;
    const auto layer = layer_of.find(&target);
    const bool quantized_later = layer != layer_of.end();
    if (options.use_mmap && !quantized_later && request.slot.whole() && request.rows == RowOrder::kAsStored &&
        dtype == *entry.dtype) {
      target = sources[i]->file->view(entry);
    } else {
      // A stacked tensor takes the dtype of its first piece (or the requested one).
      if (!target.defined()) target = Tensor::empty(dtype, request.slot.target_shape);
      copy_into_target(*sources[i], request);
    }
    if (quantized_later && last_request[layer->second] == i)
      quantize_layer(checkpoint.weights.layers[layer->second], *options.quantize, options.group_size);
    done_bytes += static_cast<int64_t>(entry.nbytes);
    if (options.progress) options.progress(done_bytes, total_bytes);
  }
  if (checkpoint.config.tie_embeddings) checkpoint.weights.output = checkpoint.weights.tok_embeddings;
  if (options.quantize) checkpoint.weights.quantization = weight_format_name(*options.quantize);
  set_quantize_activations(checkpoint.weights, options.quantize_activations);
  return checkpoint;
}

}  // namespace mc
