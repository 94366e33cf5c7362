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
  explicit TensorIndex(bool use_mmap) : use_mmap_(use_mmap) {}

  void add_file(const std::string& path) {
    auto file = SafetensorsFile::open(path, use_mmap_);
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
  bool use_mmap_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Location> where_;
};

TensorIndex open_hf_files(const std::string& model_dir, bool use_mmap) {
  TensorIndex index(use_mmap);
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

TensorIndex open_mistral_files(const std::string& model_dir, bool use_mmap) {
  std::string path = model_dir + "/consolidated.safetensors";
  if (!is_file(path)) fail(ErrorKind::kFileNotFound, model_dir, " has params.json but no consolidated.safetensors");
  TensorIndex index(use_mmap);
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

struct WeightRequest {
  std::string name;
  std::vector<int64_t> shape;
  Tensor* target;
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
  std::vector<WeightRequest> plan;
  plan.push_back({names.embed, {c.vocab_size, c.dim}, &w.tok_embeddings});
  w.layers.resize(c.n_layers);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    LayerWeights& layer = w.layers[i];
    std::string prefix = names.layer_prefix + std::to_string(i) + ".";
    plan.push_back({prefix + names.attn_norm, {c.dim}, &layer.attn_norm});
    plan.push_back({prefix + names.wq, {c.q_dim(), c.dim}, &layer.wq, qk_rows, c.n_heads});
    plan.push_back({prefix + names.wk, {c.kv_dim(), c.dim}, &layer.wk, qk_rows, c.n_kv_heads});
    plan.push_back({prefix + names.wv, {c.kv_dim(), c.dim}, &layer.wv});
    plan.push_back({prefix + names.wo, {c.dim, c.q_dim()}, &layer.wo});
    plan.push_back({prefix + names.ffn_norm, {c.dim}, &layer.ffn_norm});
    if (!c.is_moe()) {
      plan.push_back({prefix + names.w1, {c.hidden_dim, c.dim}, &layer.ffn.w1});
      plan.push_back({prefix + names.w2, {c.dim, c.hidden_dim}, &layer.ffn.w2});
      plan.push_back({prefix + names.w3, {c.hidden_dim, c.dim}, &layer.ffn.w3});
      continue;
    }
    plan.push_back({prefix + names.router, {c.n_experts, c.dim}, &layer.router});
    layer.experts.resize(c.n_experts);
    for (int64_t e = 0; e < c.n_experts; ++e) {
      std::string expert = prefix + names.experts + std::to_string(e) + ".";
      plan.push_back({expert + "w1.weight", {c.hidden_dim, c.dim}, &layer.experts[e].w1});
      plan.push_back({expert + "w2.weight", {c.dim, c.hidden_dim}, &layer.experts[e].w2});
      plan.push_back({expert + "w3.weight", {c.hidden_dim, c.dim}, &layer.experts[e].w3});
    }
  }
  plan.push_back({names.norm, {c.dim}, &w.norm});
  if (!c.tie_embeddings) plan.push_back({names.output, {c.vocab_size, c.dim}, &w.output});
  return plan;
}

Tensor load_tensor(const TensorIndex::Location& where, const WeightRequest& request, std::optional<DType> dtype) {
  Tensor stored = where.file->view(*where.entry);
  if (stored.shape != request.shape)  // checked by load_checkpoint; restated where memory depends on it
    fail(ErrorKind::kCheckpoint, "tensor '", request.name, "' has shape ", stored.shape_str(), ", expected ",
         shape_str(request.shape));
  if (request.rows == RowOrder::kInterleavedHeads) {
    if (request.shape.size() != 2 || request.rope_heads <= 0 || request.shape[0] % request.rope_heads != 0 ||
        (request.shape[0] / request.rope_heads) % 2 != 0)
      fail(ErrorKind::kCheckpoint, "tensor '", request.name, "' of shape ", stored.shape_str(),
           " cannot be split into ", request.rope_heads, " heads of even size");
    Tensor permuted = Tensor::empty(stored.dtype, request.shape);
    const size_t row_bytes = static_cast<size_t>(request.shape[1]) * dtype_size(stored.dtype);
    permute_rows_to_half_rotation(static_cast<const uint8_t*>(stored.data), static_cast<uint8_t*>(permuted.data),
                                  request.rope_heads, request.shape[0] / request.rope_heads, row_bytes);
    stored = std::move(permuted);
  }
  if (!dtype || *dtype == stored.dtype) return stored;
  if (*dtype != DType::kF32)
    fail(ErrorKind::kUnsupported, "weights convert to float32 on load, or keep their stored dtype; not ",
         dtype_name(*dtype));
  Tensor converted = Tensor::empty(DType::kF32, request.shape);
  convert_to_f32(stored.data, stored.dtype, stored.numel(), converted.f32());
  return converted;
}

// Bytes of all weights of `config` in float32 (bounded configs cannot overflow this).
int64_t weight_bytes_f32(const ModelConfig& c) {
  const int64_t ffn = 3 * c.hidden_dim * c.dim * (c.is_moe() ? c.n_experts : 1) + (c.is_moe() ? c.n_experts * c.dim : 0);
  const int64_t attention = 2 * c.q_dim() * c.dim + 2 * c.kv_dim() * c.dim;
  const int64_t per_layer = attention + ffn + 2 * c.dim;
  return 4 * (c.n_layers * per_layer + (c.tie_embeddings ? 1 : 2) * c.vocab_size * c.dim + c.dim);
}

}  // namespace

std::vector<WeightSlot> weight_slots(const ModelConfig& config, ModelWeights& weights) {
  std::vector<WeightSlot> slots;
  for (WeightRequest& request : plan_weights(config, CheckpointLayout::kHuggingFace, weights))
    slots.push_back({std::move(request.name), std::move(request.shape), request.target});
  return slots;
}

ModelWeights random_weights(const ModelConfig& config, uint64_t seed) {
  config.validate();
  // Random weights are written in full, so a model larger than the machine would be killed
  // for memory halfway; say so up front instead.
  const int64_t needed = weight_bytes_f32(config);
  const int64_t physical = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  if (physical > 0 && needed > physical)
    fail(ErrorKind::kOutOfMemory, "random float32 weights of this config need ", needed,
         " bytes of host memory; this machine has ", physical);
  ModelWeights weights;
  std::vector<WeightSlot> slots = weight_slots(config, weights);
  for (size_t slot = 0; slot < slots.size(); ++slot) {
    Tensor tensor = Tensor::empty(DType::kF32, slots[slot].shape);
    float* data = tensor.f32();
    const int64_t n = tensor.numel();
    const uint64_t stream = weight_stream(seed, slot);
    const bool is_norm = slots[slot].shape.size() == 1;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) data[i] = is_norm ? 1.0f : kRandomWeightStd * normal_sample(stream, i);
    *slots[slot].target = std::move(tensor);
  }
  if (config.tie_embeddings) weights.output = weights.tok_embeddings;
  return weights;
}

ModelConfig read_model_config(const std::string& model_dir) {
  require_dir(model_dir);
  return read_config(model_dir, detect_layout(model_dir));
}

Checkpoint load_checkpoint(const std::string& model_dir, std::optional<DType> dtype, const ProgressFn& progress,
                           bool use_mmap) {
  require_dir(model_dir);
  Checkpoint checkpoint;
  checkpoint.layout = detect_layout(model_dir);
  checkpoint.config = read_config(model_dir, checkpoint.layout);
  TensorIndex index = checkpoint.layout == CheckpointLayout::kHuggingFace ? open_hf_files(model_dir, use_mmap)
                                                                            : open_mistral_files(model_dir, use_mmap);
  std::vector<WeightRequest> plan = plan_weights(checkpoint.config, checkpoint.layout, checkpoint.weights);

  // Check every tensor's presence, dtype and shape before converting anything.
  int64_t total_bytes = 0;
  std::vector<const TensorIndex::Location*> sources;
  for (const WeightRequest& request : plan) {
    const TensorIndex::Location* where = index.find(request.name);
    if (!where) fail(ErrorKind::kCheckpoint, model_dir, ": missing tensor '", request.name, "'");
    const SafetensorsEntry& entry = *where->entry;
    if (!entry.dtype)
      fail(ErrorKind::kCheckpoint, model_dir, ": tensor '", request.name, "' has dtype ", entry.dtype_name,
           "; weights must be F32, BF16 or F16");
    if (entry.shape != request.shape)
      fail(ErrorKind::kCheckpoint, model_dir, ": tensor '", request.name, "' has shape ", shape_str(entry.shape),
           " but the config implies ", shape_str(request.shape), " (config inconsistent with the weights?)");
    total_bytes += static_cast<int64_t>(entry.nbytes);
    sources.push_back(where);
  }

  int64_t done_bytes = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    *plan[i].target = load_tensor(*sources[i], plan[i], dtype);
    done_bytes += static_cast<int64_t>(sources[i]->entry->nbytes);
    if (progress) progress(done_bytes, total_bytes);
  }
  if (checkpoint.config.tie_embeddings) checkpoint.weights.output = checkpoint.weights.tok_embeddings;
  return checkpoint;
}

}  // namespace mc
