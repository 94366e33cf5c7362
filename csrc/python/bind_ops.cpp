// Bindings of single ops (mistral_cuda._C.ops), for the backend-comparison tests: each CUDA op
// against its CPU op on the same inputs. Translation only: tensors arrive as data pointers
// (Python ints), sizes as ints, element types as dtype names, streams as cudaStream_t values
// (torch.cuda.current_stream().cuda_stream). mistral_cuda/ops.py checks shapes, dtypes and
// devices and is the API to call; these functions trust it.
//
// Arguments are keywords (ops.py names every one), so the long lists stay readable.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/dtype.h"
#include "core/kv_layout.h"
#include "core/op_params.h"
#include "cpu/attention.h"
#include "cpu/dense_ops.h"
#include "cpu/moe.h"

#ifdef MC_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/attention.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/gemm.h"
#include "cuda/moe.cuh"
#endif

namespace py = pybind11;

namespace {

using Ptr = std::uintptr_t;  // a tensor's data_ptr()

template <typename T>
T* at(Ptr address) {
  return reinterpret_cast<T*>(address);
}

// ---- CPU ops (float32) ----

void cpu_embedding(Ptr table, Ptr ids, Ptr out, int64_t n_tokens, int64_t dim) {
  mc::cpu::embedding(at<const float>(table), at<const int32_t>(ids), at<float>(out), n_tokens, dim);
}

void cpu_add_inplace(Ptr x, Ptr y, int64_t count) { mc::cpu::add_inplace(at<float>(x), at<const float>(y), count); }

void cpu_rms_norm(Ptr x, Ptr weight, Ptr out, int64_t n_rows, int64_t dim, float eps) {
  mc::cpu::rms_norm(at<const float>(x), at<const float>(weight), at<float>(out), n_rows, dim, eps);
}

void cpu_rope_tables(Ptr positions, Ptr inv_freq, int64_t n_tokens, int64_t half, Ptr cos, Ptr sin) {
  mc::cpu::rope_tables(at<const int64_t>(positions), at<const float>(inv_freq), n_tokens, half, at<float>(cos),
                       at<float>(sin));
}

void cpu_rope(Ptr x, Ptr cos, Ptr sin, int64_t n_tokens, int64_t heads, int64_t head_dim) {
  mc::cpu::rope(at<float>(x), at<const float>(cos), at<const float>(sin), n_tokens, heads, head_dim);
}

void cpu_silu_mul(Ptr gate, Ptr up, Ptr out, int64_t count) {
  mc::cpu::silu_mul(at<const float>(gate), at<const float>(up), at<float>(out), count);
}

void cpu_matmul(Ptr x, Ptr w, Ptr y, int64_t n_tokens, int64_t n, int64_t k) {
  mc::cpu::matmul(at<const float>(x), at<const float>(w), at<float>(y), n_tokens, n, k);
}

void cpu_kv_append(Ptr k, Ptr v, Ptr k_pool, Ptr v_pool, Ptr block_tables, Ptr cu_seqlens, Ptr start_pos,
                   int32_t n_entries, int32_t max_blocks, int32_t n_kv_heads, int32_t head_dim, int32_t block_size,
                   int64_t window) {
  mc::KvAppendParams p;
  p.k = at<const float>(k);
  p.v = at<const float>(v);
  p.k_pool = at<float>(k_pool);
  p.v_pool = at<float>(v_pool);
  p.block_tables = at<const int32_t>(block_tables);
  p.cu_seqlens = at<const int32_t>(cu_seqlens);
  p.start_pos = at<const int64_t>(start_pos);
  p.n_entries = n_entries;
  p.max_blocks = max_blocks;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.layout = mc::KvLayout::make(block_size, window);
  mc::cpu::kv_append(p);
}

void cpu_paged_attention(Ptr q, Ptr k_new, Ptr v_new, Ptr k_pool, Ptr v_pool, Ptr block_tables, Ptr cu_seqlens,
                         Ptr start_pos, Ptr out, int32_t n_entries, int32_t max_blocks, int32_t n_heads,
                         int32_t n_kv_heads, int32_t head_dim, int32_t block_size, int64_t window) {
  mc::AttentionParams p;
  p.q = at<const float>(q);
  p.k_new = at<const float>(k_new);
  p.v_new = at<const float>(v_new);
  p.k_pool = at<const float>(k_pool);
  p.v_pool = at<const float>(v_pool);
  p.block_tables = at<const int32_t>(block_tables);
  p.cu_seqlens = at<const int32_t>(cu_seqlens);
  p.start_pos = at<const int64_t>(start_pos);
  p.out = at<float>(out);
  p.n_entries = n_entries;
  p.max_blocks = max_blocks;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.scale = mc::attention_scale(head_dim);
  p.layout = mc::KvLayout::make(block_size, window);
  mc::cpu::paged_attention(p);
}

// cpu::moe_ffn's routing step (route_top_k per token, then the counting sort of the pairs by
// expert), written out here because cpu/moe.cpp keeps it inside moe_ffn: the CPU side of the
// moe_route comparison. logits [T, E] f32 -> expert_ids [T, K], weights [T, K],
// expert_offsets [E + 1], sorted_pairs [T * K] (grouped by expert, ascending within one).
void cpu_moe_route(Ptr router_logits, Ptr expert_ids, Ptr weights, Ptr expert_offsets, Ptr sorted_pairs,
                   int64_t n_tokens, int32_t n_experts, int32_t top_k) {
  mc::cpu::moe_route(at<const float>(router_logits), n_tokens, n_experts, top_k, at<int32_t>(expert_ids),
                     at<float>(weights), at<int32_t>(expert_offsets), at<int32_t>(sorted_pairs));
}

// cpu::moe_ffn on stacked expert weights: router [E, D], w13 [E, 2F, D] (rows 0..F-1 = w1,
// F..2F-1 = w3 of each expert), w2 [E, D, F], all f32; y [T, D] is overwritten.
void cpu_moe_ffn(Ptr x, Ptr router, Ptr w13, Ptr w2, Ptr y, int64_t n_tokens, int64_t dim, int64_t hidden,
                 int64_t n_experts, int64_t top_k) {
  mc::ModelConfig config;
  config.dim = dim;
  config.hidden_dim = hidden;
  config.n_experts = n_experts;
  config.n_experts_per_tok = top_k;
  mc::LayerWeights layer;
  layer.router = mc::Tensor::view(at<float>(router), mc::DType::kF32, {n_experts, dim});
  layer.experts.resize(static_cast<size_t>(n_experts));
  for (int64_t e = 0; e < n_experts; ++e) {
    float* gate_up = at<float>(w13) + e * 2 * hidden * dim;
    layer.experts[e].w1 = mc::Tensor::view(gate_up, mc::DType::kF32, {hidden, dim});
    layer.experts[e].w3 = mc::Tensor::view(gate_up + hidden * dim, mc::DType::kF32, {hidden, dim});
    layer.experts[e].w2 = mc::Tensor::view(at<float>(w2) + e * dim * hidden, mc::DType::kF32, {dim, hidden});
  }
  mc::cpu::moe_ffn(at<const float>(x), layer, config, n_tokens, at<float>(y));
}

#ifdef MC_WITH_CUDA
// ---- CUDA ops (bfloat16 / float16, named by dtype) ----

cudaStream_t stream_of(Ptr stream) { return reinterpret_cast<cudaStream_t>(stream); }

void cuda_embedding(Ptr table, Ptr ids, Ptr out, int64_t n_tokens, int64_t dim, const std::string& dtype, Ptr stream) {
  mc::cuda::EmbeddingParams p;
  p.table = at<const void>(table);
  p.ids = at<const int32_t>(ids);
  p.out = at<float>(out);
  p.n_tokens = n_tokens;
  p.dim = dim;
  p.dtype = mc::parse_dtype(dtype);
  mc::cuda::embedding(p, stream_of(stream));
}

void cuda_rms_norm(Ptr residual, Ptr delta, Ptr weight, Ptr out, Ptr rows, int64_t n_tokens, int64_t n_rows,
                   int64_t dim, float eps, const std::string& dtype, Ptr stream) {
  mc::cuda::RmsNormParams p;
  p.residual = at<float>(residual);
  p.delta = at<const void>(delta);
  p.weight = at<const void>(weight);
  p.out = at<void>(out);
  p.rows = at<const int32_t>(rows);
  p.n_tokens = n_tokens;
  p.n_rows = n_rows;
  p.dim = dim;
  p.eps = eps;
  p.dtype = mc::parse_dtype(dtype);
  mc::cuda::rms_norm(p, stream_of(stream));
}

void cuda_rope(Ptr q, Ptr k, Ptr positions, Ptr inv_freq, int64_t n_tokens, int32_t n_heads, int32_t n_kv_heads,
               int32_t head_dim, const std::string& dtype, Ptr stream) {
  mc::cuda::RopeParams p;
  p.q = at<void>(q);
  p.k = at<void>(k);
  p.positions = at<const int64_t>(positions);
  p.inv_freq = at<const float>(inv_freq);
  p.n_tokens = n_tokens;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.dtype = mc::parse_dtype(dtype);
  mc::cuda::rope(p, stream_of(stream));
}

void cuda_silu_mul(Ptr gate_up, Ptr out, int64_t n_tokens, int64_t hidden, const std::string& dtype, Ptr stream) {
  mc::cuda::SiluMulParams p;
  p.gate_up = at<const void>(gate_up);
  p.out = at<void>(out);
  p.n_tokens = n_tokens;
  p.hidden = hidden;
  p.dtype = mc::parse_dtype(dtype);
  mc::cuda::silu_mul(p, stream_of(stream));
}

void cuda_kv_append(Ptr k, Ptr v, Ptr k_pool, Ptr v_pool, Ptr block_tables, Ptr cu_seqlens, Ptr start_pos,
                    int32_t n_tokens, int32_t n_entries, int32_t max_blocks, int32_t n_kv_heads, int32_t head_dim,
                    int32_t block_size, int64_t window, const std::string& dtype, Ptr stream) {
  mc::cuda::CudaKvAppendParams p;
  mc::KvAppendParamsT<void>& t = p.tensors;
  t.k = at<const void>(k);
  t.v = at<const void>(v);
  t.k_pool = at<void>(k_pool);
  t.v_pool = at<void>(v_pool);
  t.block_tables = at<const int32_t>(block_tables);
  t.cu_seqlens = at<const int32_t>(cu_seqlens);
  t.start_pos = at<const int64_t>(start_pos);
  t.n_entries = n_entries;
  t.max_blocks = max_blocks;
  t.n_kv_heads = n_kv_heads;
  t.head_dim = head_dim;
  t.layout = mc::KvLayout::make(block_size, window);
  p.dtype = mc::parse_dtype(dtype);
  p.n_tokens = n_tokens;
  mc::cuda::kv_append(p, stream_of(stream));
}

// Built once, then sized (attention_workspace_bytes) and run (paged_attention).
mc::cuda::CudaAttentionParams cuda_attention_params(Ptr q, Ptr k_new, Ptr v_new, Ptr k_pool, Ptr v_pool,
                                                    Ptr block_tables, Ptr cu_seqlens, Ptr start_pos, Ptr out,
                                                    int32_t n_tokens, int32_t n_entries, int32_t max_blocks,
                                                    int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                                                    int32_t block_size, int64_t window, int32_t max_query_len,
                                                    int64_t max_context, const std::string& dtype) {
  mc::cuda::CudaAttentionParams p;
  mc::AttentionParamsT<void>& t = p.tensors;
  t.q = at<const void>(q);
  t.k_new = at<const void>(k_new);
  t.v_new = at<const void>(v_new);
  t.k_pool = at<const void>(k_pool);
  t.v_pool = at<const void>(v_pool);
  t.block_tables = at<const int32_t>(block_tables);
  t.cu_seqlens = at<const int32_t>(cu_seqlens);
  t.start_pos = at<const int64_t>(start_pos);
  t.out = at<void>(out);
  t.n_entries = n_entries;
  t.max_blocks = max_blocks;
  t.n_heads = n_heads;
  t.n_kv_heads = n_kv_heads;
  t.head_dim = head_dim;
  t.scale = mc::attention_scale(head_dim);
  t.layout = mc::KvLayout::make(block_size, window);
  p.dtype = mc::parse_dtype(dtype);
  p.n_tokens = n_tokens;
  p.max_query_len = max_query_len;
  p.max_context = max_context;
  return p;
}

void cuda_paged_attention(const mc::cuda::CudaAttentionParams& p, Ptr workspace, Ptr stream) {
  mc::cuda::paged_attention(p, at<void>(workspace), stream_of(stream));
}

void cuda_linear(Ptr x, Ptr w, Ptr y, int64_t n_tokens, int64_t n, int64_t k, const std::string& in_dtype,
                 const std::string& out_dtype, Ptr stream) {
  // One cuBLAS handle per process, opened on first use. Never destroyed: at interpreter exit
  // the CUDA runtime may already be torn down.
  static mc::cuda::Gemm* gemm = new mc::cuda::Gemm();
  gemm->linear(at<const void>(x), at<const void>(w), at<void>(y), n_tokens, n, k, mc::parse_dtype(in_dtype),
               mc::parse_dtype(out_dtype), stream_of(stream));
}

void cuda_moe_route(Ptr router_logits, Ptr expert_ids, Ptr weights, Ptr expert_offsets, Ptr sorted_pairs,
                    int32_t n_tokens, int32_t n_experts, int32_t top_k, Ptr stream) {
  mc::cuda::MoeRouteParams p;
  p.router_logits = at<const float>(router_logits);
  p.expert_ids = at<int32_t>(expert_ids);
  p.weights = at<float>(weights);
  p.expert_offsets = at<int32_t>(expert_offsets);
  p.sorted_pairs = at<int32_t>(sorted_pairs);
  p.n_tokens = n_tokens;
  p.n_experts = n_experts;
  p.top_k = top_k;
  mc::cuda::moe_route(p, stream_of(stream));
}

mc::cuda::MoeExpertsParams cuda_moe_experts_params(Ptr x, Ptr w13, Ptr w2, Ptr expert_offsets, Ptr sorted_pairs,
                                                   Ptr weights, Ptr residual, int32_t n_tokens, int32_t n_experts,
                                                   int32_t top_k, int64_t dim, int64_t hidden,
                                                   const std::string& dtype) {
  mc::cuda::MoeExpertsParams p;
  p.x = at<const void>(x);
  p.w13 = at<const void>(w13);
  p.w2 = at<const void>(w2);
  p.expert_offsets = at<const int32_t>(expert_offsets);
  p.sorted_pairs = at<const int32_t>(sorted_pairs);
  p.weights = at<const float>(weights);
  p.residual = at<float>(residual);
  p.n_tokens = n_tokens;
  p.n_experts = n_experts;
  p.top_k = top_k;
  p.dim = dim;
  p.hidden = hidden;
  p.dtype = mc::parse_dtype(dtype);
  return p;
}

size_t cuda_moe_workspace_bytes(int32_t n_tokens, int32_t n_experts, int32_t top_k, int64_t dim, int64_t hidden,
                                const std::string& dtype) {
  return mc::cuda::moe_workspace_bytes(
      cuda_moe_experts_params(0, 0, 0, 0, 0, 0, 0, n_tokens, n_experts, top_k, dim, hidden, dtype));
}

void cuda_moe_experts(Ptr x, Ptr w13, Ptr w2, Ptr expert_offsets, Ptr sorted_pairs, Ptr weights, Ptr residual,
                      Ptr workspace, int32_t n_tokens, int32_t n_experts, int32_t top_k, int64_t dim, int64_t hidden,
                      const std::string& dtype, Ptr stream) {
  mc::cuda::moe_experts(cuda_moe_experts_params(x, w13, w2, expert_offsets, sorted_pairs, weights, residual, n_tokens,
                                                n_experts, top_k, dim, hidden, dtype),
                        at<void>(workspace), stream_of(stream));
}
#endif

}  // namespace

void bind_ops(py::module_& m) {
  py::module_ ops = m.def_submodule("ops", "single ops of the CPU and CUDA backends (see mistral_cuda/ops.py)");
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  using py::arg;

  ops.def("kv_ring_blocks", &mc::KvLayout::ring_blocks_for, arg("window"), arg("block_size"),
          "Block-table entries a sequence keeps under a sliding window (0 = full attention: 0).");
  ops.def("rope_inv_freq", &mc::rope_inv_freq, arg("head_dim"), arg("rope_theta"),
          "The backends' RoPE frequency table (float32 values) for head_dim and theta.");
  ops.def("attention_scale", &mc::attention_scale, arg("head_dim"));

  ops.def("cpu_embedding", &cpu_embedding, no_gil, arg("table"), arg("ids"), arg("out"), arg("n_tokens"), arg("dim"));
  ops.def("cpu_add_inplace", &cpu_add_inplace, no_gil, arg("x"), arg("y"), arg("count"));
  ops.def("cpu_rms_norm", &cpu_rms_norm, no_gil, arg("x"), arg("weight"), arg("out"), arg("n_rows"), arg("dim"),
          arg("eps"));
  ops.def("cpu_rope_tables", &cpu_rope_tables, no_gil, arg("positions"), arg("inv_freq"), arg("n_tokens"),
          arg("half"), arg("cos"), arg("sin"));
  ops.def("cpu_rope", &cpu_rope, no_gil, arg("x"), arg("cos"), arg("sin"), arg("n_tokens"), arg("heads"),
          arg("head_dim"));
  ops.def("cpu_silu_mul", &cpu_silu_mul, no_gil, arg("gate"), arg("up"), arg("out"), arg("count"));
  ops.def("cpu_matmul", &cpu_matmul, no_gil, arg("x"), arg("w"), arg("y"), arg("n_tokens"), arg("n"), arg("k"));
  ops.def("cpu_kv_append", &cpu_kv_append, no_gil, arg("k"), arg("v"), arg("k_pool"), arg("v_pool"),
          arg("block_tables"), arg("cu_seqlens"), arg("start_pos"), arg("n_entries"), arg("max_blocks"),
          arg("n_kv_heads"), arg("head_dim"), arg("block_size"), arg("window"));
  ops.def("cpu_paged_attention", &cpu_paged_attention, no_gil, arg("q"), arg("k_new"), arg("v_new"), arg("k_pool"),
          arg("v_pool"), arg("block_tables"), arg("cu_seqlens"), arg("start_pos"), arg("out"), arg("n_entries"),
          arg("max_blocks"), arg("n_heads"), arg("n_kv_heads"), arg("head_dim"), arg("block_size"), arg("window"));
  ops.def("cpu_moe_route", &cpu_moe_route, no_gil, arg("router_logits"), arg("expert_ids"), arg("weights"),
          arg("expert_offsets"), arg("sorted_pairs"), arg("n_tokens"), arg("n_experts"), arg("top_k"));
  ops.def("cpu_moe_ffn", &cpu_moe_ffn, no_gil, arg("x"), arg("router"), arg("w13"), arg("w2"), arg("y"),
          arg("n_tokens"), arg("dim"), arg("hidden"), arg("n_experts"), arg("top_k"));

#ifdef MC_WITH_CUDA
  ops.attr("has_cuda") = true;
  ops.def("cuda_embedding", &cuda_embedding, arg("table"), arg("ids"), arg("out"), arg("n_tokens"), arg("dim"),
          arg("dtype"), arg("stream"));
  ops.def("cuda_rms_norm", &cuda_rms_norm, arg("residual"), arg("delta"), arg("weight"), arg("out"), arg("rows"),
          arg("n_tokens"), arg("n_rows"), arg("dim"), arg("eps"), arg("dtype"), arg("stream"));
  ops.def("cuda_rope", &cuda_rope, arg("q"), arg("k"), arg("positions"), arg("inv_freq"), arg("n_tokens"),
          arg("n_heads"), arg("n_kv_heads"), arg("head_dim"), arg("dtype"), arg("stream"));
  ops.def("cuda_silu_mul", &cuda_silu_mul, arg("gate_up"), arg("out"), arg("n_tokens"), arg("hidden"), arg("dtype"),
          arg("stream"));
  ops.def("cuda_kv_append", &cuda_kv_append, arg("k"), arg("v"), arg("k_pool"), arg("v_pool"), arg("block_tables"),
          arg("cu_seqlens"), arg("start_pos"), arg("n_tokens"), arg("n_entries"), arg("max_blocks"),
          arg("n_kv_heads"), arg("head_dim"), arg("block_size"), arg("window"), arg("dtype"), arg("stream"));
  py::class_<mc::cuda::CudaAttentionParams>(ops, "CudaAttentionParams");
  ops.def("cuda_attention_params", &cuda_attention_params, arg("q"), arg("k_new"), arg("v_new"), arg("k_pool"),
          arg("v_pool"), arg("block_tables"), arg("cu_seqlens"), arg("start_pos"), arg("out"), arg("n_tokens"),
          arg("n_entries"), arg("max_blocks"), arg("n_heads"), arg("n_kv_heads"), arg("head_dim"),
          arg("block_size"), arg("window"), arg("max_query_len"), arg("max_context"), arg("dtype"));
  ops.def("cuda_attention_workspace_bytes", &mc::cuda::attention_workspace_bytes, arg("params"));
  ops.def("cuda_paged_attention", &cuda_paged_attention, arg("params"), arg("workspace"), arg("stream"));
  ops.def("cuda_linear", &cuda_linear, arg("x"), arg("w"), arg("y"), arg("n_tokens"), arg("n"), arg("k"),
          arg("in_dtype"), arg("out_dtype"), arg("stream"));
  ops.def("cuda_moe_route", &cuda_moe_route, arg("router_logits"), arg("expert_ids"), arg("weights"),
          arg("expert_offsets"), arg("sorted_pairs"), arg("n_tokens"), arg("n_experts"), arg("top_k"), arg("stream"));
  ops.def("cuda_moe_workspace_bytes", &cuda_moe_workspace_bytes, arg("n_tokens"), arg("n_experts"), arg("top_k"),
          arg("dim"), arg("hidden"), arg("dtype"));
  ops.def("cuda_moe_experts", &cuda_moe_experts, arg("x"), arg("w13"), arg("w2"), arg("expert_offsets"),
          arg("sorted_pairs"), arg("weights"), arg("residual"), arg("workspace"), arg("n_tokens"), arg("n_experts"),
          arg("top_k"), arg("dim"), arg("hidden"), arg("dtype"), arg("stream"));
#else
  ops.attr("has_cuda") = false;
#endif
}
