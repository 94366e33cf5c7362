// Bindings of single backend ops (mistral_cuda._C.ops), for the backend-comparison tests and
// benches: each op of core/backend.h, on the CPU or the CUDA backend, through the very op table
// the runtime calls. Translation only: torch tensors arrive as objects (their data pointer,
// dtype, shape and device read here, contiguity checked), are wrapped in the op's Params struct
// and passed to the backend. mistral_cuda/testing.py allocates outputs and is the API to call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/kv_layout.h"
#include "core/op_params.h"
#include "core/quantized.h"
#include "cpu/cpu_backend.h"
#include "cuda/cuda_backend.h"

namespace py = pybind11;

namespace {

// A torch tensor's memory, as the ops see it.
struct TensorArg {
  void* data = nullptr;
  mc::DType dtype = mc::DType::kF32;
  std::string scalar;  // torch's dtype name without "torch."
  std::vector<int64_t> shape;
  bool cuda = false;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

TensorArg tensor_arg(py::handle t, const char* name) {
  if (!py::hasattr(t, "data_ptr") || !py::hasattr(t, "is_contiguous"))
    throw py::type_error(std::string(name) + " must be a torch.Tensor");
  if (!t.attr("is_contiguous")().cast<bool>()) throw py::value_error(std::string(name) + " must be contiguous");
  TensorArg arg;
  arg.data = reinterpret_cast<void*>(t.attr("data_ptr")().cast<uintptr_t>());
  arg.scalar = py::str(t.attr("dtype")).cast<std::string>();
  if (arg.scalar.rfind("torch.", 0) == 0) arg.scalar = arg.scalar.substr(6);
  if (arg.scalar == "float32") arg.dtype = mc::DType::kF32;
  else if (arg.scalar == "bfloat16") arg.dtype = mc::DType::kBF16;
  else if (arg.scalar == "float16") arg.dtype = mc::DType::kF16;
  arg.shape = t.attr("shape").cast<std::vector<int64_t>>();
  arg.cuda = py::str(t.attr("device").attr("type")).cast<std::string>() == "cuda";
  return arg;
}

void* optional_data(py::handle t, const char* name) { return t.is_none() ? nullptr : tensor_arg(t, name).data; }

// A weight argument: a float tensor [N, K] / [E, N, K], or a mistral_cuda.testing.QuantizedWeight
// (its `format`, `shape`, `group_size` and tensors `data`, `scales`, `zeros`, `col_perm`).
mc::WeightRef weight_ref(py::handle w, const char* name) {
  if (!py::hasattr(w, "format")) {
    TensorArg t = tensor_arg(w, name);
    return mc::WeightRef::of(mc::Tensor::view(t.data, t.dtype, t.shape));
  }
  mc::WeightRef ref;
  ref.format = mc::parse_quantization(w.attr("format").cast<std::string>());
  const auto shape = w.attr("shape").cast<std::vector<int64_t>>();
  ref.count = shape.size() == 3 ? shape[0] : 1;
  ref.rows = shape.at(shape.size() - 2);
  ref.cols = shape.back();
  ref.data = tensor_arg(w.attr("data"), "data").data;
  ref.scales = tensor_arg(w.attr("scales"), "scales").data;
  ref.zeros = optional_data(w.attr("zeros"), "zeros");
  ref.col_perm = static_cast<const int32_t*>(optional_data(w.attr("col_perm"), "col_perm"));
  ref.group_size = w.attr("group_size").cast<int32_t>();
  ref.quantize_activations = py::getattr(w, "quantize_activations", py::bool_(false)).cast<bool>();
  return ref;
}

// Quantizes a float matrix with the load-time rules (core/quantized.h) into the caller's
// (CPU, right-sized) data / scales / zeros tensors.
void quantize(py::object w, const std::string& format, int32_t group_size, py::object data, py::object scales,
              py::object zeros) {
  TensorArg t = tensor_arg(w, "w");
  mc::QuantizedMatrix q = mc::quantize(mc::Tensor::view(t.data, t.dtype, t.shape), mc::parse_quantization(format),
                                       group_size);
  std::memcpy(tensor_arg(data, "data").data, q.data.get(), q.data_bytes());
  std::memcpy(tensor_arg(scales, "scales").data, q.scales.get(), q.scales_bytes());
  if (q.zeros) std::memcpy(tensor_arg(zeros, "zeros").data, q.zeros.get(), q.zeros_bytes());
}

// One backend and the scratch its ops were last given.
class OpBackend {
 public:
  explicit OpBackend(const std::string& device)
      : device_(device), backend_(device == "cuda" ? mc::cuda::make_backend() : mc::cpu::make_backend()) {
    if (device != "cpu" && device != "cuda")
      mc::fail(mc::ErrorKind::kInvalidRequest, "unknown backend '", device, "' (expected 'cpu' or 'cuda')");
  }
  mc::Backend& get() { return *backend_; }
  const std::string& device() const { return device_; }
  void* scratch(size_t bytes) {
    if (bytes > scratch_bytes_) {
      scratch_ = backend_->allocate(bytes);
      scratch_bytes_ = bytes;
    }
    return scratch_.get();
  }

 private:
  std::string device_;
  std::unique_ptr<mc::Backend> backend_;
  std::shared_ptr<void> scratch_;
  size_t scratch_bytes_ = 0;
};

// The paged-KV view of a step, with its bounds planned from host copies of the index arrays.
struct PagedKv {
  mc::PagedKvView view;
  py::object keep_alive;  // the tensors the view points into
};

PagedKv make_paged_kv(py::object block_tables, py::object cu_seqlens, py::object start_pos, int32_t block_size,
                      int64_t window, const std::vector<int32_t>& host_cu_seqlens,
                      const std::vector<int64_t>& host_start_pos) {
  TensorArg tables = tensor_arg(block_tables, "block_tables");
  if (tables.shape.size() != 2) throw py::value_error("block_tables must be [n_entries, max_blocks]");
  if (host_cu_seqlens.size() != host_start_pos.size() + 1 || host_start_pos.size() != static_cast<size_t>(tables.shape[0]))
    throw py::value_error("host_cu_seqlens must have n_entries + 1 values and host_start_pos n_entries");
  PagedKv kv;
  kv.view.block_tables = static_cast<const int32_t*>(tables.data);
  kv.view.cu_seqlens = static_cast<const int32_t*>(tensor_arg(cu_seqlens, "cu_seqlens").data);
  kv.view.start_pos = static_cast<const int64_t*>(tensor_arg(start_pos, "start_pos").data);
  kv.view.n_entries = static_cast<int32_t>(tables.shape[0]);
  kv.view.max_blocks = static_cast<int32_t>(tables.shape[1]);
  kv.view.layout = mc::KvLayout::make(block_size, window);
  kv.view.plan_from_host(host_cu_seqlens.data(), host_start_pos.data());
  kv.keep_alive = py::make_tuple(block_tables, cu_seqlens, start_pos);
  return kv;
}

void embedding(OpBackend& b, py::object table, py::object ids, py::object out) {
  TensorArg t = tensor_arg(table, "table");
  mc::EmbeddingParams p;
  p.table = mc::WeightRef::of(mc::Tensor::view(t.data, t.dtype, t.shape));
  p.ids = static_cast<const int32_t*>(tensor_arg(ids, "ids").data);
  TensorArg o = tensor_arg(out, "out");
  p.out = static_cast<float*>(o.data);
  p.n_tokens = o.shape.at(0);
  b.get().embedding(p);
}

void rms_norm(OpBackend& b, py::object residual, py::object weight, py::object out, py::object delta,
              py::object rows, float eps) {
  TensorArg r = tensor_arg(residual, "residual");
  TensorArg o = tensor_arg(out, "out");
  mc::RmsNormParams p;
  p.residual = static_cast<float*>(r.data);
  p.weight = tensor_arg(weight, "weight").data;
  p.out = o.data;
  p.delta = optional_data(delta, "delta");
  p.rows = static_cast<const int32_t*>(optional_data(rows, "rows"));
  p.n_tokens = r.shape.at(0);
  p.n_rows = o.shape.at(0);
  p.dim = r.shape.at(1);
  p.eps = eps;
  p.dtype = o.dtype;
  b.get().rms_norm(p);
}

void linear(OpBackend& b, py::object x, py::object w, py::object y) {
  TensorArg xa = tensor_arg(x, "x"), ya = tensor_arg(y, "y");
  mc::LinearParams p;
  p.x = xa.data;
  p.w = weight_ref(w, "w");
  p.y = ya.data;
  p.n_tokens = xa.shape.at(0);
  p.x_dtype = xa.dtype;
  p.y_dtype = ya.dtype;
  b.get().linear(p);
}

void qkv_rope(OpBackend& b, py::object qkv, py::object q, py::object k, py::object v, py::object positions,
              py::object inv_freq) {
  TensorArg qa = tensor_arg(q, "q"), ka = tensor_arg(k, "k");
  mc::QkvRopeParams p;
  p.qkv = tensor_arg(qkv, "qkv").data;
  p.q = qa.data;
  p.k = ka.data;
  p.v = tensor_arg(v, "v").data;
  p.positions = static_cast<const int64_t*>(tensor_arg(positions, "positions").data);
  p.inv_freq = static_cast<const float*>(tensor_arg(inv_freq, "inv_freq").data);
  p.n_tokens = qa.shape.at(0);
  p.n_heads = static_cast<int32_t>(qa.shape.at(1));
  p.n_kv_heads = static_cast<int32_t>(ka.shape.at(1));
  p.head_dim = static_cast<int32_t>(qa.shape.at(2));
  p.dtype = qa.dtype;
  b.get().qkv_rope(p);
}

// q [T, H, Dh], k_new/v_new [T, KVH, Dh], pools [num_blocks, block_size, KVH, Dh], out like q.
void attention(OpBackend& b, py::object q, py::object k_new, py::object v_new, py::object k_pool,
               py::object v_pool, const PagedKv& kv, py::object out) {
  TensorArg qa = tensor_arg(q, "q"), ka = tensor_arg(k_new, "k_new");
  mc::AttentionParams p;
  mc::AttentionParamsT<void>& t = p.tensors;
  t.q = qa.data;
  t.k_new = ka.data;
  t.v_new = tensor_arg(v_new, "v_new").data;
  t.k_pool = tensor_arg(k_pool, "k_pool").data;
  t.v_pool = tensor_arg(v_pool, "v_pool").data;
  t.out = tensor_arg(out, "out").data;
  t.kv = kv.view;
  t.n_heads = static_cast<int32_t>(qa.shape.at(1));
  t.n_kv_heads = static_cast<int32_t>(ka.shape.at(1));
  t.head_dim = static_cast<int32_t>(qa.shape.at(2));
  t.scale = mc::attention_scale(t.head_dim);
  p.dtype = qa.dtype;
  p.n_tokens = kv.view.n_tokens;
  p.max_query_len = kv.view.max_query_len();
  p.max_context = kv.view.max_context();
  mc::ModelConfig shape;
  shape.n_heads = t.n_heads;
  shape.n_kv_heads = t.n_kv_heads;
  shape.head_dim = t.head_dim;
  mc::StepLimits limits;
  limits.max_tokens = kv.view.n_tokens;
  limits.max_entries = kv.view.n_entries;
  limits.max_context = p.max_context;
  p.workspace = b.scratch(b.get().attention_workspace_bytes(shape, limits, p.dtype));
  b.get().attention(p);
}

void kv_append(OpBackend& b, py::object k, py::object v, py::object k_pool, py::object v_pool, const PagedKv& kv) {
  TensorArg ka = tensor_arg(k, "k");
  mc::KvAppendParams p;
  p.tensors.k = ka.data;
  p.tensors.v = tensor_arg(v, "v").data;
  p.tensors.k_pool = tensor_arg(k_pool, "k_pool").data;
  p.tensors.v_pool = tensor_arg(v_pool, "v_pool").data;
  p.tensors.kv = kv.view;
  p.tensors.n_kv_heads = static_cast<int32_t>(ka.shape.at(1));
  p.tensors.head_dim = static_cast<int32_t>(ka.shape.at(2));
  p.dtype = ka.dtype;
  b.get().kv_append(p);
}

void silu_mul(OpBackend& b, py::object gate_up, py::object out) {
  TensorArg o = tensor_arg(out, "out");
  mc::SiluMulParams p;
  p.gate_up = tensor_arg(gate_up, "gate_up").data;
  p.out = o.data;
  p.n_tokens = o.shape.at(0);
  p.hidden = o.shape.at(1);
  p.dtype = o.dtype;
  b.get().silu_mul(p);
}

// x [T, D], router [E, D], w13 [E, 2F, D], w2 [E, D, F]; residual [T, D] f32 gets the output added.
void moe(OpBackend& b, py::object x, py::object router, py::object w13, py::object w2, py::object residual,
         int32_t top_k) {
  TensorArg xa = tensor_arg(x, "x"), ra = tensor_arg(router, "router");
  mc::MoeParams p;
  p.x = xa.data;
  p.router = mc::WeightRef::of(mc::Tensor::view(ra.data, ra.dtype, ra.shape));
  p.w13 = weight_ref(w13, "w13");
  p.w2 = weight_ref(w2, "w2");
  p.residual = static_cast<float*>(tensor_arg(residual, "residual").data);
  p.n_tokens = xa.shape.at(0);
  p.top_k = top_k;
  p.dtype = xa.dtype;
  mc::ModelConfig shape;
  shape.dim = xa.shape.at(1);
  shape.n_experts = p.w13.count;
  shape.hidden_dim = p.w2.cols;
  shape.n_experts_per_tok = top_k;
  mc::StepLimits limits;
  limits.max_tokens = static_cast<int32_t>(p.n_tokens);
  limits.max_entries = limits.max_tokens;
  p.workspace = b.scratch(b.get().moe_workspace_bytes(shape, limits, p.dtype));
  b.get().moe(p);
}

// The routing step of the moe op, for the routing tests: outputs written in place.
void moe_route(OpBackend& b, py::object router_logits, int32_t top_k, py::object expert_ids, py::object weights,
               py::object offsets, py::object sorted_pairs) {
  TensorArg logits = tensor_arg(router_logits, "router_logits");
  mc::MoeRouteParams p;
  p.router_logits = static_cast<const float*>(logits.data);
  p.expert_ids = static_cast<int32_t*>(tensor_arg(expert_ids, "expert_ids").data);
  p.weights = static_cast<float*>(tensor_arg(weights, "weights").data);
  p.expert_offsets = static_cast<int32_t*>(tensor_arg(offsets, "offsets").data);
  p.sorted_pairs = static_cast<int32_t*>(tensor_arg(sorted_pairs, "sorted_pairs").data);
  p.n_tokens = static_cast<int32_t>(logits.shape.at(0));
  p.n_experts = static_cast<int32_t>(logits.shape.at(1));
  p.top_k = top_k;
  b.get().moe_route(p);
}

// Row r of a sampling test: its controls and lists, as Python gives them.
struct SampleRow {
  mc::SamplingControls controls;
  std::vector<int32_t> history_ids;
  std::vector<int32_t> output_counts;
  std::vector<std::pair<int32_t, float>> logit_bias;
  std::vector<int32_t> banned;
};

// A device copy of `values` (the backend's memory), kept alive by `keep`.
template <typename T>
const T* to_device(OpBackend& b, const std::vector<T>& values, std::vector<std::shared_ptr<void>>& keep) {
  keep.push_back(b.get().allocate(std::max<size_t>(values.size() * sizeof(T), 16)));
  if (!values.empty()) b.get().copy_to_device(keep.back().get(), values.data(), values.size() * sizeof(T));
  return static_cast<const T*>(keep.back().get());
}

// The sampling op on logits [R, V] (f32, on the backend's device); returns, per row,
// (token, logprob, rank, [(id, logprob)] top n).
py::list sample(OpBackend& b, py::object logits, const std::vector<SampleRow>& rows) {
  TensorArg l = tensor_arg(logits, "logits");
  if (l.dtype != mc::DType::kF32 || l.shape.size() != 2 || l.shape[0] != static_cast<int64_t>(rows.size()))
    throw py::value_error("logits must be float32 [len(rows), vocab]");
  const auto R = static_cast<int32_t>(rows.size());
  std::vector<mc::SamplingControls> controls;
  std::vector<int32_t> history_offsets{0}, history_ids, output_counts, bias_offsets{0}, bias_ids, banned_offsets{0},
      banned_ids;
  std::vector<float> bias_values;
  for (const SampleRow& row : rows) {
    controls.push_back(row.controls);
    history_ids.insert(history_ids.end(), row.history_ids.begin(), row.history_ids.end());
    output_counts.insert(output_counts.end(), row.output_counts.begin(), row.output_counts.end());
    history_offsets.push_back(static_cast<int32_t>(history_ids.size()));
    for (const auto& [id, bias] : row.logit_bias) {
      bias_ids.push_back(id);
      bias_values.push_back(bias);
    }
    bias_offsets.push_back(static_cast<int32_t>(bias_ids.size()));
    banned_ids.insert(banned_ids.end(), row.banned.begin(), row.banned.end());
    banned_offsets.push_back(static_cast<int32_t>(banned_ids.size()));
  }
  if (output_counts.size() != history_ids.size()) throw py::value_error("each row needs one count per history id");
  std::vector<std::shared_ptr<void>> keep;
  mc::SampleParams p;
  p.logits = static_cast<const float*>(l.data);
  p.controls = to_device(b, controls, keep);
  p.history_offsets = to_device(b, history_offsets, keep);
  p.history_ids = to_device(b, history_ids, keep);
  p.output_counts = to_device(b, output_counts, keep);
  p.bias_offsets = to_device(b, bias_offsets, keep);
  p.bias_ids = to_device(b, bias_ids, keep);
  p.bias_values = to_device(b, bias_values, keep);
  p.banned_offsets = to_device(b, banned_offsets, keep);
  p.banned_ids = to_device(b, banned_ids, keep);
  p.n_rows = R;
  p.vocab = static_cast<int32_t>(l.shape[1]);
  p.max_logprobs = 20;
  std::vector<int32_t> tokens(R), ranks(R), top_ids(static_cast<size_t>(R) * p.max_logprobs);
  std::vector<float> logprobs(R), top_logprobs(static_cast<size_t>(R) * p.max_logprobs);
  auto out = [&](auto& host) {
    keep.push_back(b.get().allocate(std::max<size_t>(host.size() * sizeof(host[0]), 16)));
    return keep.back().get();
  };
  p.tokens = static_cast<int32_t*>(out(tokens));
  p.token_logprobs = static_cast<float*>(out(logprobs));
  p.token_ranks = static_cast<int32_t*>(out(ranks));
  p.top_ids = static_cast<int32_t*>(out(top_ids));
  p.top_logprobs = static_cast<float*>(out(top_logprobs));
  p.workspace = b.scratch(b.get().sample_workspace_bytes(R, p.vocab));
  b.get().sample(p);
  b.get().copy_to_host(tokens.data(), p.tokens, tokens.size() * 4);
  b.get().copy_to_host(logprobs.data(), p.token_logprobs, logprobs.size() * 4);
  b.get().copy_to_host(ranks.data(), p.token_ranks, ranks.size() * 4);
  b.get().copy_to_host(top_ids.data(), p.top_ids, top_ids.size() * 4);
  b.get().copy_to_host(top_logprobs.data(), p.top_logprobs, top_logprobs.size() * 4);
  b.get().synchronize();
  py::list result;
  for (int32_t r = 0; r < R; ++r) {
    py::list top;
    for (int32_t j = 0; j < std::min(rows[r].controls.n_logprobs, p.max_logprobs); ++j)
      top.append(py::make_tuple(top_ids[r * p.max_logprobs + j], top_logprobs[r * p.max_logprobs + j]));
    result.append(py::make_tuple(tokens[r], logprobs[r], ranks[r], top));
  }
  return result;
}

}  // namespace

void bind_ops(py::module_& m) {
  py::module_ ops = m.def_submodule("ops", "Single backend ops, for tests (see mistral_cuda.testing).");
  ops.attr("has_cuda") = mc::cuda::compiled();

  py::class_<PagedKv>(ops, "PagedKv", "The paged-KV view of one step (core/op_params.h PagedKvView).")
      .def(py::init(&make_paged_kv), py::arg("block_tables"), py::arg("cu_seqlens"), py::arg("start_pos"),
           py::arg("block_size"), py::arg("window"), py::arg("host_cu_seqlens"), py::arg("host_start_pos"))
      .def_property_readonly("n_decode", [](const PagedKv& kv) { return kv.view.n_decode; })
      .def_property_readonly("n_tokens", [](const PagedKv& kv) { return kv.view.n_tokens; });

  py::class_<SampleRow>(ops, "SampleRow", "One row of a sampling test (SamplingControls and its lists).")
      .def(py::init<>())
      .def_property("temperature", [](const SampleRow& r) { return r.controls.temperature; },
                    [](SampleRow& r, float v) { r.controls.temperature = v; })
      .def_property("top_k", [](const SampleRow& r) { return r.controls.top_k; },
                    [](SampleRow& r, int32_t v) { r.controls.top_k = v; })
      .def_property("top_p", [](const SampleRow& r) { return r.controls.top_p; },
                    [](SampleRow& r, float v) { r.controls.top_p = v; })
      .def_property("min_p", [](const SampleRow& r) { return r.controls.min_p; },
                    [](SampleRow& r, float v) { r.controls.min_p = v; })
      .def_property("repetition_penalty", [](const SampleRow& r) { return r.controls.repetition_penalty; },
                    [](SampleRow& r, float v) { r.controls.repetition_penalty = v; })
      .def_property("presence_penalty", [](const SampleRow& r) { return r.controls.presence_penalty; },
                    [](SampleRow& r, float v) { r.controls.presence_penalty = v; })
      .def_property("frequency_penalty", [](const SampleRow& r) { return r.controls.frequency_penalty; },
                    [](SampleRow& r, float v) { r.controls.frequency_penalty = v; })
      .def_property("vocab_limit", [](const SampleRow& r) { return r.controls.vocab_limit; },
                    [](SampleRow& r, int32_t v) { r.controls.vocab_limit = v; })
      .def_property("seed", [](const SampleRow& r) { return r.controls.seed; },
                    [](SampleRow& r, uint64_t v) { r.controls.seed = v; })
      .def_property("stream", [](const SampleRow& r) { return r.controls.stream; },
                    [](SampleRow& r, uint64_t v) { r.controls.stream = v; })
      .def_property("position", [](const SampleRow& r) { return r.controls.position; },
                    [](SampleRow& r, int64_t v) { r.controls.position = v; })
      .def_property("logprobs", [](const SampleRow& r) { return r.controls.n_logprobs; },
                    [](SampleRow& r, int32_t v) { r.controls.n_logprobs = v; })
      .def_readwrite("history_ids", &SampleRow::history_ids)
      .def_readwrite("output_counts", &SampleRow::output_counts)
      .def_readwrite("logit_bias", &SampleRow::logit_bias)
      .def_readwrite("banned", &SampleRow::banned);

  py::class_<OpBackend>(ops, "Backend", "A backend's op table: 'cpu' or 'cuda'.")
      .def(py::init<const std::string&>(), py::arg("device"))
      .def_property_readonly("device", &OpBackend::device)
      .def("synchronize", [](OpBackend& b) { b.get().synchronize(); })
      .def("embedding", &embedding, py::arg("table"), py::arg("ids"), py::arg("out"))
      .def("rms_norm", &rms_norm, py::arg("residual"), py::arg("weight"), py::arg("out"), py::arg("delta") = py::none(),
           py::arg("rows") = py::none(), py::arg("eps") = 1e-5f)
      .def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("y"))
      .def("qkv_rope", &qkv_rope, py::arg("qkv"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("positions"),
           py::arg("inv_freq"))
      .def("attention", &attention, py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k_pool"),
           py::arg("v_pool"), py::arg("kv"), py::arg("out"))
      .def("kv_append", &kv_append, py::arg("k"), py::arg("v"), py::arg("k_pool"), py::arg("v_pool"), py::arg("kv"))
      .def("silu_mul", &silu_mul, py::arg("gate_up"), py::arg("out"))
      .def("moe", &moe, py::arg("x"), py::arg("router"), py::arg("w13"), py::arg("w2"), py::arg("residual"),
           py::arg("top_k"))
      .def("sample", &sample, py::arg("logits"), py::arg("rows"))
      .def("moe_route", &moe_route, py::arg("router_logits"), py::arg("top_k"), py::arg("expert_ids"),
           py::arg("weights"), py::arg("offsets"), py::arg("sorted_pairs"));

  ops.def("quantize", &quantize, py::arg("w"), py::arg("format"), py::arg("group_size"), py::arg("data"),
          py::arg("scales"), py::arg("zeros"));
  ops.def("ring_blocks_for", &mc::KvLayout::ring_blocks_for, py::arg("window"), py::arg("block_size"));
  ops.def("rope_inv_freq", &mc::rope_inv_freq, py::arg("head_dim"), py::arg("rope_theta"));
}
