// The C API (include/mistral_cuda.h) over the C++ core: mc::Model and mc::Scheduler behind opaque
// handles. Every entry point catches every exception (the C caller cannot), turns it into a
// status and leaves its message in the thread's last-error string. Parameters are checked here
// with the rules of the Python SamplingParams, so both front ends refuse the same requests.
#include "mistral_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/json.h"
#include "core/quantized.h"
#include "runtime/model.h"
#include "runtime/scheduler.h"

namespace {

thread_local std::string last_error;

// A status with its message, thrown inside an entry point and caught by guarded().
struct StatusError {
  mc_status status;
  std::string message;
};

template <typename... Parts>
[[noreturn]] void fail_with(mc_status status, Parts&&... parts) {
  throw StatusError{status, mc::str_cat(std::forward<Parts>(parts)...)};
}

// Thrown from the progress callback's wrapper when the caller asks to stop the load.
struct LoadCancelled {};

mc_status status_of(mc::ErrorKind kind) {
  switch (kind) {
    case mc::ErrorKind::kInvalidRequest: return MC_ERR_INVALID_ARGUMENT;
    case mc::ErrorKind::kCheckpoint: return MC_ERR_CHECKPOINT;
    case mc::ErrorKind::kFileNotFound: return MC_ERR_NOT_FOUND;
    case mc::ErrorKind::kCacheFull: return MC_ERR_CACHE_FULL;
    case mc::ErrorKind::kOutOfMemory: return MC_ERR_INTERNAL;
    case mc::ErrorKind::kUnsupported: return MC_ERR_UNSUPPORTED;
  }
  return MC_ERR_INTERNAL;
}

mc_status set_error(mc_status status, const std::string& message) {
  try {
    last_error = message;
  } catch (...) {
    last_error.clear();  // no memory for the message: the status alone must do
  }
  return status;
}

// Runs `body` (which returns nothing or throws) and turns any exception into a status.
template <typename Body>
mc_status guarded(Body&& body) {
  try {
    body();
    return MC_OK;
  } catch (const StatusError& e) {
    return set_error(e.status, e.message);
  } catch (const LoadCancelled&) {
    return set_error(MC_ERR_CANCELLED, "the model load was cancelled by its progress callback");
  } catch (const mc::Error& e) {
    return set_error(status_of(e.kind()), e.what());
  } catch (const std::bad_alloc&) {
    return set_error(MC_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return set_error(MC_ERR_INTERNAL, e.what());
  } catch (...) {
    return set_error(MC_ERR_INTERNAL, "unknown error");
  }
}

template <typename Params>
void check_struct(const Params* params, const char* what) {
  if (params == nullptr) fail_with(MC_ERR_INVALID_ARGUMENT, what, " is NULL");
  if (params->struct_size != sizeof(Params))
    fail_with(MC_ERR_INVALID_ARGUMENT, what, "->struct_size is ", params->struct_size, ", this library expects ",
              sizeof(Params), " (start from the *_default_params() value)");
}

void check_not_null(const void* pointer, const char* what) {
  if (pointer == nullptr) fail_with(MC_ERR_INVALID_ARGUMENT, what, " is NULL");
}

}  // namespace

// A loaded model, shared by the caller's handle and the engine running on it.
struct ModelState {
  std::unique_ptr<mc::Model> model;
  int32_t eos_id = -1;
  bool in_engine = false;  // guarded by the registry's mutex
};

struct mc_model {
  std::shared_ptr<ModelState> state;
};

// What the caller can read of one request: everything it generated, kept past its end.
struct RequestRecord {
  size_t n_prompt = 0;
  int32_t n_logprobs = -1;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;                                 // [tokens] with n_logprobs >= 0
  std::vector<std::vector<std::pair<int32_t, float>>> top;     // [tokens][<= n_logprobs]
  mc_finish_reason finish = MC_FINISH_NONE;
  int32_t stop_token = -1;
};

struct mc_engine {
  std::shared_ptr<ModelState> model;
  bool attached = false;  // this engine holds model->in_engine (and its cache)
  std::mutex mutex;  // serializes every call on this engine
  std::unique_ptr<mc::Scheduler> scheduler;
  std::map<uint64_t, RequestRecord> requests;  // added and not yet released
  std::mt19937_64 seeds{std::random_device{}()};

  ~mc_engine();
};

namespace {

// Live handles, so that a freed or made-up pointer is refused instead of dereferenced. Never
// destroyed: handles freed from static destructors still find it.
struct Registry {
  std::mutex mutex;
  std::unordered_set<const void*> models;
  std::unordered_set<const void*> engines;
};

Registry& registry() {
  static Registry* instance = new Registry();
  return *instance;
}

void check_model(const mc_model* model) {
  check_not_null(model, "model");
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.models.count(model) == 0) fail_with(MC_ERR_INVALID_ARGUMENT, "model is not a live mc_model handle");
}

void check_engine(const mc_engine* engine) {
  check_not_null(engine, "engine");
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.engines.count(engine) == 0) fail_with(MC_ERR_INVALID_ARGUMENT, "engine is not a live mc_engine handle");
}

RequestRecord& find_request(mc_engine* engine, uint64_t id) {
  auto it = engine->requests.find(id);
  if (it == engine->requests.end())
    fail_with(MC_ERR_NOT_FOUND, "request ", id, " is unknown to this engine (never added, or released)");
  return it->second;
}

// "eos_token_id" of a Hugging Face config file: an int, or a list whose first entry is taken.
int32_t eos_id_in(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return -1;
  std::stringstream text;
  text << file.rdbuf();
  const mc::Json json = mc::Json::parse(text.str());
  const mc::Json* eos = json.find("eos_token_id");
  if (eos == nullptr || eos->is_null()) return -1;
  const mc::Json& first = eos->is_array() && !eos->array(path).empty() ? eos->array(path)[0] : *eos;
  if (first.is_array()) return -1;
  const int64_t id = first.integer(path + " eos_token_id");
  return id >= 0 && id <= INT32_MAX ? static_cast<int32_t>(id) : -1;
}

int32_t checkpoint_eos_id(const std::string& model_dir) {
  for (const char* name : {"config.json", "generation_config.json"}) {
    const int32_t id = eos_id_in(model_dir + "/" + name);
    if (id >= 0) return id;
  }
  return -1;
}

void check_range(float value, float low, float high, const char* name) {
  if (!std::isfinite(value) || value < low || value > high)
    fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.", name, " must be a finite number in [", low, ", ", high,
              "], got ", value);
}

// The request as the scheduler takes it, after the checks of Python's SamplingParams.
mc::RequestParams request_params(const mc_sampling_params& p, int64_t vocab, int32_t eos_id, std::mt19937_64& seeds) {
  if (p.max_tokens < 1) fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.max_tokens must be >= 1, got ", p.max_tokens);
  if (p.min_tokens < 0 || p.min_tokens > p.max_tokens)
    fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.min_tokens must be in [0, max_tokens=", p.max_tokens,
              "], got ", p.min_tokens);
  if (!std::isfinite(p.temperature) || p.temperature < 0.0f)
    fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.temperature must be a finite number >= 0, got ",
              p.temperature);
  if (p.top_k < -1)
    fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.top_k must be >= -1 (0 or -1 disable it), got ", p.top_k);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.top_p must be in (0, 1], got ", p.top_p);
  check_range(p.min_p, 0.0f, 1.0f, "min_p");
  if (!std::isfinite(p.repetition_penalty) || !(p.repetition_penalty > 0.0f))
    fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.repetition_penalty must be a finite number > 0, got ",
              p.repetition_penalty);
  check_range(p.presence_penalty, -2.0f, 2.0f, "presence_penalty");
  check_range(p.frequency_penalty, -2.0f, 2.0f, "frequency_penalty");
  if (p.logprobs < -1 || p.logprobs > MC_MAX_LOGPROBS)
    fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.logprobs must be -1 or in [0, ", MC_MAX_LOGPROBS, "], got ",
              p.logprobs);
  if (p.n_stop_token_ids > 0) check_not_null(p.stop_token_ids, "mc_sampling_params.stop_token_ids");
  if (p.n_logit_bias > 0) check_not_null(p.logit_bias, "mc_sampling_params.logit_bias");

  mc::RequestParams r;
  r.controls.temperature = p.temperature;
  r.controls.top_k = p.top_k < 0 ? 0 : p.top_k;  // the core's "off" is 0
  r.controls.top_p = p.top_p;
  r.controls.min_p = p.min_p;
  r.controls.repetition_penalty = p.repetition_penalty;
  r.controls.presence_penalty = p.presence_penalty;
  r.controls.frequency_penalty = p.frequency_penalty;
  r.controls.seed = p.seed == MC_SEED_RANDOM ? seeds() : p.seed;
  r.controls.n_logprobs = p.logprobs;
  r.max_tokens = p.max_tokens;
  r.min_tokens = p.min_tokens;
  for (size_t i = 0; i < p.n_stop_token_ids; ++i) {
    const int32_t id = p.stop_token_ids[i];
    if (id < 0 || id >= vocab)
      fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.stop_token_ids[", i, "] = ", id,
                " is outside the vocabulary [0, ", vocab, ")");
    r.stop_token_ids.push_back(id);
  }
  for (size_t i = 0; i < p.n_logit_bias; ++i) {
    const mc_logit_bias& b = p.logit_bias[i];
    if (b.token < 0 || b.token >= vocab)
      fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.logit_bias[", i, "].token = ", b.token,
                " is outside the vocabulary [0, ", vocab, ")");
    if (!std::isfinite(b.bias) || b.bias < -100.0f || b.bias > 100.0f)
      fail_with(MC_ERR_INVALID_ARGUMENT, "mc_sampling_params.logit_bias[", i, "].bias must be in [-100, 100], got ",
                b.bias);
    r.logit_bias.emplace_back(b.token, b.bias);
  }
  r.eos_id = eos_id;
  r.ignore_eos = p.ignore_eos;
  return r;
}

void copy_name(char (&dst)[16], const std::string& src) {
  std::strncpy(dst, src.c_str(), sizeof(dst) - 1);
  dst[sizeof(dst) - 1] = '\0';
}

}  // namespace

mc_engine::~mc_engine() {
  if (!attached) return;
  scheduler.reset();  // frees every sequence of the model's cache
  try {
    model->model->resize_kv_cache(1);  // the cache goes with the engine; a new one sizes its own
  } catch (...) {
    // The model keeps the larger cache; the next engine resizes it anyway.
  }
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  model->in_engine = false;
}

extern "C" {

const char* mc_status_str(mc_status status) {
  switch (status) {
    case MC_OK: return "MC_OK";
    case MC_ERR_INVALID_ARGUMENT: return "MC_ERR_INVALID_ARGUMENT";
    case MC_ERR_NOT_FOUND: return "MC_ERR_NOT_FOUND";
    case MC_ERR_CHECKPOINT: return "MC_ERR_CHECKPOINT";
    case MC_ERR_UNSUPPORTED: return "MC_ERR_UNSUPPORTED";
    case MC_ERR_CACHE_FULL: return "MC_ERR_CACHE_FULL";
    case MC_ERR_CANCELLED: return "MC_ERR_CANCELLED";
    case MC_ERR_INTERNAL: return "MC_ERR_INTERNAL";
  }
  return "unknown status";
}

const char* mc_last_error(void) { return last_error.c_str(); }

const char* mc_version(void) { return MC_VERSION_STRING; }

const char* mc_finish_reason_str(mc_finish_reason reason) {
  switch (reason) {
    case MC_FINISH_NONE: return "none";
    case MC_FINISH_STOP: return "stop";
    case MC_FINISH_LENGTH: return "length";
    case MC_FINISH_ABORT: return "abort";
  }
  return "unknown";
}

mc_model_params mc_model_default_params(void) {
  mc_model_params p;
  std::memset(&p, 0, sizeof(p));
  p.struct_size = sizeof(p);
  p.device = "cpu";
  p.dtype = nullptr;
  p.quantization = nullptr;
  p.block_size = 16;
  p.max_step_tokens = 0;
  p.max_step_seqs = 0;
  p.use_mmap = true;
  p.eos_id = -1;
  p.progress = nullptr;
  p.progress_user_data = nullptr;
  return p;
}

mc_status mc_model_load(const char* model_dir, const mc_model_params* params, mc_model** out) {
  return guarded([&] {
    check_not_null(model_dir, "model_dir");
    check_not_null(out, "out");
    check_struct(params, "params");
    check_not_null(params->device, "params->device");
    if (params->eos_id < -1) fail_with(MC_ERR_INVALID_ARGUMENT, "params->eos_id must be -1 or an id, got ", params->eos_id);
    mc::ModelOptions options;
    options.device = params->device;
    if (params->dtype != nullptr) options.dtype = mc::parse_dtype(params->dtype);
    if (params->quantization != nullptr) options.quantization = mc::parse_quantization(params->quantization);
    options.block_size = params->block_size;
    options.max_step_tokens = params->max_step_tokens;
    options.max_step_seqs = params->max_step_seqs;
    options.use_mmap = params->use_mmap;
    // A one-block placeholder: the engine allocates the cache it is asked for (mc_engine_params).
    options.num_blocks = 1;
    if (params->progress != nullptr) {
      const mc_progress_callback progress = params->progress;
      void* user_data = params->progress_user_data;
      options.progress = [progress, user_data](int64_t done, int64_t total) {
        if (!progress(done, total, user_data)) throw LoadCancelled{};
      };
    }
    auto state = std::make_shared<ModelState>();
    state->model = mc::Model::load(model_dir, options);
    const int64_t vocab = state->model->config().vocab_size;
    state->eos_id = params->eos_id >= 0 ? params->eos_id : checkpoint_eos_id(model_dir);
    if (state->eos_id >= vocab)
      fail_with(MC_ERR_INVALID_ARGUMENT, "eos id ", state->eos_id, " is outside the vocabulary [0, ", vocab, ")");
    auto model = std::make_unique<mc_model>();
    model->state = std::move(state);
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.models.insert(model.get());
    *out = model.release();
  });
}

void mc_model_free(mc_model* model) {
  if (model == nullptr) return;
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    if (r.models.erase(model) == 0) return;  // not a live handle: freeing it twice must not crash
  }
  delete model;
}

mc_status mc_model_get_config(const mc_model* model, mc_model_config* out) {
  return guarded([&] {
    check_model(model);
    check_struct(out, "out");
    const mc::Model& m = *model->state->model;
    const mc::ModelConfig& c = m.config();
    mc_model_config config;
    std::memset(&config, 0, sizeof(config));
    config.struct_size = sizeof(config);
    config.dim = c.dim;
    config.n_layers = c.n_layers;
    config.n_heads = c.n_heads;
    config.n_kv_heads = c.n_kv_heads;
    config.head_dim = c.head_dim;
    config.hidden_dim = c.hidden_dim;
    config.vocab_size = c.vocab_size;
    config.max_seq_len = c.max_seq_len;
    config.sliding_window = c.sliding_window.value_or(0);
    config.n_experts = c.n_experts;
    config.n_experts_per_tok = c.n_experts_per_tok;
    config.norm_eps = c.norm_eps;
    config.rope_theta = c.rope_theta;
    config.eos_id = model->state->eos_id;
    config.block_size = m.block_size();
    copy_name(config.device, m.device());
    copy_name(config.dtype, mc::dtype_name(m.dtype()));
    copy_name(config.quantization, m.quantization());
    *out = config;
  });
}

mc_engine_params mc_engine_default_params(void) {
  mc_engine_params p;
  std::memset(&p, 0, sizeof(p));
  p.struct_size = sizeof(p);
  p.max_num_seqs = 64;
  p.max_num_batched_tokens = 2048;
  p.num_blocks = 0;
  return p;
}

mc_status mc_engine_create(mc_model* model, const mc_engine_params* params, mc_engine** out) {
  return guarded([&] {
    check_model(model);
    check_struct(params, "params");
    check_not_null(out, "out");
    if (params->num_blocks < 0)
      fail_with(MC_ERR_INVALID_ARGUMENT, "params->num_blocks must be >= 0 (0 = default), got ", params->num_blocks);
    auto engine = std::make_unique<mc_engine>();
    engine->model = model->state;
    Registry& r = registry();
    {
      std::lock_guard<std::mutex> lock(r.mutex);
      if (model->state->in_engine)
        fail_with(MC_ERR_INVALID_ARGUMENT, "the model already backs an engine: free that engine first");
      model->state->in_engine = engine->attached = true;  // from here on, ~mc_engine releases it
    }
    mc::SchedulerOptions options;
    options.max_num_seqs = params->max_num_seqs;
    options.max_num_batched_tokens = params->max_num_batched_tokens;
    engine->model->model->resize_kv_cache(params->num_blocks);
    engine->scheduler = std::make_unique<mc::Scheduler>(*engine->model->model, options);
    std::lock_guard<std::mutex> lock(r.mutex);
    r.engines.insert(engine.get());
    *out = engine.release();
  });
}

void mc_engine_free(mc_engine* engine) {
  if (engine == nullptr) return;
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    if (r.engines.erase(engine) == 0) return;
  }
  delete engine;
}

mc_status mc_engine_step(mc_engine* engine, size_t* n_unfinished) {
  return guarded([&] {
    check_engine(engine);
    std::lock_guard<std::mutex> lock(engine->mutex);
    mc::Scheduler& scheduler = *engine->scheduler;
    if (scheduler.has_unfinished()) {
      for (mc::RequestUpdate& update : scheduler.step()) {
        auto it = engine->requests.find(update.id);
        if (it == engine->requests.end()) continue;
        RequestRecord& record = it->second;
        for (const mc::SampledToken& token : update.tokens) {
          record.tokens.push_back(token.token);
          if (record.n_logprobs >= 0) {
            record.logprobs.push_back(token.logprob);
            record.top.push_back(token.top);
          }
        }
        switch (update.finish) {
          case mc::FinishReason::kNone: break;
          case mc::FinishReason::kStop: record.finish = MC_FINISH_STOP; break;
          case mc::FinishReason::kLength: record.finish = MC_FINISH_LENGTH; break;
          case mc::FinishReason::kAbort: record.finish = MC_FINISH_ABORT; break;
        }
        record.stop_token = update.stop_token;
      }
    }
    if (n_unfinished != nullptr) *n_unfinished = scheduler.num_running() + scheduler.num_waiting();
  });
}

mc_sampling_params mc_sampling_default_params(void) {
  mc_sampling_params p;
  std::memset(&p, 0, sizeof(p));
  p.struct_size = sizeof(p);
  p.max_tokens = 64;
  p.min_tokens = 0;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.repetition_penalty = 1.0f;
  p.presence_penalty = 0.0f;
  p.frequency_penalty = 0.0f;
  p.seed = MC_SEED_RANDOM;
  p.stop_token_ids = nullptr;
  p.n_stop_token_ids = 0;
  p.logit_bias = nullptr;
  p.n_logit_bias = 0;
  p.logprobs = 0;
  p.ignore_eos = false;
  return p;
}

mc_status mc_request_add(mc_engine* engine, const int32_t* prompt, size_t n_prompt, const mc_sampling_params* params,
                         uint64_t* id) {
  return guarded([&] {
    check_engine(engine);
    check_struct(params, "params");
    check_not_null(id, "id");
    if (n_prompt == 0) fail_with(MC_ERR_INVALID_ARGUMENT, "the prompt is empty");
    check_not_null(prompt, "prompt");
    std::lock_guard<std::mutex> lock(engine->mutex);
    const mc::Model& model = *engine->model->model;
    const mc::ModelConfig& config = model.config();
    for (size_t i = 0; i < n_prompt; ++i)
      if (prompt[i] < 0 || prompt[i] >= config.vocab_size)
        fail_with(MC_ERR_INVALID_ARGUMENT, "prompt token id ", prompt[i], " at index ", i,
                  " is outside the vocabulary [0, ", config.vocab_size, ")");
    if (!config.sliding_window && static_cast<int64_t>(n_prompt) >= config.max_seq_len)
      fail_with(MC_ERR_INVALID_ARGUMENT, "the prompt has ", n_prompt, " tokens; max_seq_len ", config.max_seq_len,
                " leaves no room to generate");
    mc::RequestParams request = request_params(*params, config.vocab_size, engine->model->eos_id, engine->seeds);
    const int64_t needed = engine->scheduler->blocks_to_fit_alone(static_cast<int64_t>(n_prompt), request.max_tokens);
    if (needed > model.num_blocks())
      fail_with(MC_ERR_CACHE_FULL, "this request needs ", needed, " KV blocks (", n_prompt, " prompt tokens + max_tokens ",
                request.max_tokens, ") but the cache has only ", model.num_blocks(),
                ": shorten it or create the engine with more num_blocks");
    RequestRecord record;
    record.n_prompt = n_prompt;
    record.n_logprobs = params->logprobs;
    // The record first: an id the scheduler accepted always has one.
    const uint64_t new_id = engine->scheduler->next_request_id();
    auto [slot, inserted] = engine->requests.emplace(new_id, std::move(record));
    if (!inserted) fail_with(MC_ERR_INTERNAL, "request id ", new_id, " is in use");
    try {
      const uint64_t added = engine->scheduler->add(std::vector<int32_t>(prompt, prompt + n_prompt), request);
      if (added != new_id) fail_with(MC_ERR_INTERNAL, "the scheduler gave id ", added, ", expected ", new_id);
    } catch (...) {
      engine->requests.erase(slot);
      throw;
    }
    *id = new_id;
  });
}

mc_status mc_request_read(mc_engine* engine, uint64_t id, int32_t* tokens, size_t capacity, size_t* n_read,
                          int* finished) {
  return guarded([&] {
    check_engine(engine);
    check_not_null(n_read, "n_read");
    if (capacity > 0) check_not_null(tokens, "tokens");
    std::lock_guard<std::mutex> lock(engine->mutex);
    const RequestRecord& record = find_request(engine, id);
    const size_t n = std::min(capacity, record.tokens.size());
    if (n > 0) std::memcpy(tokens, record.tokens.data(), n * sizeof(int32_t));
    *n_read = n;
    if (finished != nullptr) *finished = record.finish != MC_FINISH_NONE;
  });
}

mc_status mc_request_get_info(mc_engine* engine, uint64_t id, mc_request_info* out) {
  return guarded([&] {
    check_engine(engine);
    check_struct(out, "out");
    std::lock_guard<std::mutex> lock(engine->mutex);
    const RequestRecord& record = find_request(engine, id);
    out->n_prompt = record.n_prompt;
    out->n_generated = record.tokens.size();
    out->finished = record.finish != MC_FINISH_NONE;
    out->finish_reason = record.finish;
    out->stop_token = record.stop_token;
  });
}

mc_status mc_request_read_logprobs(mc_engine* engine, uint64_t id, float* logprobs, size_t capacity, size_t* n_read) {
  return guarded([&] {
    check_engine(engine);
    check_not_null(n_read, "n_read");
    if (capacity > 0) check_not_null(logprobs, "logprobs");
    std::lock_guard<std::mutex> lock(engine->mutex);
    const RequestRecord& record = find_request(engine, id);
    if (record.n_logprobs < 0)
      fail_with(MC_ERR_INVALID_ARGUMENT, "request ", id, " was added with logprobs = -1: no logprobs were computed");
    const size_t n = std::min(capacity, record.logprobs.size());
    if (n > 0) std::memcpy(logprobs, record.logprobs.data(), n * sizeof(float));
    *n_read = n;
  });
}

mc_status mc_request_read_top_logprobs(mc_engine* engine, uint64_t id, size_t index, int32_t* ids, float* logprobs,
                                       size_t capacity, size_t* n_read) {
  return guarded([&] {
    check_engine(engine);
    check_not_null(n_read, "n_read");
    if (capacity > 0) {
      check_not_null(ids, "ids");
      check_not_null(logprobs, "logprobs");
    }
    std::lock_guard<std::mutex> lock(engine->mutex);
    const RequestRecord& record = find_request(engine, id);
    if (record.n_logprobs < 0)
      fail_with(MC_ERR_INVALID_ARGUMENT, "request ", id, " was added with logprobs = -1: no logprobs were computed");
    if (index >= record.top.size())
      fail_with(MC_ERR_INVALID_ARGUMENT, "token index ", index, " is beyond the ", record.top.size(),
                " tokens generated");
    const auto& top = record.top[index];
    const size_t n = std::min(capacity, top.size());
    for (size_t i = 0; i < n; ++i) {
      ids[i] = top[i].first;
      logprobs[i] = top[i].second;
    }
    *n_read = n;
  });
}

mc_status mc_request_cancel(mc_engine* engine, uint64_t id) {
  return guarded([&] {
    check_engine(engine);
    std::lock_guard<std::mutex> lock(engine->mutex);
    RequestRecord& record = find_request(engine, id);
    if (record.finish != MC_FINISH_NONE) return;
    engine->scheduler->abort(id);
    record.finish = MC_FINISH_ABORT;
  });
}

mc_status mc_request_release(mc_engine* engine, uint64_t id) {
  return guarded([&] {
    check_engine(engine);
    std::lock_guard<std::mutex> lock(engine->mutex);
    const RequestRecord& record = find_request(engine, id);
    if (record.finish == MC_FINISH_NONE) engine->scheduler->abort(id);
    engine->requests.erase(id);
  });
}

}  // extern "C"
