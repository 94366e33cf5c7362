#include "core/config.h"

#include <cmath>

#include "core/error.h"
#include "core/json.h"

namespace mc {
namespace {

// Reads config fields with the source file named in every message.
class FieldReader {
 public:
  FieldReader(const Json& json, const std::string& source) : json_(json), source_(source) {
    if (!json.is_object()) fail(ErrorKind::kCheckpoint, source, " must hold a JSON object");
  }

  const Json* present(const std::string& key) const {
    const Json* value = json_.find(key);
    return value && !value->is_null() ? value : nullptr;
  }
  int64_t required_int(const std::string& key) const {
    const Json* value = present(key);
    if (!value) fail(ErrorKind::kCheckpoint, source_, " is missing the required field '", key, "'");
    return value->integer(what(key));
  }
  int64_t int_or(const std::string& key, int64_t fallback) const {
    const Json* value = present(key);
    return value ? value->integer(what(key)) : fallback;
  }
  double number_or(const std::string& key, double fallback) const {
    const Json* value = present(key);
    return value ? value->number(what(key)) : fallback;
  }
  std::string what(const std::string& key) const { return source_ + " field '" + key + "'"; }

 private:
  const Json& json_;
  std::string source_;
};

// The Hugging Face model types this runner computes exactly. Llama is Mistral's architecture
// without a sliding window (same weight names, RMSNorm, RoPE, GQA, SwiGLU) as long as it adds
// no biases; its rope_scaling variants are refused with every other rope_scaling.
struct ModelFamily {
  const char* model_type;
  const char* architecture;
  bool default_window;  // an absent sliding_window means 4096 (Mistral), else full attention
};
constexpr ModelFamily kFamilies[] = {
    {"mistral", "MistralForCausalLM", true},
    {"mixtral", "MixtralForCausalLM", false},
    {"llama", "LlamaForCausalLM", false},
};
constexpr const char* kFamilyList = "mistral, mixtral, llama (MistralForCausalLM, MixtralForCausalLM, LlamaForCausalLM)";

// Checks model_type and architectures; a config naming neither is taken as Mistral.
const ModelFamily& model_family(const FieldReader& fields, const std::string& source) {
  const ModelFamily* family = nullptr;
  if (const Json* type = fields.present("model_type")) {
    const std::string& name = type->string(fields.what("model_type"));
    for (const ModelFamily& f : kFamilies)
      if (name == f.model_type) family = &f;
    if (!family)
      fail(ErrorKind::kCheckpoint, source, ": model_type '", name, "' is not supported (supported: ", kFamilyList,
           ")");
  }
  if (const Json* architectures = fields.present("architectures")) {
    for (const Json& entry : architectures->array(fields.what("architectures"))) {
      const std::string& name = entry.string(fields.what("architectures"));
      const ModelFamily* named = nullptr;
      for (const ModelFamily& f : kFamilies)
        if (name == f.architecture) named = &f;
      if (!named)
        fail(ErrorKind::kCheckpoint, source, ": architecture '", name, "' is not supported (supported: ",
             kFamilyList, ")");
      if (family && named != family)
        fail(ErrorKind::kCheckpoint, source, ": architecture '", name, "' does not match model_type '",
             family->model_type, "'");
      family = named;
    }
  }
  if (!family) family = &kFamilies[0];
  for (const char* bias : {"attention_bias", "mlp_bias"})
    if (const Json* flag = fields.present(bias); flag && flag->boolean(fields.what(bias)))
      fail(ErrorKind::kCheckpoint, source, ": ", bias, " is not supported (Mistral-family layers have no biases)");
  return *family;
}

// Checks every field against its bound before anything is sized from it; `source` (a file, or
// "config") starts each message.
void check_config(const ModelConfig& c, const std::string& source) {
  auto in_range = [&](int64_t value, const char* name, int64_t limit) {
    if (value <= 0) fail(ErrorKind::kCheckpoint, source, ": ", name, " must be positive, got ", value);
    if (value > limit)
      fail(ErrorKind::kCheckpoint, source, ": ", name, " = ", value, " exceeds the limit of ", limit);
  };
  in_range(c.dim, "dim", ModelConfig::kMaxDim);
  in_range(c.n_layers, "n_layers", ModelConfig::kMaxLayers);
  in_range(c.n_heads, "n_heads", ModelConfig::kMaxHeads);
  in_range(c.n_kv_heads, "n_kv_heads", ModelConfig::kMaxHeads);
  in_range(c.head_dim, "head_dim", ModelConfig::kMaxHeadDim);
  in_range(c.hidden_dim, "hidden_dim", ModelConfig::kMaxHiddenDim);
  in_range(c.vocab_size, "vocab_size", ModelConfig::kMaxVocab);
  in_range(c.max_seq_len, "max_seq_len", ModelConfig::kMaxSeqLen);
  if (c.sliding_window) in_range(*c.sliding_window, "sliding_window", ModelConfig::kMaxSeqLen);
  if (c.n_heads % c.n_kv_heads != 0)
    fail(ErrorKind::kCheckpoint, source, ": n_heads (", c.n_heads, ") must be a multiple of n_kv_heads (",
         c.n_kv_heads, ")");
  if (c.head_dim % 2 != 0) fail(ErrorKind::kCheckpoint, source, ": head_dim must be even for RoPE, got ", c.head_dim);
  if (!(c.norm_eps > 0) || !std::isfinite(c.norm_eps))
    fail(ErrorKind::kCheckpoint, source, ": norm_eps must be positive and finite, got ", c.norm_eps);
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta))
    fail(ErrorKind::kCheckpoint, source, ": rope_theta must be positive and finite, got ", c.rope_theta);
  if (c.n_experts < 0 || c.n_experts_per_tok < 0)
    fail(ErrorKind::kCheckpoint, source, ": expert counts must not be negative");
  if (c.n_experts_per_tok > ModelConfig::kMaxExperts)  // unused by dense models, bounded all the same
    fail(ErrorKind::kCheckpoint, source, ": n_experts_per_tok = ", c.n_experts_per_tok, " exceeds the limit of ",
         ModelConfig::kMaxExperts);
  if (c.n_experts > 0) {
    in_range(c.n_experts, "n_experts", ModelConfig::kMaxExperts);
    // Both bounded above, so the product cannot overflow; it bounds the weight plan's size.
    if (c.n_layers * c.n_experts > ModelConfig::kMaxLayerExperts)
      fail(ErrorKind::kCheckpoint, source, ": n_layers * n_experts = ", c.n_layers * c.n_experts,
           " exceeds the limit of ", ModelConfig::kMaxLayerExperts);
    if (c.n_experts_per_tok == 0 || c.n_experts_per_tok > c.n_experts)
      fail(ErrorKind::kCheckpoint, source, ": n_experts_per_tok (", c.n_experts_per_tok,
           ") must be in 1..n_experts (", c.n_experts, ")");
  }
}

}  // namespace

void ModelConfig::validate() const { check_config(*this, "config"); }

ModelConfig ModelConfig::preset(const std::string& name) {
  ModelConfig config;
  config.dim = 4096;
  config.n_layers = 32;
  config.n_heads = 32;
  config.n_kv_heads = 8;
  config.head_dim = 128;
  config.hidden_dim = 14336;
  config.vocab_size = 32000;
  config.norm_eps = 1e-5;
  config.max_seq_len = 32768;
  if (name == "mistral-7b-v0.1") {
    config.rope_theta = 10000.0;
    config.sliding_window = 4096;
  } else if (name == "mistral-7b-v0.3") {
    config.vocab_size = 32768;
    config.rope_theta = 1e6;
  } else if (name == "mixtral-8x7b") {
    config.rope_theta = 1e6;
    config.n_experts = 8;
    config.n_experts_per_tok = 2;
  } else {
    fail(ErrorKind::kInvalidRequest, "unknown preset '", name,
         "' (known: mistral-7b-v0.1, mistral-7b-v0.3, mixtral-8x7b)");
  }
  return config;
}

ModelConfig ModelConfig::from_hf_json(const Json& json, const std::string& source) {
  FieldReader fields(json, source);
  const ModelFamily& family = model_family(fields, source);  // first: another model's fields mislead
  ModelConfig config;
  config.dim = fields.required_int("hidden_size");
  config.n_layers = fields.required_int("num_hidden_layers");
  config.n_heads = fields.required_int("num_attention_heads");
  config.n_kv_heads = fields.int_or("num_key_value_heads", config.n_heads);
  config.head_dim = fields.int_or("head_dim", config.n_heads > 0 ? config.dim / config.n_heads : 0);
  config.hidden_dim = fields.required_int("intermediate_size");
  config.vocab_size = fields.required_int("vocab_size");
  config.norm_eps = fields.number_or("rms_norm_eps", 1e-6);

  // transformers >= 5 nests RoPE settings in rope_parameters; older files keep rope_theta flat.
  config.rope_theta = fields.number_or("rope_theta", 10000.0);
  if (const Json* rope = fields.present("rope_parameters")) {
    FieldReader rope_fields(*rope, fields.what("rope_parameters"));
    config.rope_theta = rope_fields.number_or("rope_theta", config.rope_theta);
    if (const Json* type = rope_fields.present("rope_type"); type && type->string("rope_type") != "default")
      fail(ErrorKind::kCheckpoint, source, ": rope_type '", type->string("rope_type"), "' is not supported");
  }
  if (fields.present("rope_scaling"))
    fail(ErrorKind::kCheckpoint, source, ": rope_scaling is not supported by Mistral-family models");
  if (const Json* act = fields.present("hidden_act"); act && act->string(fields.what("hidden_act")) != "silu")
    fail(ErrorKind::kCheckpoint, source, ": hidden_act '", act->string("hidden_act"), "' is not supported (silu only)");

  // An absent key takes transformers' class default: Mistral 4096, Mixtral and Llama full attention.
  const Json* window = json.find("sliding_window");
  if (window == nullptr) {
    if (family.default_window) config.sliding_window = 4096;
  } else if (!window->is_null()) {
    config.sliding_window = window->integer(fields.what("sliding_window"));
  }
  config.max_seq_len = fields.int_or("max_position_embeddings", 4096 * 32);
  config.n_experts = fields.int_or("num_local_experts", 0);
  config.n_experts_per_tok = config.n_experts > 0 ? fields.int_or("num_experts_per_tok", 2) : 0;
  if (const Json* tie = fields.present("tie_word_embeddings")) config.tie_embeddings = tie->boolean(fields.what("tie_word_embeddings"));
  check_config(config, source);
  return config;
}

ModelConfig ModelConfig::from_mistral_json(const Json& json, const std::string& source) {
  FieldReader fields(json, source);
  ModelConfig config;
  config.dim = fields.required_int("dim");
  config.n_layers = fields.required_int("n_layers");
  config.n_heads = fields.required_int("n_heads");
  config.n_kv_heads = fields.int_or("n_kv_heads", config.n_heads);
  config.head_dim = fields.int_or("head_dim", config.n_heads > 0 ? config.dim / config.n_heads : 0);
  config.hidden_dim = fields.required_int("hidden_dim");
  config.vocab_size = fields.required_int("vocab_size");
  config.norm_eps = fields.number_or("norm_eps", 1e-5);
  config.rope_theta = fields.number_or("rope_theta", 10000.0);
  if (const Json* window = fields.present("sliding_window"))
    config.sliding_window = window->integer(fields.what("sliding_window"));
  config.max_seq_len = fields.int_or("max_seq_len", 32768);
  if (const Json* moe = fields.present("moe")) {
    FieldReader moe_fields(*moe, fields.what("moe"));
    config.n_experts = moe_fields.required_int("num_experts");
    config.n_experts_per_tok = moe_fields.required_int("num_experts_per_tok");
  }
  check_config(config, source);
  return config;
}

}  // namespace mc
