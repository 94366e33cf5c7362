// pybind11 bindings: translation only (Python values <-> core types, core errors -> Python
// exceptions, logits -> torch tensors). No model logic lives here.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/checkpoint.h"
#include "core/device.h"
#include "core/error.h"
#include "core/model.h"

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

mc::ModelOptions model_options(const std::string& device, const std::optional<std::string>& dtype, int32_t block_size,
                               int64_t num_blocks, py::object progress) {
  mc::ModelOptions options;
  options.device = device;
  if (dtype) options.dtype = mc::parse_dtype(*dtype);
  options.block_size = block_size;
  options.num_blocks = num_blocks;
  if (!progress.is_none()) {
    options.progress = [progress](int64_t done, int64_t total) {
      py::gil_scoped_acquire gil;
      progress(done, total);
    };
  }
  return options;
}

std::unique_ptr<mc::Model> load_model(const std::string& model_dir, const std::string& device,
                                      const std::optional<std::string>& dtype, int32_t block_size, int64_t num_blocks,
                                      py::object progress, bool mmap) {
  mc::ModelOptions options = model_options(device, dtype, block_size, num_blocks, progress);
  options.use_mmap = mmap;
  py::gil_scoped_release no_gil;
  return mc::Model::load(model_dir, options);
}

std::unique_ptr<mc::Model> model_from_config(const mc::ModelConfig& config, const std::string& device,
                                             const std::optional<std::string>& dtype, uint64_t seed,
                                             int32_t block_size, int64_t num_blocks) {
  mc::ModelOptions options = model_options(device, dtype, block_size, num_blocks, py::none());
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

  py::class_<mc::Model>(m, "Model")
      .def_static("load", &load_model, py::arg("model_dir"), py::arg("device") = "cpu", py::arg("dtype") = py::none(),
                  py::arg("block_size") = 16, py::arg("num_blocks") = 0, py::arg("progress") = py::none(), py::arg("mmap") = true)
      .def_static("from_config", &model_from_config, py::arg("config"), py::arg("device") = "cpu",
                  py::arg("dtype") = py::none(), py::arg("seed") = 0, py::arg("block_size") = 16,
                  py::arg("num_blocks") = 0)
      .def_property_readonly("config", &mc::Model::config)
      .def_property_readonly("device", &mc::Model::device)
      .def_property_readonly("dtype", [](const mc::Model& m) { return std::string(mc::dtype_name(m.dtype())); })
      .def_property_readonly("block_size", &mc::Model::block_size)
      .def_property_readonly("num_blocks", &mc::Model::num_blocks)
      .def_property_readonly("free_blocks", &mc::Model::free_blocks)
      .def("add_sequence", &mc::Model::add_sequence)
      .def("free_sequence", &mc::Model::free_sequence, py::arg("seq"))
      .def("blocks_in_use", &mc::Model::blocks_in_use, py::arg("seq"))
      .def("sequence_length", &mc::Model::sequence_length, py::arg("seq"))
      .def("step", &step, py::arg("entries"), py::arg("all_logits") = false,
           "Runs one forward step over [(seq, token_ids), ...]; returns one float32 tensor per entry.");

  bind_ops(m);
  m.def("cuda_device_count", &mc::cuda_device_count);
  m.def("cuda_compiled", &mc::cuda_compiled);
}
