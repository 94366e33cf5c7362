// Decode attention (one new token per entry), flash-decoding style.
//
// Grid (entry, kv_head, split). One CTA serves the whole query group of its kv head, so each
// K/V row is read from memory once per kv head. A split walks a contiguous range of the visible
// positions first_visible(q_pos) .. q_pos; with several splits, each CTA writes its normalized
// partial output and log-sum-exp and merge_splits combines them.
//
// Inside a CTA (4 warps): a K/V row of Dh elements is read by Dh/8 lanes, 16 bytes each, so a
// warp reads 32/(Dh/8) keys per pass (2 for Dh=128) and kUnroll passes are in flight per
// iteration. Every lane group keeps its own online-softmax state (running max m, sum l, output
// acc for its 8 dims) per query head; the states are merged at the end, first across the lane
// groups of a warp (shuffles), then across warps (shared memory).
#include <cmath>

#include "cuda/attention_kernels.cuh"

namespace mc::cuda::detail {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <int kHeadDim, int kGroup>
struct DecodeShape {
  static constexpr int kLanesPerKey = kHeadDim / 8;          // 16 bytes of a row per lane
  static constexpr int kKeysPerWarp = 32 / kLanesPerKey;     // keys one warp pass reads
  static constexpr int kUnroll = kGroup <= 4 ? 4 : 2;        // passes per iteration (loads in flight)
  static constexpr int kKeysPerIter = kWarps * kKeysPerWarp * kUnroll;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim 64 or 128");
};

// Online softmax in the exp2 domain, robust to "no key yet" (m = -inf): returns the max to
// subtract, 0 when every score so far is -inf, so that exp2(-inf - 0) = 0 and never NaN.
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// p.out [T, H, Dh] (or the split partials) for the single query of each entry.
template <typename T, int kHeadDim, int kGroup>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const AttentionParamsT<T> p, const DecodeWorkspace ws) {
  using Shape = DecodeShape<kHeadDim, kGroup>;
  constexpr int kLanesPerKey = Shape::kLanesPerKey;
  constexpr int kKeysPerWarp = Shape::kKeysPerWarp;
  constexpr int kUnroll = Shape::kUnroll;
  constexpr int kKeysPerIter = Shape::kKeysPerIter;

  const int32_t entry = blockIdx.x;
  const int32_t kv_head = blockIdx.y;
  const int32_t split = blockIdx.z;
  const int32_t n_splits = gridDim.z;
  const int32_t token = p.kv.cu_seqlens[entry];
  if (p.kv.cu_seqlens[entry + 1] == token) return;  // entry with no new token in this step

  // The single query sits at q_pos = start; it sees keys first .. q_pos (q_pos itself in k_new).
  const int64_t q_pos = p.kv.start_pos[entry];
  const int64_t first = p.kv.layout.first_visible(q_pos);
  const int64_t n_keys = q_pos - first + 1;
  // Split s covers [first + s * chunk, +chunk) clipped to q_pos; chunk is a multiple of the
  // iteration so that only the last iteration of a split has out-of-range keys. Worked example:
  // n_keys=1000, 4 splits, 32 keys per iteration -> chunk=256: [0,256) .. [768,1000).
  const int64_t chunk = (n_keys + n_splits - 1) / n_splits;
  const int64_t chunk_aligned = (chunk + kKeysPerIter - 1) / kKeysPerIter * kKeysPerIter;
  const int64_t k_begin = first + split * chunk_aligned;
  const int64_t k_end = min(k_begin + chunk_aligned, q_pos + 1);  // k_begin >= k_end: empty split

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int key_lane = lane / kLanesPerKey;      // which of the warp's keys of a pass
  const int d0 = (lane % kLanesPerKey) * 8;      // first of this lane's 8 dims

  // q of the group's heads [G, 8 dims of this lane], pre-scaled into the exp2 domain.
  const float q_scale = p.scale * kLog2e;
  float q[kGroup][8];
  const T* q_base = p.q + (static_cast<int64_t>(token) * p.n_heads + query_head(kv_head, 0, kGroup)) * kHeadDim + d0;
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    unpack8<T>(*reinterpret_cast<const uint4*>(q_base + g * kHeadDim), q[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[g][i] *= q_scale;
  }

  float m[kGroup];
  float l[kGroup];
  float acc[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
  }

  const KvRows<T> rows(p, entry, kv_head, d0);
  for (int64_t base = k_begin; base < k_end; base += kKeysPerIter) {
    // Issue every load of the iteration before using any: kUnroll K and V rows per lane group.
    uint4 k_raw[kUnroll];
    uint4 v_raw[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t pos = base + (warp * kUnroll + u) * kKeysPerWarp + key_lane;
      valid[u] = pos < k_end;
      k_raw[u] = make_uint4(0, 0, 0, 0);
      v_raw[u] = make_uint4(0, 0, 0, 0);  // zero, not garbage: p * v must stay finite
      if (valid[u]) {
        const T* k;
        const T* v;
        rows.at(pos, k, v);
        // Read once per step: streaming loads keep the K/V stream from evicting the rest of L2.
        k_raw[u] = __ldcs(reinterpret_cast<const uint4*>(k));
        v_raw[u] = __ldcs(reinterpret_cast<const uint4*>(v));
      }
    }

    // Scores [kUnroll, G]: partial dot products over 8 dims, summed across the key's lanes
    // (an aligned block of kLanesPerKey lanes, so xor offsets < kLanesPerKey stay inside it).
    float s[kUnroll][kGroup];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[8];
      unpack8<T>(k_raw[u], k);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(q[g][i], k[i], dot);
#pragma unroll
        for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        s[u][g] = valid[u] ? dot : -INFINITY;
      }
    }

    // Online softmax update per head: one rescale per iteration, not per key.
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float tile_max = s[0][g];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) tile_max = fmaxf(tile_max, s[u][g]);
      const float m_new = fmaxf(m[g], tile_max);
      const float m_sub = safe_max(m_new);
      const float alpha = exp2f(m[g] - m_sub);
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
      m[g] = m_new;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float weight = exp2f(s[u][g] - m_sub);
        l[g] += weight;
        float v[8];
        unpack8<T>(v_raw[u], v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(weight, v[i], acc[g][i]);
      }
    }
  }

  // Merge the warp's lane groups: lanes lane ^ offset (offset >= kLanesPerKey) hold the same dims.
#pragma unroll
  for (int offset = kLanesPerKey; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[g], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[g], offset);
      const float m_new = fmaxf(m[g], m_other);
      const float m_sub = safe_max(m_new);
      const float a = exp2f(m[g] - m_sub);
      const float b = exp2f(m_other - m_sub);
      l[g] = l[g] * a + l_other * b;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float other = __shfl_xor_sync(0xffffffffu, acc[g][i], offset);
        acc[g][i] = acc[g][i] * a + other * b;
      }
      m[g] = m_new;
    }
  }

  // Merge the warps through shared memory.
  __shared__ float red_m[kWarps][kGroup];
  __shared__ float red_l[kWarps][kGroup];
  __shared__ float red_acc[kWarps][kGroup][kHeadDim];
  if (key_lane == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) red_acc[warp][g][d0 + i] = acc[g][i];
      if (lane == 0) {
        red_m[warp][g] = m[g];
        red_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < kGroup * kHeadDim; idx += kThreads) {
    const int g = idx / kHeadDim;
    const int d = idx % kHeadDim;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, red_m[w][g]);
    const float m_sub = safe_max(m_all);
    float l_all = 0.0f;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(red_m[w][g] - m_sub);
      l_all += red_l[w][g] * a;
      o += red_acc[w][g][d] * a;
    }
    const int64_t head_row = static_cast<int64_t>(token) * p.n_heads + query_head(kv_head, g, kGroup);  // [T, H] row
    if (n_splits == 1) {
      p.out[head_row * kHeadDim + d] = from_float<T>(o / l_all);  // l_all > 0: the query sees itself
    } else {
      const int64_t slot = head_row * n_splits + split;
      ws.partial_out[slot * kHeadDim + d] = l_all > 0.0f ? o / l_all : 0.0f;
      if (d == 0) ws.partial_lse[slot] = l_all > 0.0f ? m_all + log2f(l_all) : -INFINITY;
    }
  }
}

// out[t, h, :] = sum_s 2^(lse_s - lse) * partial_out[t, h, s, :], lse = log2(sum_s 2^lse_s).
// Grid T * H, one thread per dim. Splits that saw no keys have lse = -inf: weight 0. Split 0
// always has keys (the range starts at first_visible), so the max is finite.
template <typename T>
__global__ void merge_splits(const DecodeWorkspace ws, T* __restrict__ out, int32_t head_dim) {
  const int64_t head_row = blockIdx.x;  // t * H + h
  const int d = threadIdx.x;
  const float* lse = ws.partial_lse + head_row * ws.n_splits;
  float lse_max = -INFINITY;
  for (int s = 0; s < ws.n_splits; ++s) lse_max = fmaxf(lse_max, lse[s]);
  float sum = 0.0f;
  float o = 0.0f;
  for (int s = 0; s < ws.n_splits; ++s) {
    const float w = exp2f(lse[s] - lse_max);
    sum += w;
    o += w * ws.partial_out[(head_row * ws.n_splits + s) * head_dim + d];
  }
  out[head_row * head_dim + d] = from_float<T>(o / sum);
}

template <typename T, int kHeadDim, int kGroup>
void launch(const AttentionParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  const AttentionParamsT<T> tp = typed<T>(p.tensors);
  const dim3 grid(tp.kv.n_entries, tp.n_kv_heads, ws.n_splits);
  decode_kernel<T, kHeadDim, kGroup><<<grid, kThreads, 0, stream>>>(tp, ws);
  MC_CUDA_CHECK_LAUNCH();
  if (ws.n_splits > 1) {
    merge_splits<T><<<p.n_tokens * tp.n_heads, kHeadDim, 0, stream>>>(ws, tp.out, kHeadDim);
    MC_CUDA_CHECK_LAUNCH();
  }
}

template <typename T, int kHeadDim>
void launch_for_group(const AttentionParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  switch (query_group_size(p.tensors.n_heads, p.tensors.n_kv_heads)) {
    case 1: return launch<T, kHeadDim, 1>(p, ws, stream);
    case 2: return launch<T, kHeadDim, 2>(p, ws, stream);
    case 3: return launch<T, kHeadDim, 3>(p, ws, stream);
    case 4: return launch<T, kHeadDim, 4>(p, ws, stream);
    case 5: return launch<T, kHeadDim, 5>(p, ws, stream);
    case 6: return launch<T, kHeadDim, 6>(p, ws, stream);
    case 7: return launch<T, kHeadDim, 7>(p, ws, stream);
    case 8: return launch<T, kHeadDim, 8>(p, ws, stream);
  }
  fail(ErrorKind::kUnsupported, "decode attention: query group ", p.tensors.n_heads / p.tensors.n_kv_heads,
       " above ", kDecodeMaxGroup);
}

// dispatch_half's callback: the dtype picks T, head_dim and the group pick the instance.
struct DecodeLauncher {
  const AttentionParams& p;
  const DecodeWorkspace& ws;
  cudaStream_t stream;

  template <typename T>
  void operator()() const {
    if (p.tensors.head_dim == 64) {
      launch_for_group<T, 64>(p, ws, stream);
    } else {
      launch_for_group<T, 128>(p, ws, stream);
    }
  }
};

}  // namespace

void launch_decode(const AttentionParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  dispatch_half(p.dtype, DecodeLauncher{p, ws, stream});
}

}  // namespace mc::cuda::detail
