#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace mc::cpu {
namespace {

float dot(const float* a, const float* b, int32_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int32_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

void paged_attention(const AttentionParamsT<float>& p) {
  const PagedKvView& kv = p.kv;
  const int32_t total_tokens = kv.cu_seqlens[kv.n_entries];
  const int32_t group = query_group_size(p.n_heads, p.n_kv_heads);
  const int32_t dh = p.head_dim;
  const int64_t kv_stride = static_cast<int64_t>(p.n_kv_heads) * dh;  // one token's K row

  // Multiply-adds of the step, to skip the thread team when it would cost more than it saves.
  int64_t work = 0;
  for (int32_t e = 0; e < kv.n_entries; ++e) {
    const int64_t tokens = kv.cu_seqlens[e + 1] - kv.cu_seqlens[e];
    const int64_t end = kv.start_pos[e] + tokens;
    work += tokens * (kv.layout.window > 0 && kv.layout.window < end ? kv.layout.window : end);
  }
  work *= static_cast<int64_t>(p.n_heads) * dh * 2;

  // One work item = one token x one KV head: each key is loaded once for the whole query group.
#pragma omp parallel if (work >= (int64_t{1} << 18))
  {
    std::vector<float> scores;  // [group, keys]
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < static_cast<int64_t>(total_tokens) * p.n_kv_heads; ++item) {
      const int32_t token = static_cast<int32_t>(item / p.n_kv_heads);
      const int32_t kv_head = static_cast<int32_t>(item % p.n_kv_heads);
      const int32_t entry = static_cast<int32_t>(
          std::upper_bound(kv.cu_seqlens, kv.cu_seqlens + kv.n_entries + 1, token) - kv.cu_seqlens - 1);
      const int64_t start = kv.start_pos[entry];
      const int64_t q_pos = start + (token - kv.cu_seqlens[entry]);
      const int64_t first = kv.layout.first_visible(q_pos);
      const int64_t n_keys = q_pos - first + 1;
      const int32_t* table = kv.block_tables + static_cast<int64_t>(entry) * kv.max_blocks;
      const int64_t entry_row0 = kv.cu_seqlens[entry];

      // Key/value row of position `pos`: this step's activations, or the cache for the prefix.
      auto row_of = [&](const float* fresh, const float* pool, int64_t pos) {
        const KvRow where = kv_row(kv.layout, table, start, entry_row0, pos);
        return (where.fresh ? fresh : pool) + where.row * kv_stride + static_cast<int64_t>(kv_head) * dh;
      };

      scores.assign(static_cast<size_t>(group) * n_keys, 0.0f);
      const float* q_base = p.q + (static_cast<int64_t>(token) * p.n_heads + query_head(kv_head, 0, group)) * dh;
      for (int64_t j = 0; j < n_keys; ++j) {
        const float* k = row_of(p.k_new, p.k_pool, first + j);
        for (int32_t g = 0; g < group; ++g) scores[g * n_keys + j] = dot(q_base + g * dh, k, dh) * p.scale;
      }
      for (int32_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * n_keys;
        float max_score = *std::max_element(s, s + n_keys);
        float sum = 0.0f;
        for (int64_t j = 0; j < n_keys; ++j) {
          s[j] = std::exp(s[j] - max_score);
          sum += s[j];
        }
        for (int64_t j = 0; j < n_keys; ++j) s[j] /= sum;
      }
      float* out_base = p.out + (static_cast<int64_t>(token) * p.n_heads + query_head(kv_head, 0, group)) * dh;
      std::fill(out_base, out_base + static_cast<int64_t>(group) * dh, 0.0f);
      for (int64_t j = 0; j < n_keys; ++j) {
        const float* v = row_of(p.v_new, p.v_pool, first + j);
        for (int32_t g = 0; g < group; ++g) {
          const float w = scores[g * n_keys + j];
          float* o = out_base + g * dh;
#pragma omp simd
          for (int32_t d = 0; d < dh; ++d) o[d] += w * v[d];
        }
      }
    }
  }
}

void kv_append(const KvAppendParamsT<float>& p) {
  const PagedKvView& kv = p.kv;
  const int64_t kv_dim = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
  for (int32_t e = 0; e < kv.n_entries; ++e) {
    const int64_t start = kv.start_pos[e];
    const int64_t end = start + (kv.cu_seqlens[e + 1] - kv.cu_seqlens[e]);
    const int32_t* table = kv.block_tables + static_cast<int64_t>(e) * kv.max_blocks;
    for (int64_t pos = kv.layout.first_kept(start, end); pos < end; ++pos) {
      const int64_t src = (kv.cu_seqlens[e] + (pos - start)) * kv_dim;
      const int64_t dst = kv.layout.pool_row(table, pos) * kv_dim;
      std::memcpy(p.k_pool + dst, p.k + src, kv_dim * sizeof(float));
      std::memcpy(p.v_pool + dst, p.v + src, kv_dim * sizeof(float));
    }
  }
}

}  // namespace mc::cpu
