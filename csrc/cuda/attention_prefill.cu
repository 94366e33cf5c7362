// Prefill attention (any mix of chunk lengths), flash-attention style on tensor cores (WMMA).
//
// Grid (entry x query tile, kv_head). A CTA owns 64 query rows of one kv head: row r is
// (token i0 + r / G, head kv_head * G + r % G), so the rows of a query group share every K/V
// tile. Worked example, G=4: 16 tokens per tile, row 9 = (token i0 + 2, group head 1).
// The CTA walks the key positions visible to any of its rows, first_visible(q_pos of its first
// token) .. q_pos of its last token, in tiles of 64 keys (the cached prefix through the block
// table, the chunk's own keys from k_new), double-buffered in shared memory with cp.async.
// Per tile, each of the 4 warps (16 rows) computes S = Q Kᵀ [16, 64] on tensor cores, stores
// it to shared memory, applies the causal / sliding-window mask by absolute positions and the
// online softmax there (2 lanes per row), then accumulates O += P V on tensor cores with O
// [16, Dh] kept in accumulator fragments.
#include <cmath>
#include <mma.h>

#include "cuda/attention_kernels.cuh"

namespace mc::cuda::detail {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = kWarps * 16;  // query rows (token, head) per CTA
constexpr int kBlockN = 64;           // keys per tile

// Shared memory of one CTA, in bytes from the (128-byte aligned) dynamic base. Leading
// dimensions carry 16 bytes of padding so that consecutive rows start 4 banks apart
// (conflict-free fragment loads); every fragment pointer stays 32-byte aligned, as WMMA needs.
template <int kHeadDim>
struct PrefillSmem {
  static constexpr int kLdKv = kHeadDim + 8;   // elements (T) per K/V row
  static constexpr int kLdQ = kHeadDim + 8;    // elements (T) per staged Q row
  static constexpr int kLdS = kBlockN + 4;     // floats per score row
  static constexpr int kLdP = kBlockN + 8;     // elements (T) per probability row
  static constexpr int kLdO = kHeadDim + 4;    // floats per output staging row
  static constexpr size_t kKvTile = size_t{kBlockN} * kLdKv * 2;
  // [2 stages][K, V][kBlockN, kLdKv]; after the key loop, the output staging [kBlockM, kLdO] f32.
  static constexpr size_t kKvOffset = 0;
  static constexpr size_t kKvBytes = 4 * kKvTile;
  // [kBlockM, kLdS] f32 scores; before the key loop, the Q staging [kBlockM, kLdQ] T.
  static constexpr size_t kScoreOffset = kKvOffset + kKvBytes;
  static constexpr size_t kScoreBytes = size_t{kBlockM} * (kLdS * 4 > kLdQ * 2 ? kLdS * 4 : kLdQ * 2);
  static constexpr size_t kProbOffset = kScoreOffset + kScoreBytes;  // [kBlockM, kLdP] T
  static constexpr size_t kProbBytes = size_t{kBlockM} * kLdP * 2;
  static constexpr size_t kAlphaOffset = kProbOffset + kProbBytes;  // [kBlockM] f32 rescale factors
  static constexpr size_t kBytes = kAlphaOffset + kBlockM * 4;

  static_assert(size_t{kBlockM} * kLdO * 4 <= kKvBytes, "output staging fits the K/V buffers");
  static_assert(kKvTile % 128 == 0 && kScoreBytes % 128 == 0 && kProbBytes % 128 == 0, "aligned regions");
};

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    prefill_kernel(const AttentionParamsT<T> p, int32_t n_q_tiles) {
  using Smem = PrefillSmem<kHeadDim>;
  constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte pieces of one row
  constexpr int kDimTiles = kHeadDim / 16;
  constexpr int kKeyTiles = kBlockN / 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragKt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // Kᵀ: K rows read as columns
  using FragV = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  extern __shared__ __align__(128) unsigned char smem[];
  T* kv_s = reinterpret_cast<T*>(smem + Smem::kKvOffset);
  float* score_s = reinterpret_cast<float*>(smem + Smem::kScoreOffset);
  T* prob_s = reinterpret_cast<T*>(smem + Smem::kProbOffset);
  float* alpha_s = reinterpret_cast<float*>(smem + Smem::kAlphaOffset);

  const int32_t group = query_group_size(p.n_heads, p.n_kv_heads);
  const int32_t tokens_per_tile = kBlockM / group;
  const int32_t entry = blockIdx.x / n_q_tiles;
  // Later tiles of a chunk see more keys: schedule them first.
  const int32_t q_tile = n_q_tiles - 1 - static_cast<int32_t>(blockIdx.x % n_q_tiles);
  const int32_t kv_head = blockIdx.y;
  const int32_t token0 = p.kv.cu_seqlens[entry];
  const int32_t n_q = p.kv.cu_seqlens[entry + 1] - token0;
  const int32_t i0 = q_tile * tokens_per_tile;
  if (i0 >= n_q) return;
  const int32_t i_last = min(i0 + tokens_per_tile, n_q) - 1;
  const int64_t start = p.kv.start_pos[entry];
  // Keys visible to some row: first_visible is monotonic in q_pos, and each row's range ends at
  // its own position, so the union is first_visible(start + i0) .. start + i_last, gap-free.
  const int64_t kv_lo = p.kv.layout.first_visible(start + i0);
  const int64_t kv_hi = start + i_last;
  const int32_t n_tiles = static_cast<int32_t>((kv_hi - kv_lo) / kBlockN + 1);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // Token of row r (entry-local). Padding rows (past the chunk, or r >= tokens_per_tile * G
  // when G does not divide 64) repeat the last token: finite, never stored.
  auto row_token = [&](int r) { return min(i0 + r / group, i_last); };

  // Copies key tile `tile` into buffer `stage`; positions past kv_hi become zero rows (finite, so
  // that 0 * V stays 0) and are masked for every row.
  const KvRows<T> rows(p, entry, kv_head, 0);
  auto load_tile = [&](int32_t tile, int stage) {
    T* k_dst = kv_s + static_cast<size_t>(stage * 2) * kBlockN * Smem::kLdKv;
    T* v_dst = k_dst + kBlockN * Smem::kLdKv;
    for (int c = threadIdx.x; c < kBlockN * kChunksPerRow; c += kThreads) {
      const int j = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const int64_t pos = kv_lo + static_cast<int64_t>(tile) * kBlockN + j;
      if (pos <= kv_hi) {
        const T* k;
        const T* v;
        rows.at(pos, k, v);
        cp_async_16(k_dst + j * Smem::kLdKv + col, k + col);
        cp_async_16(v_dst + j * Smem::kLdKv + col, v + col);
      } else {
        *reinterpret_cast<uint4*>(k_dst + j * Smem::kLdKv + col) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(v_dst + j * Smem::kLdKv + col) = make_uint4(0, 0, 0, 0);
      }
    }
  };

  load_tile(0, 0);
  cp_async_commit();

  // Q [kBlockM, Dh] staged through the score buffer, then kept in fragments for the whole loop.
  T* q_s = reinterpret_cast<T*>(score_s);
  for (int c = threadIdx.x; c < kBlockM * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const int64_t head_row = static_cast<int64_t>(token0 + row_token(r)) * p.n_heads + query_head(kv_head, r % group, group);
    *reinterpret_cast<uint4*>(q_s + r * Smem::kLdQ + col) =
        *reinterpret_cast<const uint4*>(p.q + head_row * kHeadDim + col);
  }
  __syncthreads();
  FragA q_frag[kDimTiles];
#pragma unroll
  for (int kk = 0; kk < kDimTiles; ++kk) {
    wmma::load_matrix_sync(q_frag[kk], q_s + warp * 16 * Smem::kLdQ + kk * 16, Smem::kLdQ);
  }
  __syncthreads();  // the Q staging becomes the score buffer

  float* s_w = score_s + warp * 16 * Smem::kLdS;  // this warp's scores [16, kLdS]
  T* p_w = prob_s + warp * 16 * Smem::kLdP;       // this warp's probabilities [16, kLdP]
  float* alpha_w = alpha_s + warp * 16;           // this warp's row rescale factors [16]

  // The element -> row map of accumulator fragments is unspecified but fixed per fragment type:
  // learn it by loading a matrix whose entries are their row index. (load, mma and store share
  // the map, since store(load(M)) = M and store(mma(...)) is the product.)
  for (int idx = lane; idx < 256; idx += 32) s_w[(idx / 16) * Smem::kLdS + idx % 16] = static_cast<float>(idx / 16);
  __syncwarp();
  FragAcc probe;
  wmma::load_matrix_sync(probe, s_w, Smem::kLdS, wmma::mem_row_major);
  int row_of[FragAcc::num_elements];
#pragma unroll
  for (int i = 0; i < FragAcc::num_elements; ++i) row_of[i] = static_cast<int>(probe.x[i]);
  __syncwarp();  // the probe is read before the first scores overwrite it

  // Softmax role of this lane: row r of the warp, keys [h * 32, h * 32 + 32) of each tile; the
  // other half of the row is lane ^ 16.
  const int r = lane % 16;
  const int h = lane / 16;
  const int64_t q_pos = start + row_token(warp * 16 + r);
  const int64_t first = p.kv.layout.first_visible(q_pos);
  const float score_scale = p.scale * kLog2e;
  float m = -INFINITY;  // running max of row r (exp2 domain)
  float l = 0.0f;       // running sum of row r

  FragAcc o_frag[kDimTiles];
#pragma unroll
  for (int f = 0; f < kDimTiles; ++f) wmma::fill_fragment(o_frag[f], 0.0f);

  for (int32_t tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) load_tile(tile + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" = this tile
    cp_async_wait<1>();
    __syncthreads();  // this tile's K/V, copied by every thread, is visible to all

    const T* k_s = kv_s + static_cast<size_t>(stage * 2) * kBlockN * Smem::kLdKv;
    const T* v_s = k_s + kBlockN * Smem::kLdKv;

    // S = Q Kᵀ for the warp's rows: [16, kBlockN].
#pragma unroll 1
    for (int j = 0; j < kKeyTiles; ++j) {
      FragAcc s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kDimTiles; ++kk) {
        FragKt k_frag;
        wmma::load_matrix_sync(k_frag, k_s + j * 16 * Smem::kLdKv + kk * 16, Smem::kLdKv);
        wmma::mma_sync(s_frag, q_frag[kk], k_frag, s_frag);
      }
      wmma::store_matrix_sync(s_w + j * 16, s_frag, Smem::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Mask by absolute positions, online softmax of row r over this lane's 32 keys: one pass for
    // the max, one for the weights (re-reading the scores is cheaper than holding 32 registers).
    const int64_t tile_pos = kv_lo + static_cast<int64_t>(tile) * kBlockN + h * 32;
    const float* s_row = s_w + r * Smem::kLdS + h * 32;
    T* p_row = p_w + r * Smem::kLdP + h * 32;
    auto masked_score = [&](int k) {
      const int64_t pos = tile_pos + k;
      return pos >= first && pos <= q_pos ? s_row[k] * score_scale : -INFINITY;
    };
    float tile_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < 32; ++k) tile_max = fmaxf(tile_max, masked_score(k));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
    const float m_new = fmaxf(m, tile_max);
    const float m_sub = m_new == -INFINITY ? 0.0f : m_new;  // row saw no key yet: exp2(-inf) = 0, no NaN
    const float alpha = exp2f(m - m_sub);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      const float weight = exp2f(masked_score(k) - m_sub);
      sum += weight;
      p_row[k] = from_float<T>(weight);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
    l = l * alpha + sum;
    m = m_new;
    if (h == 0) alpha_w[r] = alpha;
    __syncwarp();

    // O = diag(alpha) O + P V.
    float row_alpha[FragAcc::num_elements];
#pragma unroll
    for (int i = 0; i < FragAcc::num_elements; ++i) row_alpha[i] = alpha_w[row_of[i]];
#pragma unroll
    for (int f = 0; f < kDimTiles; ++f) {
#pragma unroll
      for (int i = 0; i < FragAcc::num_elements; ++i) o_frag[f].x[i] *= row_alpha[i];
    }
#pragma unroll 1
    for (int kk = 0; kk < kKeyTiles; ++kk) {
      FragA p_frag;
      wmma::load_matrix_sync(p_frag, p_w + kk * 16, Smem::kLdP);
#pragma unroll
      for (int f = 0; f < kDimTiles; ++f) {
        FragV v_frag;
        wmma::load_matrix_sync(v_frag, v_s + kk * 16 * Smem::kLdKv + f * 16, Smem::kLdKv);
        wmma::mma_sync(o_frag[f], p_frag, v_frag, o_frag[f]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // Output: stage O [16, Dh] f32 per warp in the (now idle) K/V buffers, then lane (r, h) writes
  // half h of row r, divided by the row sum, rounded to T.
  cp_async_wait<0>();
  float* o_w = reinterpret_cast<float*>(smem + Smem::kKvOffset) + warp * 16 * Smem::kLdO;
#pragma unroll
  for (int f = 0; f < kDimTiles; ++f) wmma::store_matrix_sync(o_w + f * 16, o_frag[f], Smem::kLdO, wmma::mem_row_major);
  __syncwarp();
  const int row = warp * 16 + r;
  if (i0 + row / group <= i_last) {  // a real row (not padding)
    const float inv_l = 1.0f / l;    // l > 0: every query sees its own key
    const int64_t head_row = static_cast<int64_t>(token0 + i0 + row / group) * p.n_heads + query_head(kv_head, row % group, group);
    T* dst = p.out + head_row * kHeadDim + h * (kHeadDim / 2);
    const float* src = o_w + r * Smem::kLdO + h * (kHeadDim / 2);
#pragma unroll
    for (int c = 0; c < kHeadDim / 2; c += 8) {
      uint4 packed;
      T* halves = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int i = 0; i < 8; ++i) halves[i] = from_float<T>(src[c + i] * inv_l);
      *reinterpret_cast<uint4*>(dst + c) = packed;
    }
  }
}

template <typename T, int kHeadDim>
void launch(const AttentionParams& p, cudaStream_t stream) {
  const AttentionParamsT<T> tp = typed<T>(p.tensors);
  const int32_t tokens_per_tile = kBlockM / (tp.n_heads / tp.n_kv_heads);
  const int32_t n_q_tiles = static_cast<int32_t>(ceil_div(p.max_query_len, tokens_per_tile));
  constexpr size_t kSmemBytes = PrefillSmem<kHeadDim>::kBytes;
  // Above 48 KiB, dynamic shared memory needs an opt-in per kernel (once per process).
  static const bool configured = [] {
    MC_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel<T, kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kSmemBytes)));
    return true;
  }();
  (void)configured;
  const dim3 grid(static_cast<unsigned>(n_q_tiles) * static_cast<unsigned>(tp.kv.n_entries), tp.n_kv_heads);
  prefill_kernel<T, kHeadDim><<<grid, kThreads, kSmemBytes, stream>>>(tp, n_q_tiles);
  MC_CUDA_CHECK_LAUNCH();
}

// dispatch_half's callback: the dtype picks T, head_dim the instance.
struct PrefillLauncher {
  const AttentionParams& p;
  cudaStream_t stream;

  template <typename T>
  void operator()() const {
    if (p.tensors.head_dim == 64) {
      launch<T, 64>(p, stream);
    } else {
      launch<T, 128>(p, stream);
    }
  }
};

}  // namespace

void launch_prefill(const AttentionParams& p, cudaStream_t stream) {
  dispatch_half(p.dtype, PrefillLauncher{p, stream});
}

}  // namespace mc::cuda::detail
