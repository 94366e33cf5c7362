// Sandbox of the CUDA paged attention (llm.c style): parity of mc::cuda::paged_attention against
// mc::cpu::paged_attention on edge cases, then decode bandwidth and prefill throughput.
//
// Build and run from the repository root on a GPU machine:
//   bash benches/attention_dev/run.sh          # parity, then benchmarks
//   bash benches/attention_dev/run.sh parity   # parity only
// Prints one line per case and 'N passed, N failed'; exit code 0 iff all pass.
//
// Pool slots that no query of a case may read hold NaN: a kernel that reads a masked or stale
// key (and lets it reach the output) fails with NaN. Like the runtime, a case names its leading
// single-token entries as the step's decode part (PagedKvView::n_decode), so a mixed step runs
// both kernels; `whole_step` cases name none and take one kernel for the whole step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "cuda/attention.cuh"

namespace {

using mc::AttentionParams;
using mc::AttentionParamsT;
using mc::DType;
using mc::KvLayout;
using mc::PagedKvView;

struct Case {
  std::string name;
  int32_t n_heads, n_kv_heads, head_dim, block_size;
  int64_t window;  // 0 = full attention
  std::vector<std::pair<int64_t, int32_t>> entries;  // (start_pos, new tokens)
  bool force_prefill = false;  // no decode part and max_query_len >= 2: decode batches take the prefill kernel
  float q_gain = 2.0f;         // larger = peakier softmax (exercises the running-max rescale)
  bool whole_step = false;     // no decode part named (n_decode = 0)
};

template <typename T>
float to_f(T v);
template <>
float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
float to_f(__half v) { return __half2float(v); }
template <typename T>
T from_f(float v);
template <>
__nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
template <>
__half from_f(float v) { return __float2half(v); }

#define CHECK(expr)                                                                        \
  do {                                                                                     \
    cudaError_t s_ = (expr);                                                               \
    if (s_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #expr, cudaGetErrorString(s_), __FILE__, __LINE__); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* dev = nullptr;
  CHECK(cudaMalloc(&dev, std::max<size_t>(host.size(), 1) * sizeof(T)));
  if (!host.empty()) CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

// Everything one case needs, on the host (element type T and its f32 mirror) and the device.
template <typename T>
struct Problem {
  int32_t n_tokens = 0, max_query_len = 0, max_blocks = 0;
  int64_t max_context = 0;
  KvLayout layout;
  std::vector<int32_t> cu_seqlens, tables;
  std::vector<int64_t> start_pos;
  std::vector<T> q, k_new, v_new, k_pool, v_pool;
  std::vector<float> qf, kf, vf, kpf, vpf;

  Problem(const Case& c, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    layout.block_size = c.block_size;
    layout.window = c.window;
    layout.ring_blocks = KvLayout::ring_blocks_for(c.window, c.block_size);
    const int32_t n_entries = static_cast<int32_t>(c.entries.size());
    cu_seqlens.push_back(0);
    std::vector<int32_t> blocks_of(n_entries);
    for (int32_t e = 0; e < n_entries; ++e) {
      const auto [start, n] = c.entries[e];
      start_pos.push_back(start);
      cu_seqlens.push_back(cu_seqlens.back() + n);
      max_query_len = std::max(max_query_len, n);
      const int64_t end = start + n;
      blocks_of[e] = layout.ring_blocks > 0 ? layout.ring_blocks : static_cast<int32_t>((end + c.block_size - 1) / c.block_size);
      max_blocks = std::max(max_blocks, blocks_of[e]);
      for (int64_t pos = start; pos < end; ++pos) max_context = std::max(max_context, pos - layout.first_visible(pos) + 1);
    }
    n_tokens = cu_seqlens.back();
    max_blocks = std::max(max_blocks, 1);
    // Physical blocks: a shuffled permutation, so logical order never matches physical order.
    const int32_t n_blocks = std::max(std::accumulate(blocks_of.begin(), blocks_of.end(), 0), 1);
    std::vector<int32_t> physical(n_blocks);
    std::iota(physical.begin(), physical.end(), 0);
    std::shuffle(physical.begin(), physical.end(), rng);
    tables.assign(static_cast<size_t>(n_entries) * max_blocks, -1);
    for (int32_t e = 0, next = 0; e < n_entries; ++e) {
      for (int32_t b = 0; b < blocks_of[e]; ++b) tables[static_cast<size_t>(e) * max_blocks + b] = physical[next++];
    }

    const int64_t kv_row = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
    auto fill = [&](std::vector<T>& v, std::vector<float>& f, size_t n, float gain) {
      v.resize(n);
      f.resize(n);
      for (size_t i = 0; i < n; ++i) {
        v[i] = from_f<T>(gain * uni(rng));
        f[i] = to_f(v[i]);
      }
    };
    fill(q, qf, static_cast<size_t>(n_tokens) * c.n_heads * c.head_dim, c.q_gain);
    fill(k_new, kf, static_cast<size_t>(n_tokens) * kv_row, 1.0f);
    fill(v_new, vf, static_cast<size_t>(n_tokens) * kv_row, 1.0f);
    const size_t pool_elems = static_cast<size_t>(n_blocks) * c.block_size * kv_row;
    k_pool.assign(pool_elems, from_f<T>(NAN));
    v_pool.assign(pool_elems, from_f<T>(NAN));
    kpf.assign(pool_elems, NAN);
    vpf.assign(pool_elems, NAN);
    // Only the cached positions some query of the step can see hold data.
    for (int32_t e = 0; e < n_entries; ++e) {
      const int64_t start = start_pos[e];
      const int32_t* table = tables.data() + static_cast<size_t>(e) * max_blocks;
      for (int64_t pos = layout.first_visible(start); pos < start; ++pos) {
        const size_t row = static_cast<size_t>(layout.pool_row(table, pos)) * kv_row;
        for (int64_t i = 0; i < kv_row; ++i) {
          k_pool[row + i] = from_f<T>(uni(rng));
          v_pool[row + i] = from_f<T>(uni(rng));
          kpf[row + i] = to_f(k_pool[row + i]);
          vpf[row + i] = to_f(v_pool[row + i]);
        }
      }
    }
  }
};

template <typename T>
DType dtype_of();
template <>
DType dtype_of<__nv_bfloat16>() { return DType::kBF16; }
template <>
DType dtype_of<__half>() { return DType::kF16; }

// Runs one case on both backends; returns the max abs error (NaN if the GPU output has one).
template <typename T>
float max_error(const Case& c, uint32_t seed) {
  Problem<T> pr(c, seed);
  const int32_t n_entries = static_cast<int32_t>(c.entries.size());
  const size_t out_elems = static_cast<size_t>(pr.n_tokens) * c.n_heads * c.head_dim;

  // The view's bounds; its pointers are set for each side (host arrays, device copies).
  PagedKvView kv;
  kv.n_entries = n_entries;
  kv.max_blocks = pr.max_blocks;
  kv.layout = pr.layout;
  kv.plan_from_host(pr.cu_seqlens.data(), pr.start_pos.data());
  if (c.whole_step || c.force_prefill) {
    kv.n_decode = 0;
    kv.decode_max_context = 0;
    kv.prefill_max_query_len = pr.max_query_len;
    kv.prefill_max_context = pr.max_context;
  }

  std::vector<float> ref(out_elems);
  AttentionParamsT<float> cp;
  cp.q = pr.qf.data();
  cp.k_new = pr.kf.data();
  cp.v_new = pr.vf.data();
  cp.k_pool = pr.kpf.data();
  cp.v_pool = pr.vpf.data();
  cp.out = ref.data();
  cp.kv = kv;
  cp.kv.block_tables = pr.tables.data();
  cp.kv.cu_seqlens = pr.cu_seqlens.data();
  cp.kv.start_pos = pr.start_pos.data();
  cp.n_heads = c.n_heads;
  cp.n_kv_heads = c.n_kv_heads;
  cp.head_dim = c.head_dim;
  cp.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  mc::cpu::paged_attention(cp);

  AttentionParams gp;
  gp.tensors.q = to_device(pr.q);
  gp.tensors.k_new = to_device(pr.k_new);
  gp.tensors.v_new = to_device(pr.v_new);
  gp.tensors.k_pool = to_device(pr.k_pool);
  gp.tensors.v_pool = to_device(pr.v_pool);
  // Garbage (0xFF bytes = NaN) in the output: a row the kernel forgets to write shows up.
  T* out = to_device(std::vector<T>(out_elems, from_f<T>(NAN)));
  gp.tensors.out = out;
  gp.tensors.kv = kv;
  gp.tensors.kv.block_tables = to_device(pr.tables);
  gp.tensors.kv.cu_seqlens = to_device(pr.cu_seqlens);
  gp.tensors.kv.start_pos = to_device(pr.start_pos);
  gp.tensors.n_heads = c.n_heads;
  gp.tensors.n_kv_heads = c.n_kv_heads;
  gp.tensors.head_dim = c.head_dim;
  gp.tensors.scale = cp.scale;
  gp.dtype = dtype_of<T>();
  gp.n_tokens = pr.n_tokens;
  gp.max_query_len = c.force_prefill ? std::max(pr.max_query_len, 2) : pr.max_query_len;
  gp.max_context = pr.max_context;
  const size_t ws_bytes = mc::cuda::attention_workspace_bytes(gp);
  if (ws_bytes > 0) CHECK(cudaMalloc(&gp.workspace, ws_bytes));
  if (gp.workspace != nullptr) CHECK(cudaMemset(gp.workspace, 0xFF, ws_bytes));  // NaN garbage
  mc::cuda::paged_attention(gp, nullptr);
  CHECK(cudaDeviceSynchronize());
  std::vector<T> got(out_elems);
  CHECK(cudaMemcpy(got.data(), out, out_elems * sizeof(T), cudaMemcpyDeviceToHost));
  for (const void* ptr : {gp.tensors.q, gp.tensors.k_new, gp.tensors.v_new, gp.tensors.k_pool, gp.tensors.v_pool,
                          static_cast<const void*>(gp.tensors.kv.block_tables),
                          static_cast<const void*>(gp.tensors.kv.cu_seqlens),
                          static_cast<const void*>(gp.tensors.kv.start_pos), static_cast<const void*>(out),
                          static_cast<const void*>(gp.workspace)}) {
    CHECK(cudaFree(const_cast<void*>(ptr)));
  }

  float err = 0.0f;
  for (size_t i = 0; i < out_elems; ++i) {
    const float d = std::fabs(to_f(got[i]) - ref[i]);
    if (!(d == d)) return NAN;
    err = std::max(err, d);
  }
  return err;
}

std::vector<Case> parity_cases() {
  std::vector<Case> cases;
  // Decode, Mistral shape: own key only, block edges, long contexts (several splits).
  cases.push_back({"decode full B16", 32, 8, 128, 16, 0, {{0, 1}, {1, 1}, {15, 1}, {16, 1}, {17, 1}, {1000, 1}}});
  cases.push_back({"decode long 1 entry", 32, 8, 128, 16, 0, {{5000, 1}}});
  cases.push_back({"decode long 2 entries", 32, 8, 128, 16, 0, {{33000, 1}, {3, 1}}});
  cases.push_back({"decode window 7 B4 wraps", 32, 8, 128, 4, 7, {{0, 1}, {6, 1}, {7, 1}, {13, 1}, {50, 1}}});
  cases.push_back({"decode window 4096 B16", 32, 8, 128, 16, 4096, {{10000, 1}, {4095, 1}, {4096, 1}}});
  cases.push_back({"decode zero-token entry", 32, 8, 128, 16, 0, {{9, 1}, {20, 0}, {300, 1}}});
  cases.push_back({"decode zero-token entry, whole step", 32, 8, 128, 16, 0, {{9, 1}, {20, 0}, {300, 1}}, false, 2.0f,
                   true});
  // Every decode group, head_dim 64, odd block sizes.
  for (int32_t g = 1; g <= 8; ++g) {
    for (int32_t b : {1, 3, 7}) {
      cases.push_back({"decode G" + std::to_string(g) + " Dh64 B" + std::to_string(b), 2 * g, 2, 64, b, 0,
                       {{0, 1}, {37, 1}, {600, 1}}});
    }
  }
  cases.push_back({"decode G3 Dh128 window 33 B7", 12, 4, 128, 7, 33, {{32, 1}, {100, 1}, {511, 1}}});
  cases.push_back({"decode G16 (prefill fallback)", 32, 2, 128, 16, 0, {{0, 1}, {200, 1}}});
  cases.push_back({"decode peaky softmax", 32, 8, 128, 16, 0, {{3000, 1}, {77, 1}}, false, 12.0f});
  // Prefill: whole prompts, chunks over a cached prefix, windows far shorter than the prompt.
  cases.push_back({"prefill 33 tokens", 32, 8, 128, 16, 0, {{0, 33}}});
  cases.push_back({"prefill chunk over prefix", 32, 8, 128, 16, 0, {{100, 511}}});
  cases.push_back({"prefill window 7 B3 prompt 200", 32, 8, 128, 3, 7, {{0, 200}}});
  cases.push_back({"prefill window 7 B3 chunk", 32, 8, 128, 3, 7, {{50, 67}}});
  cases.push_back({"prefill window 100 B16 chunk", 32, 8, 64, 16, 100, {{1000, 300}}});
  cases.push_back({"mixed chunks and decodes", 32, 8, 128, 16, 64, {{0, 70}, {37, 1}, {5, 1}, {200, 129}, {0, 0}, {64, 17}}});
  // Decode part first (its own kernel, split over long contexts), then the prefill part.
  cases.push_back({"decode part + prefill part", 32, 8, 128, 16, 0,
                   {{1000, 1}, {5000, 1}, {3, 1}, {0, 70}, {200, 129}, {0, 0}, {64, 17}}});
  cases.push_back({"decode part + prefill part window 64", 32, 8, 128, 16, 64,
                   {{37, 1}, {5, 1}, {3000, 1}, {0, 70}, {200, 129}, {64, 17}}});
  cases.push_back({"decode part + prefill part G16", 32, 2, 128, 16, 0, {{300, 1}, {0, 1}, {40, 33}}});
  cases.push_back({"decode part, prefill part of empty entries", 32, 8, 64, 16, 0, {{700, 1}, {2, 1}, {9, 0}}});
  cases.push_back({"prefill G1 Dh64 B1", 4, 4, 64, 1, 0, {{7, 65}, {0, 1}}});
  cases.push_back({"prefill G3 (padding rows)", 24, 8, 128, 7, 0, {{13, 50}}});
  cases.push_back({"prefill G5 window 9", 10, 2, 64, 4, 9, {{20, 40}}});
  cases.push_back({"prefill G16", 32, 2, 128, 16, 0, {{5, 20}}});
  cases.push_back({"prefill G64", 64, 1, 64, 16, 0, {{3, 3}}});
  cases.push_back({"prefill peaky softmax", 32, 8, 128, 16, 0, {{500, 130}}, false, 12.0f});
  cases.push_back({"decode batch via prefill kernel", 32, 8, 128, 16, 40, {{0, 1}, {100, 1}, {5, 1}}, true});
  return cases;
}

// Timing of paged_attention alone, L2 flushed before each call.
float time_ms(const AttentionParams& p, int iters) {
  void* flush = nullptr;
  const size_t flush_bytes = size_t{256} << 20;
  CHECK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t begin, end;
  CHECK(cudaEventCreate(&begin));
  CHECK(cudaEventCreate(&end));
  mc::cuda::paged_attention(p, nullptr);  // warm-up (and the one-time attribute set-up)
  float total = 0.0f;
  for (int i = 0; i < iters; ++i) {
    CHECK(cudaMemsetAsync(flush, i, flush_bytes));
    CHECK(cudaEventRecord(begin));
    mc::cuda::paged_attention(p, nullptr);
    CHECK(cudaEventRecord(end));
    CHECK(cudaEventSynchronize(end));
    float ms = 0.0f;
    CHECK(cudaEventElapsedTime(&ms, begin, end));
    total += ms;
  }
  CHECK(cudaFree(flush));
  return total / iters;
}

// Mistral-7B attention (H=32, KVH=8, Dh=128, B=16, bf16), pools of random data, identity tables.
void bench(int32_t batch, int64_t context, int32_t new_tokens) {
  const int32_t H = 32, KVH = 8, Dh = 128, B = 16;
  // Positions 0 .. context - 1: the last query sees `context` keys.
  const int32_t blocks_per_seq = static_cast<int32_t>((context + B - 1) / B);
  const size_t pool_elems = static_cast<size_t>(batch) * blocks_per_seq * B * KVH * Dh;
  const int32_t T = batch * new_tokens;
  std::vector<int32_t> tables(static_cast<size_t>(batch) * blocks_per_seq);
  std::iota(tables.begin(), tables.end(), 0);
  std::vector<int32_t> cu(batch + 1);
  for (int32_t e = 0; e <= batch; ++e) cu[e] = e * new_tokens;
  std::vector<int64_t> start(batch, context - new_tokens);
  void *q, *k, *v, *kp, *vp, *out;
  CHECK(cudaMalloc(&q, size_t{2} * T * H * Dh));
  CHECK(cudaMalloc(&k, size_t{2} * T * KVH * Dh));
  CHECK(cudaMalloc(&v, size_t{2} * T * KVH * Dh));
  CHECK(cudaMalloc(&out, size_t{2} * T * H * Dh));
  CHECK(cudaMalloc(&kp, 2 * pool_elems));
  CHECK(cudaMalloc(&vp, 2 * pool_elems));
  // Zeros: the values do not change the timing, only NaN-freedom matters.
  CHECK(cudaMemset(q, 0, size_t{2} * T * H * Dh));
  CHECK(cudaMemset(k, 0, size_t{2} * T * KVH * Dh));
  CHECK(cudaMemset(v, 0, size_t{2} * T * KVH * Dh));
  CHECK(cudaMemset(kp, 0, 2 * pool_elems));
  CHECK(cudaMemset(vp, 0, 2 * pool_elems));

  AttentionParams p;
  p.tensors.q = q;
  p.tensors.k_new = k;
  p.tensors.v_new = v;
  p.tensors.k_pool = kp;
  p.tensors.v_pool = vp;
  p.tensors.out = out;
  PagedKvView& kv = p.tensors.kv;
  kv.block_tables = to_device(tables);
  kv.cu_seqlens = to_device(cu);
  kv.start_pos = to_device(start);
  kv.n_entries = batch;
  kv.max_blocks = blocks_per_seq;
  kv.layout.block_size = B;
  kv.plan_from_host(cu.data(), start.data());
  p.tensors.n_heads = H;
  p.tensors.n_kv_heads = KVH;
  p.tensors.head_dim = Dh;
  p.tensors.scale = 1.0f / std::sqrt(128.0f);
  p.dtype = DType::kBF16;
  p.n_tokens = T;
  p.max_query_len = new_tokens;
  p.max_context = context;
  const size_t ws_bytes = mc::cuda::attention_workspace_bytes(p);
  if (ws_bytes > 0) CHECK(cudaMalloc(&p.workspace, ws_bytes));
  const float ms = time_ms(p, 20);
  if (new_tokens == 1) {
    const double bytes = 2.0 * batch * context * KVH * Dh * 2;  // K and V, bf16, once per kv head
    std::printf("decode  batch %3d context %6lld: %8.1f us  %7.1f GB/s\n", batch, static_cast<long long>(context),
                ms * 1e3, bytes / (ms * 1e-3) / 1e9);
  } else {
    const double flops = 4.0 * batch * H * Dh * (static_cast<double>(new_tokens) * new_tokens / 2);  // causal
    std::printf("prefill batch %3d tokens  %6d: %8.1f us  %7.1f TFLOP/s\n", batch, new_tokens, ms * 1e3,
                flops / (ms * 1e-3) / 1e12);
  }
  for (const void* ptr : {static_cast<const void*>(q), static_cast<const void*>(k), static_cast<const void*>(v),
                          static_cast<const void*>(kp), static_cast<const void*>(vp), static_cast<const void*>(out),
                          static_cast<const void*>(p.workspace), static_cast<const void*>(kv.block_tables),
                          static_cast<const void*>(kv.cu_seqlens), static_cast<const void*>(kv.start_pos)}) {
    CHECK(cudaFree(const_cast<void*>(ptr)));
  }
}

}  // namespace

int main(int argc, char** argv) {
  int passed = 0;
  int failed = 0;
  uint32_t seed = 1;
  for (const Case& c : parity_cases()) {
    for (DType dtype : {DType::kBF16, DType::kF16}) {
      // bf16 keeps 8 mantissa bits, f16 11: the output and P (fed to the tensor cores) are
      // rounded to them.
      const float tolerance = dtype == DType::kBF16 ? 1.5e-2f : 3e-3f;
      float err = 0.0f;
      try {
        err = dtype == DType::kBF16 ? max_error<__nv_bfloat16>(c, seed) : max_error<__half>(c, seed);
      } catch (const std::exception& e) {
        std::printf("FAIL %-36s %s: %s\n", c.name.c_str(), mc::dtype_name(dtype), e.what());
        ++failed;
        continue;
      }
      ++seed;
      const bool ok = err <= tolerance;  // false for NaN
      std::printf("%s %-36s %s max|err| %.2e\n", ok ? "ok  " : "FAIL", c.name.c_str(), mc::dtype_name(dtype), err);
      ++(ok ? passed : failed);
    }
  }
  if (argc < 2 || std::strcmp(argv[1], "parity") != 0) {
    for (int32_t batch : {1, 64}) {
      for (int64_t context : {512, 4096, 32768}) bench(batch, context, 1);
    }
    bench(1, 4096, 4096);
    bench(8, 2048, 2048);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
