#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace mc::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The processed logits of row r (masks, bias, penalties), in x [V].
void process(const SampleParams& p, int32_t r, float* x) {
  const SamplingControls& c = p.controls[r];
  const float* raw = p.logits + static_cast<int64_t>(r) * p.vocab;
  std::copy(raw, raw + p.vocab, x);
  for (int32_t id = std::max(c.vocab_limit, 0); id < p.vocab && c.vocab_limit > 0; ++id) x[id] = kNegInf;
  for (int32_t i = p.banned_offsets[r]; i < p.banned_offsets[r + 1]; ++i) x[p.banned_ids[i]] = kNegInf;
  for (int32_t i = p.bias_offsets[r]; i < p.bias_offsets[r + 1]; ++i) x[p.bias_ids[i]] += p.bias_values[i];
  for (int32_t i = p.history_offsets[r]; i < p.history_offsets[r + 1]; ++i) {
    float& v = x[p.history_ids[i]];
    if (c.repetition_penalty != 1.0f) v = v > 0 ? v / c.repetition_penalty : v * c.repetition_penalty;
    const int32_t count = p.output_counts[i];
    if (count > 0) v -= c.presence_penalty + c.frequency_penalty * static_cast<float>(count);
  }
}

// The first index of the largest value (ties to the lower id).
int32_t argmax(const float* x, int32_t n) { return static_cast<int32_t>(std::max_element(x, x + n) - x); }

int32_t draw(const SampleParams& p, int32_t r, float* x, int32_t* order) {
  const SamplingControls& c = p.controls[r];
  const int32_t V = p.vocab;
  if (c.temperature == 0.0f) return argmax(x, V);
  for (int32_t i = 0; i < V; ++i) x[i] /= c.temperature;
  if (c.min_p > 0.0f) {
    // p_i < min_p * p_max  <=>  x_i - x_max < log(min_p), in double
    const double threshold = static_cast<double>(x[argmax(x, V)]) + std::log(static_cast<double>(c.min_p));
    for (int32_t i = 0; i < V; ++i)
      if (static_cast<double>(x[i]) < threshold) x[i] = kNegInf;
  }
  if (c.top_k > 0 && c.top_k < V) {
    std::vector<float> values(x, x + V);
    std::nth_element(values.begin(), values.begin() + (c.top_k - 1), values.end(), std::greater<float>());
    const float kth = values[c.top_k - 1];  // ties with the k-th value stay, as in vLLM
    for (int32_t i = 0; i < V; ++i)
      if (x[i] < kth) x[i] = kNegInf;
  }
  if (c.top_p < 1.0f) {
    // Keep a token while the probability mass ranked strictly above it is below top_p (ranked by
    // value, ties to the lower id): the most likely token always stays.
    const double top = x[argmax(x, V)];
    int32_t n = 0;
    double sum = 0.0;
    for (int32_t i = 0; i < V; ++i)
      if (x[i] != kNegInf) {
        order[n++] = i;
        sum += std::exp(static_cast<double>(x[i]) - top);
      }
    std::sort(order, order + n, [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
    double above = 0.0;
    for (int32_t j = 0; j < n; ++j) {
      const int32_t id = order[j];
      if (above >= static_cast<double>(c.top_p)) {
        x[id] = kNegInf;
      } else {
        above += std::exp(static_cast<double>(x[id]) - top) / sum;
      }
    }
  }
  int32_t best = -1;
  double best_score = -std::numeric_limits<double>::infinity();
  for (int32_t i = 0; i < V; ++i) {
    if (x[i] == kNegInf) continue;
    const double score = static_cast<double>(x[i]) + sampling_noise(c.seed, c.stream, c.position, i);
    if (best < 0 || score > best_score) {
      best = i;
      best_score = score;
    }
  }
  return best >= 0 ? best : argmax(x, V);
}

void logprobs(const SampleParams& p, int32_t r, int32_t token, int32_t* order) {
  const SamplingControls& c = p.controls[r];
  const float* raw = p.logits + static_cast<int64_t>(r) * p.vocab;
  // The raw distribution over the ids that exist for the tokenizer (vocab_limit truncates).
  const int32_t V = c.vocab_limit > 0 && c.vocab_limit < p.vocab ? c.vocab_limit : p.vocab;
  const double top = raw[argmax(raw, V)];
  double sum = 0.0;
  for (int32_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(raw[i]) - top);
  const double log_norm = top + std::log(sum);
  p.token_logprobs[r] = static_cast<float>(raw[token] - log_norm);
  int32_t rank = 1;
  for (int32_t i = 0; i < V; ++i) rank += raw[i] > raw[token];
  p.token_ranks[r] = rank;
  const int32_t n = std::min(std::max(c.n_logprobs, 0), std::min(p.max_logprobs, V));
  std::iota(order, order + V, 0);
  std::partial_sort(order, order + n, order + V,
                    [&](int32_t a, int32_t b) { return raw[a] > raw[b] || (raw[a] == raw[b] && a < b); });
  for (int32_t j = 0; j < p.max_logprobs; ++j) {
    const int64_t at = static_cast<int64_t>(r) * p.max_logprobs + j;
    p.top_ids[at] = j < n ? order[j] : -1;
    p.top_logprobs[at] = j < n ? static_cast<float>(raw[order[j]] - log_norm) : 0.0f;
  }
}

}  // namespace

size_t sample_workspace_bytes(int32_t rows, int32_t vocab) {
  return static_cast<size_t>(rows) * vocab * (sizeof(float) + sizeof(int32_t));
}

void sample(const SampleParams& p) {
  auto* x_all = static_cast<float*>(p.workspace);
  auto* order_all = reinterpret_cast<int32_t*>(x_all + static_cast<int64_t>(p.n_rows) * p.vocab);
#pragma omp parallel for schedule(dynamic, 1) if (p.n_rows > 1 && static_cast<int64_t>(p.n_rows) * p.vocab > 65536)
  for (int32_t r = 0; r < p.n_rows; ++r) {
    float* x = x_all + static_cast<int64_t>(r) * p.vocab;
    int32_t* order = order_all + static_cast<int64_t>(r) * p.vocab;
    process(p, r, x);
    const int32_t token = draw(p, r, x, order);
    p.tokens[r] = token;
    if (p.controls[r].n_logprobs >= 0) logprobs(p, r, token, order);
  }
}

}  // namespace mc::cpu
