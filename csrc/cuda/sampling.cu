// The sampling op on the GPU (SampleParams, core/op_params.h), with the CPU reference's
// semantics (cpu/sampling.cpp): one CTA per row of logits, the processed row in the workspace.
// Thresholds are found without sorting: top-k by a radix select over order-preserving keys of
// the float values, top-p by a bisection over the same keys on the mass strictly above a value
// (the kept set is every token above the cut value v*, plus the first tied tokens at v* by id,
// exactly the CPU's sorted scan). Only ids and the requested logprobs leave the device.
// Shapes: R = rows, V = vocab.
#include <cfloat>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/sampling.cuh"

namespace mc::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

// Order-preserving key of a float: a > b  <=>  key(a) > key(b) (for non-NaN values).
__device__ __forceinline__ uint32_t order_key(float value) {
  const uint32_t bits = __float_as_uint(value);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? key & 0x7fffffffu : ~key);
}

// Block-wide reductions; every thread gets the result. `scratch` holds kWarps entries.
__device__ double block_sum(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// The (value, index) with the largest value, ties to the lower index.
struct Best {
  double value;
  int index;
};
__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}
__device__ Best block_best(Best best, Best* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    Best other{__shfl_xor_sync(0xffffffffu, best.value, offset), __shfl_xor_sync(0xffffffffu, best.index, offset)};
    best = better(best, other);
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = best;
  __syncthreads();
  Best total{0.0, -1};
  for (int w = 0; w < kWarps; ++w) total = better(total, scratch[w]);
  return total;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(SampleParams p) {
  __shared__ double sums[kWarps];
  __shared__ Best bests[kWarps];
  __shared__ int counts[kWarps];
  __shared__ uint32_t histogram[256];
  const int r = blockIdx.x;
  const int V = p.vocab;
  const SamplingControls c = p.controls[r];
  const float* raw = p.logits + static_cast<int64_t>(r) * V;
  float* x = static_cast<float*>(p.workspace) + static_cast<int64_t>(r) * V;
  constexpr float kNegInf = -INFINITY;

  // ---- masks, bias, penalties: the CPU's order (lists touch distinct ids, phase by phase) ----
  for (int i = threadIdx.x; i < V; i += kThreads) x[i] = (c.vocab_limit > 0 && i >= c.vocab_limit) ? kNegInf : raw[i];
  __syncthreads();
  for (int j = p.banned_offsets[r] + threadIdx.x; j < p.banned_offsets[r + 1]; j += kThreads) x[p.banned_ids[j]] = kNegInf;
  __syncthreads();
  for (int j = p.bias_offsets[r] + threadIdx.x; j < p.bias_offsets[r + 1]; j += kThreads) x[p.bias_ids[j]] += p.bias_values[j];
  __syncthreads();
  for (int j = p.history_offsets[r] + threadIdx.x; j < p.history_offsets[r + 1]; j += kThreads) {
    float v = x[p.history_ids[j]];
    if (c.repetition_penalty != 1.0f) v = v > 0 ? v / c.repetition_penalty : v * c.repetition_penalty;
    const int count = p.output_counts[j];
    if (count > 0) v -= c.presence_penalty + c.frequency_penalty * static_cast<float>(count);
    x[p.history_ids[j]] = v;
  }
  __syncthreads();

  auto argmax = [&]() {
    Best best{0.0, -1};
    for (int i = threadIdx.x; i < V; i += kThreads) best = better(best, Best{static_cast<double>(x[i]), i});
    return block_best(best, bests);
  };

  int token;
  if (c.temperature == 0.0f) {
    token = argmax().index;
  } else {
    for (int i = threadIdx.x; i < V; i += kThreads) x[i] /= c.temperature;
    __syncthreads();
    if (c.min_p > 0.0f) {
      const double threshold = argmax().value + log(static_cast<double>(c.min_p));
      for (int i = threadIdx.x; i < V; i += kThreads)
        if (static_cast<double>(x[i]) < threshold) x[i] = kNegInf;
      __syncthreads();
    }
    if (c.top_k > 0 && c.top_k < V) {
      // Radix select of the k-th largest key, 8 bits at a time from the top.
      uint32_t prefix = 0, mask = 0;
      int remaining = c.top_k;
      for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += kThreads) histogram[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += kThreads) {
          const uint32_t key = order_key(x[i]);
          if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        int digit = 255;
        for (; digit > 0; --digit) {
          if (static_cast<int>(histogram[digit]) >= remaining) break;
          remaining -= static_cast<int>(histogram[digit]);
        }
        prefix |= static_cast<uint32_t>(digit) << shift;
        mask |= 0xffu << shift;
        __syncthreads();
      }
      const float kth = key_value(prefix);  // ties with the k-th value stay, as in vLLM
      for (int i = threadIdx.x; i < V; i += kThreads)
        if (x[i] < kth) x[i] = kNegInf;
      __syncthreads();
    }
    if (c.top_p < 1.0f) {
      const double top = argmax().value;
      double sum = 0.0;
      for (int i = threadIdx.x; i < V; i += kThreads)
        if (x[i] != kNegInf) sum += exp(static_cast<double>(x[i]) - top);
      sum = block_sum(sum, sums);
      // v* = the smallest value whose strictly-greater mass is below top_p (bisection on keys).
      uint32_t low = 0, high = order_key(static_cast<float>(top));
      while (low < high) {
        const uint32_t mid = low + (high - low) / 2;
        double above = 0.0;
        for (int i = threadIdx.x; i < V; i += kThreads)
          if (x[i] != kNegInf && order_key(x[i]) > mid) above += exp(static_cast<double>(x[i]) - top) / sum;
        above = block_sum(above, sums);
        if (above < static_cast<double>(c.top_p)) {
          high = mid;
        } else {
          low = mid + 1;
        }
      }
      // Every token above v* stays; of the tokens at v*, the first m by id while the mass stays below.
      const float cut = key_value(high);
      double above = 0.0;
      for (int i = threadIdx.x; i < V; i += kThreads)
        if (x[i] != kNegInf && x[i] > cut) above += exp(static_cast<double>(x[i]) - top) / sum;
      above = block_sum(above, sums);
      const double tie_mass = exp(static_cast<double>(cut) - top) / sum;
      if (threadIdx.x == 0) {
        double mass = above;
        for (int i = 0; i < V; ++i)
          if (x[i] == cut) {
            if (mass >= static_cast<double>(c.top_p)) x[i] = kNegInf;
            mass += tie_mass;
          }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < V; i += kThreads)
        if (x[i] < cut) x[i] = kNegInf;
      __syncthreads();
    }
    Best best{0.0, -1};
    for (int i = threadIdx.x; i < V; i += kThreads)
      if (x[i] != kNegInf) best = better(best, Best{static_cast<double>(x[i]) + sampling_noise(c.seed, c.stream, c.position, i), i});
    best = block_best(best, bests);
    token = best.index >= 0 ? best.index : argmax().index;
  }
  if (threadIdx.x == 0) p.tokens[r] = token;
  if (c.n_logprobs < 0) return;

  // ---- logprobs of the raw distribution, over the ids below vocab_limit ----
  const int VL = c.vocab_limit > 0 && c.vocab_limit < V ? c.vocab_limit : V;
  Best top{0.0, -1};
  for (int i = threadIdx.x; i < VL; i += kThreads) top = better(top, Best{static_cast<double>(raw[i]), i});
  top = block_best(top, bests);
  double sum = 0.0;
  for (int i = threadIdx.x; i < VL; i += kThreads) sum += exp(static_cast<double>(raw[i]) - top.value);
  sum = block_sum(sum, sums);
  const double log_norm = top.value + log(sum);
  const float chosen = raw[token];
  int larger = 0;
  for (int i = threadIdx.x; i < VL; i += kThreads) larger += raw[i] > chosen;
  for (int offset = 16; offset > 0; offset /= 2) larger += __shfl_xor_sync(0xffffffffu, larger, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) counts[threadIdx.x / 32] = larger;
  __syncthreads();
  if (threadIdx.x == 0) {
    int rank = 1;
    for (int w = 0; w < kWarps; ++w) rank += counts[w];
    p.token_ranks[r] = rank;
    p.token_logprobs[r] = static_cast<float>(static_cast<double>(chosen) - log_norm);
  }
  // Top n by raw logit (ties to the lower id): n rounds, each below the previous in that order.
  const int n = min(max(c.n_logprobs, 0), min(p.max_logprobs, VL));
  double previous = INFINITY;
  int previous_id = -1;
  for (int j = 0; j < p.max_logprobs; ++j) {
    const int64_t at = static_cast<int64_t>(r) * p.max_logprobs + j;
    if (j >= n) {
      if (threadIdx.x == 0) {
        p.top_ids[at] = -1;
        p.top_logprobs[at] = 0.0f;
      }
      continue;
    }
    Best best{0.0, -1};
    for (int i = threadIdx.x; i < VL; i += kThreads) {
      const double v = raw[i];
      if (v < previous || (v == previous && i > previous_id)) best = better(best, Best{v, i});
    }
    best = block_best(best, bests);
    if (threadIdx.x == 0) {
      p.top_ids[at] = best.index;
      p.top_logprobs[at] = static_cast<float>(best.value - log_norm);
    }
    previous = best.value;
    previous_id = best.index;
  }
}

}  // namespace

size_t sample_workspace_bytes(int32_t rows, int32_t vocab) {
  return static_cast<size_t>(rows) * vocab * sizeof(float);
}

void sample(const SampleParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return;
  sample_kernel<<<p.n_rows, kThreads, 0, stream>>>(p);
  MC_CUDA_CHECK_LAUNCH();
}

}  // namespace mc::cuda
