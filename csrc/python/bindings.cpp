// pybind11 bindings: translation only (Python values <-> core types, core errors -> Python
// exceptions, logits -> torch tensors). No model logic lives here.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/checkpoint.h"
#include "core/error.h"
#include "cuda/cuda_backend.h"
#include "runtime/model.h"
#include "runtime/scheduler.h"

namespace py = pybind11;

void bind_ops(py::module_& m);  // bind_ops.cpp

namespace {

struct ErrorTypes {
  PyObject* base = nullptr;
  PyObject* invalid_request = nullptr;
  PyObject* checkpoint = nullptr;
  PyObject* not_found = nullptr;
  PyObject* cache_full = nullptr;
  PyObject* unsupported = nullptr;
};
ErrorTypes error_types;

PyObject* add_error(py::module_& m, const char* name, std::initializer_list<PyObject*> bases, const char* doc) {
  py::tuple base_tuple(bases.size());
  size_t i = 0;
  for (PyObject* base : bases) base_tuple[i++] = py::reinterpret_borrow<py::object>(base);
  std::string qualified = std::string("mistral_cuda.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base_tuple.ptr(), nullptr);
  if (type == nullptr) throw py::error_already_set();
  m.add_object(name, py::handle(type));
  return type;
}

void register_errors(py::module_& m) {
  ErrorTypes& t = error_types;
  t.base = add_error(m, "Error", {PyExc_Exception}, "Base class of mistral_cuda errors.");
  t.invalid_request = add_error(m, "InvalidRequestError", {t.base, PyExc_ValueError},
                                "Bad arguments: token ids, sequence ids, sizes.");
  t.checkpoint = add_error(m, "CheckpointError", {t.base, PyExc_ValueError},
                           "A model directory, config or safetensors file that is wrong.");
  t.not_found = add_error(m, "ModelNotFoundError", {t.base, PyExc_FileNotFoundError},
                          "A model directory or file that does not exist.");
  t.cache_full = add_error(m, "CacheFullError", {t.base, PyExc_RuntimeError}, "No free KV-cache block left.");
  t.unsupported = add_error(m, "UnsupportedError", {t.base, PyExc_NotImplementedError},
                            "Valid input this build cannot serve.");
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const mc::Error& e) {
      PyObject* type = error_types.base;
      switch (e.kind()) {
        case mc::ErrorKind::kInvalidRequest: type = error_types.invalid_request; break;
        case mc::ErrorKind::kCheckpoint: type = error_types.checkpoint; break;
        case mc::ErrorKind::kFileNotFound: type = error_types.not_found; break;
        case mc::ErrorKind::kCacheFull: type = error_types.cache_full; break;
        case mc::ErrorKind::kOutOfMemory: type = PyExc_MemoryError; break;
        case mc::ErrorKind::kUnsupported: type = error_types.unsupported; break;
      }
      // Messages quote file contents (tensor names, dtypes), which need not be UTF-8.
      const std::string message = e.what();
      PyObject* text = PyUnicode_DecodeUTF8(message.data(), static_cast<Py_ssize_t>(message.size()), "replace");
      if (text != nullptr) {  // else decoding failed and set its own error (MemoryError)
        PyErr_SetObject(type, text);
        Py_DECREF(text);
      }
    }
  });
}

std::string config_repr(const mc::ModelConfig& c) {
  return mc::str_cat("ModelConfig(dim=", c.dim, ", n_layers=", c.n_layers, ", n_heads=", c.n_heads,
                     ", n_kv_heads=", c.n_kv_heads, ", head_dim=", c.head_dim, ", hidden_dim=", c.hidden_dim,
                     ", vocab_size=", c.vocab_size, ", norm_eps=", c.norm_eps, ", rope_theta=", c.rope_theta,
                     ", sliding_window=", c.sliding_window ? std::to_string(*c.sliding_window) : "None",
                     ", max_seq_len=", c.max_seq_len, ", n_experts=", c.n_experts,
                     ", n_experts_per_tok=", c.n_experts_per_tok, ")");
}

// The config of a loaded model, as Python sees it: a ModelConfig whose fields cannot be set,
// so nothing on the Python side can change what the C++ runner sized its buffers from.
struct FrozenModelConfig : mc::ModelConfig {
  explicit FrozenModelConfig(const mc::ModelConfig& config) : mc::ModelConfig(config) {}
};

template <typename Field>
void frozen_field(py::class_<FrozenModelConfig, mc::ModelConfig>& cls, const char* name, Field mc::ModelConfig::*field) {
  std::string field_name = name;
  cls.def_property(
      name, [field](const FrozenModelConfig& c) { return c.*field; },
      [field_name](FrozenModelConfig&, py::object) {
        throw py::attribute_error("the config of a loaded model is read-only: cannot set '" + field_name +
                                  "' (build a ModelConfig, e.g. ModelConfig.preset(...), and load a new model)");
      });
}

// Python's progress callable, called with the GIL held; an exception it raises (Ctrl-C's
// KeyboardInterrupt included) propagates through the loader and cancels the load.
mc::ProgressFn progress_fn(py::object progress) {
  if (progress.is_none()) return {};
  return [progress](int64_t done, int64_t total) {
    py::gil_scoped_acquire gil;
    progress(done, total);
  };
}

std::unique_ptr<mc::Model> load_model(const std::string& model_dir, const mc::ModelOptions& options) {
  py::gil_scoped_release no_gil;
  return mc::Model::load(model_dir, options);
}

std::unique_ptr<mc::Model> model_from_config(const mc::ModelConfig& config, uint64_t seed,
                                             const mc::ModelOptions& options) {
  py::gil_scoped_release no_gil;
  return mc::Model::from_config(config, seed, options);
}

py::list step(mc::Model& model, const std::vector<std::pair<int32_t, std::vector<int64_t>>>& entries, bool all_logits) {
  std::vector<mc::StepEntry> steps;
  steps.reserve(entries.size());
  for (const auto& [seq, tokens] : entries) steps.push_back({seq, tokens});
  const int64_t vocab = model.config().vocab_size;
  py::array_t<float> logits({mc::Model::logit_rows(steps, all_logits), vocab});
  float* out = logits.mutable_data();
  {
    py::gil_scoped_release no_gil;
    model.step(steps, all_logits, out);
  }
  // Per-entry views of the one buffer: [vocab] for the last token, [n_tokens, vocab] for all.
  py::object from_numpy = py::module_::import("torch").attr("from_numpy");
  py::list result;
  int64_t row = 0;
  for (const mc::StepEntry& entry : steps) {
    if (all_logits) {
      const auto rows = static_cast<int64_t>(entry.tokens.size());
      result.append(from_numpy(logits[py::slice(row, row + rows, 1)]));
      row += rows;
    } else {
      result.append(from_numpy(logits[py::int_(row)]));
      row += 1;
    }
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mistral_cuda C++ core";
  register_errors(m);

  py::class_<mc::ModelConfig>(m, "ModelConfig")
      .def(py::init<>())
      .def_readwrite("dim", &mc::ModelConfig::dim)
      .def_readwrite("n_layers", &mc::ModelConfig::n_layers)
      .def_readwrite("n_heads", &mc::ModelConfig::n_heads)
      .def_readwrite("n_kv_heads", &mc::ModelConfig::n_kv_heads)
      .def_readwrite("head_dim", &mc::ModelConfig::head_dim)
      .def_readwrite("hidden_dim", &mc::ModelConfig::hidden_dim)
      .def_readwrite("vocab_size", &mc::ModelConfig::vocab_size)
      .def_readwrite("norm_eps", &mc::ModelConfig::norm_eps)
      .def_readwrite("rope_theta", &mc::ModelConfig::rope_theta)
      .def_readwrite("sliding_window", &mc::ModelConfig::sliding_window)
      .def_readwrite("max_seq_len", &mc::ModelConfig::max_seq_len)
      .def_readwrite("n_experts", &mc::ModelConfig::n_experts)
      .def_readwrite("n_experts_per_tok", &mc::ModelConfig::n_experts_per_tok)
      .def_readwrite("tie_embeddings", &mc::ModelConfig::tie_embeddings)
      .def("validate", &mc::ModelConfig::validate)
      .def_static("preset", &mc::ModelConfig::preset, py::arg("name"),
                  "Published shapes: mistral-7b-v0.1, mistral-7b-v0.3, mixtral-8x7b.")
      .def_static("from_dir", &mc::read_model_config, py::arg("model_dir"),
                  "Reads config.json (Hugging Face) or params.json (Mistral) of a model directory.")
      .def("__repr__", &config_repr);

  py::class_<FrozenModelConfig, mc::ModelConfig> frozen(m, "FrozenModelConfig",
                                                           "The read-only config of a loaded model.");
  frozen_field(frozen, "dim", &mc::ModelConfig::dim);
  frozen_field(frozen, "n_layers", &mc::ModelConfig::n_layers);
  frozen_field(frozen, "n_heads", &mc::ModelConfig::n_heads);
  frozen_field(frozen, "n_kv_heads", &mc::ModelConfig::n_kv_heads);
  frozen_field(frozen, "head_dim", &mc::ModelConfig::head_dim);
  frozen_field(frozen, "hidden_dim", &mc::ModelConfig::hidden_dim);
  frozen_field(frozen, "vocab_size", &mc::ModelConfig::vocab_size);
  frozen_field(frozen, "norm_eps", &mc::ModelConfig::norm_eps);
  frozen_field(frozen, "rope_theta", &mc::ModelConfig::rope_theta);
  frozen_field(frozen, "sliding_window", &mc::ModelConfig::sliding_window);
  frozen_field(frozen, "max_seq_len", &mc::ModelConfig::max_seq_len);
  frozen_field(frozen, "n_experts", &mc::ModelConfig::n_experts);
  frozen_field(frozen, "n_experts_per_tok", &mc::ModelConfig::n_experts_per_tok);
  frozen_field(frozen, "tie_embeddings", &mc::ModelConfig::tie_embeddings);

  py::class_<mc::ModelOptions>(m, "ModelOptions", "How a model is loaded and run (see Engine.from_pretrained).")
      .def(py::init<>())
      .def_readwrite("device", &mc::ModelOptions::device)
      .def_property(
          "dtype",
          [](const mc::ModelOptions& o) -> std::optional<std::string> {
            if (!o.dtype) return std::nullopt;
            return std::string(mc::dtype_name(*o.dtype));
          },
          [](mc::ModelOptions& o, std::optional<std::string> name) {
            o.dtype = name ? std::optional<mc::DType>(mc::parse_dtype(*name)) : std::nullopt;
          })
      .def_property(
          "quantization",
          [](const mc::ModelOptions& o) -> std::optional<std::string> {
            if (!o.quantization) return std::nullopt;
            return std::string(mc::weight_format_name(*o.quantization));
          },
          [](mc::ModelOptions& o, std::optional<std::string> name) {
            o.quantization = name ? std::optional<mc::WeightFormat>(mc::parse_quantization(*name)) : std::nullopt;
          },
          "None | 'int8' | 'int4': quantize the layer matrices at load")
      .def_readwrite("quantize_activations", &mc::ModelOptions::quantize_activations)
      .def_readwrite("block_size", &mc::ModelOptions::block_size)
      .def_readwrite("num_blocks", &mc::ModelOptions::num_blocks)
      .def_readwrite("mmap", &mc::ModelOptions::use_mmap)
      .def_readwrite("max_step_tokens", &mc::ModelOptions::max_step_tokens)
      .def_readwrite("max_step_seqs", &mc::ModelOptions::max_step_seqs)
      .def_property(
          "progress", [](const mc::ModelOptions&) { return py::none(); },
          [](mc::ModelOptions& o, py::object progress) { o.progress = progress_fn(progress); },
          "progress(done_bytes, total_bytes), called while weights load (write-only)");

  py::class_<mc::Model>(m, "Model")
      .def_static("load", &load_model, py::arg("model_dir"), py::arg("options") = mc::ModelOptions())
      .def_static("from_config", &model_from_config, py::arg("config"), py::arg("seed") = 0,
                  py::arg("options") = mc::ModelOptions())
      .def_property_readonly("config", [](const mc::Model& m) { return FrozenModelConfig(m.config()); })
      .def_static(
          "default_num_blocks",
          [](const mc::ModelConfig& config, int32_t block_size, const std::string& kv_dtype) {
            return mc::Model::default_num_blocks(config, block_size, mc::parse_dtype(kv_dtype));
          },
          py::arg("config"), py::arg("block_size"), py::arg("kv_dtype"),
          "The default KV pool size: four full-length sequences, capped near 8 GiB of K/V.")
      .def_property_readonly("device", &mc::Model::device)
      .def_property_readonly("dtype", [](const mc::Model& m) { return std::string(mc::dtype_name(m.dtype())); })
      .def_property_readonly("quantization",
                             [](const mc::Model& m) -> std::optional<std::string> {
                               if (m.quantization().empty()) return std::nullopt;
                               return m.quantization();
                             })
      .def_property_readonly("block_size", &mc::Model::block_size)
      .def("num_blocks", &mc::Model::num_blocks, "Blocks in the KV pool.")
      .def("free_blocks", &mc::Model::free_blocks, "Blocks of the KV pool no sequence holds.")
      .def_property_readonly("max_step_tokens", [](const mc::Model& m) { return m.step_limits().max_tokens; })
      .def("add_sequence", &mc::Model::add_sequence)
      .def("free_sequence", &mc::Model::free_sequence, py::arg("seq"))
      .def("blocks_in_use", &mc::Model::blocks_in_use, py::arg("seq"))
      .def("sequence_length", &mc::Model::sequence_length, py::arg("seq"))
      .def("step", &step, py::arg("entries"), py::arg("all_logits") = false,
           "Runs one forward step over [(seq, token_ids), ...]; returns one float32 tensor per entry.");

  py::class_<mc::RequestParams>(m, "RequestParams", "One request's sampling and stopping, as the core sees it.")
      .def(py::init<>())
      .def_property(
          "temperature", [](const mc::RequestParams& p) { return p.controls.temperature; },
          [](mc::RequestParams& p, float v) { p.controls.temperature = v; })
      .def_property(
          "top_k", [](const mc::RequestParams& p) { return p.controls.top_k; },
          [](mc::RequestParams& p, int32_t v) { p.controls.top_k = v; })
      .def_property(
          "top_p", [](const mc::RequestParams& p) { return p.controls.top_p; },
          [](mc::RequestParams& p, float v) { p.controls.top_p = v; })
      .def_property(
          "min_p", [](const mc::RequestParams& p) { return p.controls.min_p; },
          [](mc::RequestParams& p, float v) { p.controls.min_p = v; })
      .def_property(
          "repetition_penalty", [](const mc::RequestParams& p) { return p.controls.repetition_penalty; },
          [](mc::RequestParams& p, float v) { p.controls.repetition_penalty = v; })
      .def_property(
          "presence_penalty", [](const mc::RequestParams& p) { return p.controls.presence_penalty; },
          [](mc::RequestParams& p, float v) { p.controls.presence_penalty = v; })
      .def_property(
          "frequency_penalty", [](const mc::RequestParams& p) { return p.controls.frequency_penalty; },
          [](mc::RequestParams& p, float v) { p.controls.frequency_penalty = v; })
      .def_property(
          "vocab_limit", [](const mc::RequestParams& p) { return p.controls.vocab_limit; },
          [](mc::RequestParams& p, int32_t v) { p.controls.vocab_limit = v; })
      .def_property(
          "seed", [](const mc::RequestParams& p) { return p.controls.seed; },
          [](mc::RequestParams& p, uint64_t v) { p.controls.seed = v; })
      .def_property(
          "stream", [](const mc::RequestParams& p) { return p.controls.stream; },
          [](mc::RequestParams& p, uint64_t v) { p.controls.stream = v; })
      .def_property(
          "logprobs", [](const mc::RequestParams& p) { return p.controls.n_logprobs; },
          [](mc::RequestParams& p, int32_t v) { p.controls.n_logprobs = v; })
      .def_readwrite("logit_bias", &mc::RequestParams::logit_bias)
      .def_readwrite("max_tokens", &mc::RequestParams::max_tokens)
      .def_readwrite("min_tokens", &mc::RequestParams::min_tokens)
      .def_readwrite("stop_token_ids", &mc::RequestParams::stop_token_ids)
      .def_readwrite("eos_id", &mc::RequestParams::eos_id)
      .def_readwrite("ignore_eos", &mc::RequestParams::ignore_eos);

  py::class_<mc::Scheduler>(m, "Scheduler", "Continuous batching over a Model (runtime/scheduler.h).")
      .def(py::init([](mc::Model& model, int32_t max_num_seqs, int32_t max_num_batched_tokens) {
             mc::SchedulerOptions options;
             options.max_num_seqs = max_num_seqs;
             options.max_num_batched_tokens = max_num_batched_tokens;
             return std::make_unique<mc::Scheduler>(model, options);
           }),
           py::arg("model"), py::arg("max_num_seqs") = 64, py::arg("max_num_batched_tokens") = 2048,
           py::keep_alive<1, 2>())
      .def("add", &mc::Scheduler::add, py::arg("prompt"), py::arg("params"))
      .def("add_group", &mc::Scheduler::add_group, py::arg("prompt"), py::arg("params"),
           "The n samples of one prompt sharing its prefill: [request_id, ...]")
      .def("abort", &mc::Scheduler::abort, py::arg("request_id"))
      .def(
          "step",
          [](mc::Scheduler& s) {
            std::vector<mc::RequestUpdate> updates;
            {
              py::gil_scoped_release no_gil;
              updates = s.step();
            }
            // (request id, token, logprob, rank, top [(id, logprob)], finish reason, stop token)
            py::list out;
            for (const mc::RequestUpdate& u : updates)
              for (const mc::SampledToken& t : u.tokens)
                out.append(py::make_tuple(u.id, t.token, t.logprob, t.rank, t.top, mc::finish_reason_name(u.finish),
                                          u.stop_token));
            return out;
          },
          "One iteration: [(request_id, token, logprob, rank, top, finish_reason, stop_token), ...]")
      .def("has_unfinished", &mc::Scheduler::has_unfinished)
      .def_property_readonly("next_request_id", &mc::Scheduler::next_request_id)
      .def_property_readonly("num_running", &mc::Scheduler::num_running)
      .def_property_readonly("num_waiting", &mc::Scheduler::num_waiting)
      .def_property_readonly("stats", [](const mc::Scheduler& s) {
        const mc::SchedulerStats& st = s.stats();
        py::dict d;
        d["steps"] = st.steps;
        d["preemptions"] = st.preemptions;
        d["last_step_seconds"] = st.last_step_seconds;
        d["last_forward_seconds"] = st.last_forward_seconds;
        d["last_batch_tokens"] = st.last_batch_tokens;
        d["last_batch_seqs"] = st.last_batch_seqs;
        return d;
      });

  bind_ops(m);
  m.def("cuda_device_count", &mc::cuda::device_count);
  m.def("cuda_compiled", &mc::cuda::compiled);
}
