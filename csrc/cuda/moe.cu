// Mixtral's sparse MoE FFN on the GPU (contract and semantics in moe.cuh, reference cpu/moe.cpp).
//
// Shapes: T = tokens, E = experts, K = experts per token, D = dim, F = expert FFN width,
// P = T * K (token, expert) pairs. A pair's index is t * K + k; its slot is its position in
// sorted_pairs, so expert e's pairs fill slots offsets[e] .. offsets[e + 1].
// Workspace: act [P, F] half, row = slot: act[slot] = silu(w1_e x_t) * (w3_e x_t), so one
// expert's activations are consecutive rows (the A operand of its down projection).
//
// moe_route: one CTA of 1024 threads, no host round trip.
//   1. thread i routes tokens i, i + 1024, ... with route_top_k (the CPU backend's own helper:
//      same ties, same weights) and counts pairs per expert in shared memory (one atomic per
//      warp and expert);
//   2. thread 0 scans the E counts into expert_offsets;
//   3. the pairs are scattered in tiles of 1024 (pair base + tid): a pair's slot is
//      offsets[e] + (pairs of e in earlier tiles) + (pairs of e in earlier warps of this tile)
//      + (lanes of e below it in its warp, from __match_any_sync): ascending pair order within
//      each expert, as the CPU's counting sort, and deterministic.
//
// moe_experts, P <= kGemvMaxPairs (decode): two GEMV kernels, grid (row tiles, E). A CTA of an
// expert without pairs exits before reading anything. Each warp owns one output row: gate/up
// streams rows f (w1) and F + f (w3) once in 16-byte loads and dots them with up to kTok of the
// expert's x rows at a time (L1-cached), then SiLU-muls in registers; down streams row d of w2
// and adds weight * dot(w2[d], act[slot]) into residual[t, d] with an f32 atomic.
//
// moe_experts, larger P (prefill): grouped GEMMs on tensor cores (WMMA 16x16x16, f32
// accumulate), one kernel per projection. A CTA (4 warps) computes a [64 pairs, 128 weight
// rows] tile over k in steps of 32 through a 3-stage cp.async pipeline; warp (wm, wn) owns rows
// wm * 32 .. +32 and columns wn * 64 .. +64 (2 x 4 fragments).
//   gate/up: A = x rows gathered by token (pair / K), B = 64 rows of w1 and the same 64
//            features' rows of w3 (columns 0..63 = gate, 64..127 = up); the epilogue stages C in
//            shared memory and writes act = silu(gate) * up.
//   down:    A = act rows of the expert's slots, B = 128 rows of w2; the epilogue scales each
//            row by its pair's routing weight and adds it to residual[t] with float4 atomics.
// Tiles are numbered expert-major in a 1D grid sized by an upper bound (E + P/64 pair tiles);
// each CTA finds its (expert, column tile, pair tile) from expert_offsets and exits when past
// the last real tile. Within an expert, the pair tile varies fastest, so CTAs running together
// share one weight tile (read from HBM once) and re-read the expert's A rows from L2.
#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "core/op_params.h"
#include "cuda/moe.cuh"

namespace mc::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int32_t kMaxExperts = 64;
constexpr int32_t kMaxTopK = 8;
// Pairs beyond which the pair-tile arithmetic (int32 slots, base + tid) could overflow.
constexpr int64_t kMaxPairs = int64_t{1} << 30;

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

constexpr int kRouteThreads = 1024;
constexpr int kRouteWarps = kRouteThreads / 32;

__global__ void __launch_bounds__(kRouteThreads) route_kernel(const MoeRouteParams p) {
  __shared__ int32_t next_s[kMaxExperts];                  // pairs per expert, then its next free slot
  __shared__ int32_t warp_slot_s[kRouteWarps][kMaxExperts];  // per tile: count, then first slot per warp
  const int32_t E = p.n_experts, K = p.top_k;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;

  if (tid < E) next_s[tid] = 0;
  __syncthreads();
  // Uniform trip count over the block, so that every lane of a warp takes part in the match.
  for (int32_t t0 = 0; t0 < p.n_tokens; t0 += kRouteThreads) {
    const int32_t t = t0 + tid;
    const bool valid = t < p.n_tokens;
    // Written straight to global memory: route_top_k indexes its outputs by a runtime slot,
    // which in a local array would mean local memory.
    int32_t* ids = p.expert_ids + static_cast<int64_t>(t) * K;
    if (valid) route_top_k(p.router_logits + static_cast<int64_t>(t) * E, E, K, ids, p.weights + static_cast<int64_t>(t) * K);
    for (int32_t k = 0; k < K; ++k) {
      // One shared atomic per (warp, expert) instead of one per pair: with E = 8, every thread
      // hitting the same 8 counters would serialize.
      const int32_t e = valid ? ids[k] : -1;
      const unsigned same = __match_any_sync(0xffffffffu, e);
      if (e >= 0 && (same & ((1u << lane) - 1u)) == 0) atomicAdd(&next_s[e], __popc(same));
    }
  }
  __syncthreads();  // counts complete; expert_ids (global) visible to the whole block
  if (tid == 0) {
    int32_t total = 0;
    for (int32_t e = 0; e < E; ++e) {
      const int32_t count = next_s[e];
      p.expert_offsets[e] = total;
      next_s[e] = total;
      total += count;
    }
    p.expert_offsets[E] = total;
  }
  __syncthreads();

  const int32_t n_pairs = p.n_tokens * K;
  for (int32_t base = 0; base < n_pairs; base += kRouteThreads) {
    for (int i = tid; i < kRouteWarps * kMaxExperts; i += kRouteThreads) (&warp_slot_s[0][0])[i] = 0;
    __syncthreads();
    const int32_t pair = base + tid;
    const int32_t e = pair < n_pairs ? p.expert_ids[pair] : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);  // lanes of this warp with expert e
    const int rank = __popc(same & ((1u << lane) - 1u));     // of them, those below this lane
    if (e >= 0 && rank == 0) warp_slot_s[warp][e] = __popc(same);
    __syncthreads();
    if (tid < E) {  // exclusive scan over the warps of expert tid's counts, from its next free slot
      int32_t slot = next_s[tid];
      for (int w = 0; w < kRouteWarps; ++w) {
        const int32_t count = warp_slot_s[w][tid];
        warp_slot_s[w][tid] = slot;
        slot += count;
      }
      next_s[tid] = slot;
    }
    __syncthreads();
    if (e >= 0) p.sorted_pairs[warp_slot_s[warp][e] + rank] = pair;
    __syncthreads();  // every slot read before the next tile clears the table
  }
}

// ---------------------------------------------------------------------------------------------
// Shared device helpers
// ---------------------------------------------------------------------------------------------

// Two packed half values (element 0 in the low 16 bits) as floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t word);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t word) {
  // bf16 is the high half of an f32: widening is a shift, exact.
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t word) {
  __half2_raw raw;
  raw.x = static_cast<unsigned short>(word & 0xffffu);
  raw.y = static_cast<unsigned short>(word >> 16);
  return __half22float2(__half2(raw));
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& pack, float (&out)[8]) {
  const float2 a = unpack2<T>(pack.x), b = unpack2<T>(pack.y), c = unpack2<T>(pack.z), d = unpack2<T>(pack.w);
  out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y, out[4] = c.x, out[5] = c.y, out[6] = d.x, out[7] = d.y;
}

// Weights are read once per step: keep them out of L1, where the activations they meet live.
__device__ __forceinline__ uint4 load_weights(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}
__device__ __forceinline__ uint4 load_activations(const void* ptr) { return __ldg(static_cast<const uint4*>(ptr)); }

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// silu(g) * u in f32, the order of operations of cpu::silu_mul.
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// ---------------------------------------------------------------------------------------------
// GEMV path (decode)
// ---------------------------------------------------------------------------------------------

constexpr int64_t kGemvMaxPairs = 64;
constexpr int kGemvWarps = 8;  // output rows per CTA: one per warp
constexpr int kGemvThreads = kGemvWarps * 32;
// __launch_bounds__(kGemvThreads, 2): at most 128 registers, two CTAs (16 warps) per SM at
// least; the 4-way unrolled row loop keeps 4 loads per operand in flight per lane. (Without the
// minimum, ptxas spilled a few bytes in some kTok instances.)

// act[slot, f] for f = this warp's feature, every slot of expert blockIdx.y.
template <typename T, int kTok>
__global__ void __launch_bounds__(kGemvThreads, 2) gate_up_gemv_kernel(const MoeExpertsParams p, T* act) {
  const int32_t e = static_cast<int32_t>(blockIdx.y);
  const int32_t first = p.expert_offsets[e];
  const int32_t n = p.expert_offsets[e + 1] - first;
  const int64_t D = p.dim, F = p.hidden;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n <= 0 || f >= F) return;  // whole warps leave: the kernel has no block barrier
  const int lane = static_cast<int>(threadIdx.x % 32);
  const T* x = static_cast<const T*>(p.x);
  const T* w1 = static_cast<const T*>(p.w13) + (static_cast<int64_t>(e) * 2 * F + f) * D;  // gate row f
  const T* w3 = w1 + F * D;                                                                  // up row f
  const int64_t packs = D / 8;

  for (int32_t c0 = 0; c0 < n; c0 += kTok) {
    const int32_t count = min(kTok, n - c0);
    const T* rows[kTok];  // x rows of slots first + c0 + j (padding lanes repeat the last one)
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      const int32_t pair = p.sorted_pairs[first + c0 + min(j, count - 1)];
      rows[j] = x + static_cast<int64_t>(pair / p.top_k) * D;
    }
    float gate[kTok], up[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) gate[j] = up[j] = 0.0f;
#pragma unroll 4
    for (int64_t i = lane; i < packs; i += 32) {
      float g[8], u[8];
      unpack8<T>(load_weights(w1 + i * 8), g);
      unpack8<T>(load_weights(w3 + i * 8), u);
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        if (j < count) {
          float xv[8];
          unpack8<T>(load_activations(rows[j] + i * 8), xv);
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            gate[j] = fmaf(g[q], xv[q], gate[j]);
            up[j] = fmaf(u[q], xv[q], up[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      gate[j] = warp_sum(gate[j]);
      up[j] = warp_sum(up[j]);
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      if (j < count && lane == j) act[static_cast<int64_t>(first + c0 + j) * F + f] = from_float<T>(silu_mul(gate[j], up[j]));
    }
  }
}

// residual[t, d] += weight[pair] * dot(w2_e[d], act[slot]) for d = this warp's row, every slot
// of expert blockIdx.y.
template <typename T, int kTok>
__global__ void __launch_bounds__(kGemvThreads, 2) down_gemv_kernel(const MoeExpertsParams p, const T* act) {
  const int32_t e = static_cast<int32_t>(blockIdx.y);
  const int32_t first = p.expert_offsets[e];
  const int32_t n = p.expert_offsets[e + 1] - first;
  const int64_t D = p.dim, F = p.hidden;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n <= 0 || d >= D) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const T* w = static_cast<const T*>(p.w2) + (static_cast<int64_t>(e) * D + d) * F;
  const int64_t packs = F / 8;

  for (int32_t c0 = 0; c0 < n; c0 += kTok) {
    const int32_t count = min(kTok, n - c0);
    const T* rows[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) rows[j] = act + static_cast<int64_t>(first + c0 + min(j, count - 1)) * F;
    float acc[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) acc[j] = 0.0f;
#pragma unroll 4
    for (int64_t i = lane; i < packs; i += 32) {
      float wv[8];
      unpack8<T>(load_weights(w + i * 8), wv);
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        if (j < count) {
          float a[8];
          unpack8<T>(load_activations(rows[j] + i * 8), a);
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[j] = fmaf(wv[q], a[q], acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) acc[j] = warp_sum(acc[j]);
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      if (j < count && lane == j) {
        const int32_t pair = p.sorted_pairs[first + c0 + j];
        atomicAdd(p.residual + static_cast<int64_t>(pair / p.top_k) * D + d, acc[j] * p.weights[pair]);
      }
    }
  }
}

// kTok (slots dotted per pass over a weight row) from T, which bounds every expert's pairs
// (a token picks distinct experts); experts with more pairs take several passes.
template <typename T, int kTok>
void launch_gemv(const MoeExpertsParams& p, T* act, cudaStream_t stream) {
  const dim3 gate_up_grid(ceil_div(p.hidden, kGemvWarps), static_cast<unsigned>(p.n_experts));
  gate_up_gemv_kernel<T, kTok><<<gate_up_grid, kGemvThreads, 0, stream>>>(p, act);
  MC_CUDA_CHECK_LAUNCH();
  const dim3 down_grid(ceil_div(p.dim, kGemvWarps), static_cast<unsigned>(p.n_experts));
  down_gemv_kernel<T, kTok><<<down_grid, kGemvThreads, 0, stream>>>(p, act);
  MC_CUDA_CHECK_LAUNCH();
}

template <typename T>
void run_gemv(const MoeExpertsParams& p, T* act, cudaStream_t stream) {
  if (p.n_tokens <= 1) {
    launch_gemv<T, 1>(p, act, stream);
  } else if (p.n_tokens <= 2) {
    launch_gemv<T, 2>(p, act, stream);
  } else if (p.n_tokens <= 4) {
    launch_gemv<T, 4>(p, act, stream);
  } else {
    launch_gemv<T, 8>(p, act, stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Grouped-GEMM path (prefill)
// ---------------------------------------------------------------------------------------------

constexpr int kGemmWarps = 4;
constexpr int kGemmThreads = kGemmWarps * 32;
constexpr int kBlockM = 64;   // slots (rows of A) per tile
constexpr int kBlockN = 128;  // weight rows (B) per tile
constexpr int kBlockK = 32;
constexpr int kStages = 3;
constexpr int kWarpM = 32;  // warp tile: rows
constexpr int kWarpN = 64;  // warp tile: weight rows
constexpr int kFragsM = kWarpM / 16;
constexpr int kFragsN = kWarpN / 16;
static_assert((kBlockM / kWarpM) * (kBlockN / kWarpN) == kGemmWarps, "warps tile the CTA tile");

// Shared memory (static, bytes from a 128-byte aligned base). Tile rows carry 16 bytes of
// padding (80-byte pitch: fragment loads spread over the banks); every fragment pointer stays
// 32-byte aligned as WMMA needs. After the k loop, the stages hold C [kBlockM, kLdC] f32.
constexpr int kLdTile = kBlockK + 8;  // elements per A/B row
constexpr int kLdC = kBlockN + 4;     // floats per C row
constexpr int kChunksPerRow = kBlockK / 8;  // 16-byte pieces of a tile row
constexpr size_t kATileBytes = size_t{kBlockM} * kLdTile * 2;
constexpr size_t kBTileBytes = size_t{kBlockN} * kLdTile * 2;
constexpr size_t kStageBytes = kATileBytes + kBTileBytes;
constexpr size_t kPipeBytes = kStages * kStageBytes;
constexpr size_t kCBytes = size_t{kBlockM} * kLdC * 4;
static_assert(kCBytes <= kPipeBytes, "C staging fits the pipeline buffers");
static_assert(kATileBytes % 128 == 0 && kBTileBytes % 128 == 0, "aligned stages");
// Each thread copies the same rows at the same column every k step.
constexpr int kARowsPerThread = kBlockM * kChunksPerRow / kGemmThreads;
constexpr int kBRowsPerThread = kBlockN * kChunksPerRow / kGemmThreads;
static_assert(kARowsPerThread * kGemmThreads == kBlockM * kChunksPerRow, "A chunks split evenly");
static_assert(kBRowsPerThread * kGemmThreads == kBlockN * kChunksPerRow, "B chunks split evenly");
constexpr int kRowStride = kGemmThreads / kChunksPerRow;  // rows between a thread's chunks

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

enum class Proj { kGateUp, kDown };

// Output columns per tile: gate/up turns 128 weight rows into 64 features (w1 and w3 rows).
template <Proj kProj>
constexpr int64_t kTileCols = kProj == Proj::kGateUp ? kBlockN / 2 : kBlockN;

template <Proj kProj>
__host__ __device__ int64_t column_tiles(const MoeExpertsParams& p) {
  const int64_t n_out = kProj == Proj::kGateUp ? p.hidden : p.dim;
  return (n_out + kTileCols<kProj> - 1) / kTileCols<kProj>;
}

// Upper bound of Σ_e ceil(n_e / kBlockM) for any routing of P pairs: the sum of floors is at
// most the floor of the sum, (P + (kBlockM - 1) * E) / kBlockM. Worked example: 8 experts with
// one pair each -> (8 + 63 * 8) / 64 = 8 tiles.
int64_t pair_tiles_bound(int64_t n_pairs, int64_t n_experts) {
  return (n_pairs + (kBlockM - 1) * n_experts) / kBlockM;
}

struct Tile {
  int32_t first = 0;  // the expert's first slot
  int32_t m0 = 0;     // the tile's first row, relative to first
  int32_t rows = 0;   // real rows: min(kBlockM, n_e - m0)
  int32_t expert = 0;
  int64_t n0 = 0;     // first output column
};

// Tile number `block` in expert-major order: expert e owns column_tiles * ceil(n_e / kBlockM)
// tiles, column tile slower, pair tile faster. False past the last real tile.
__device__ bool find_tile(const int32_t* offsets, int32_t n_experts, int64_t col_tiles, int64_t tile_cols,
                          int64_t block, Tile& tile) {
  for (int32_t e = 0; e < n_experts; ++e) {
    const int32_t first = offsets[e];
    const int32_t n = offsets[e + 1] - first;
    const int64_t m_tiles = (n + kBlockM - 1) / kBlockM;
    const int64_t tiles = m_tiles * col_tiles;
    if (block < tiles) {
      tile.first = first;
      tile.m0 = static_cast<int32_t>(block % m_tiles) * kBlockM;
      tile.rows = min(kBlockM, n - tile.m0);
      tile.expert = e;
      tile.n0 = (block / m_tiles) * tile_cols;
      return true;
    }
    block -= tiles;
  }
  return false;
}

template <typename T, Proj kProj>
__global__ void __launch_bounds__(kGemmThreads) expert_gemm_kernel(const MoeExpertsParams p, T* act) {
  constexpr bool kGateUp = kProj == Proj::kGateUp;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // weight rows read as columns
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  const int64_t D = p.dim, F = p.hidden;
  const int64_t k_dim = kGateUp ? D : F;
  Tile tile;
  if (!find_tile(p.expert_offsets, p.n_experts, column_tiles<kProj>(p), kTileCols<kProj>, blockIdx.x, tile)) return;

  __shared__ __align__(128) unsigned char smem[kPipeBytes];
  __shared__ const T* a_row_s[kBlockM];  // source row of each tile row; null = padding
  __shared__ int32_t pair_s[kBlockM];    // pair of each tile row (down)
  __shared__ float weight_s[kBlockM];    // its routing weight (down)

  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kBlockM) {
    const T* row = nullptr;
    int32_t pair = 0;
    float weight = 0.0f;
    if (tid < tile.rows) {
      const int32_t slot = tile.first + tile.m0 + tid;
      pair = p.sorted_pairs[slot];
      if constexpr (kGateUp) {
        row = static_cast<const T*>(p.x) + static_cast<int64_t>(pair / p.top_k) * D;
      } else {
        row = act + static_cast<int64_t>(slot) * F;
        weight = p.weights[pair];
      }
    }
    a_row_s[tid] = row;
    pair_s[tid] = pair;
    weight_s[tid] = weight;
  }
  __syncthreads();

  // This thread's copy work: rows tid / 4 + kRowStride * i of A and B, column (tid % 4) * 8.
  const int col = (tid % kChunksPerRow) * 8;
  const int row0 = tid / kChunksPerRow;
  const T* a_src[kARowsPerThread];
#pragma unroll
  for (int i = 0; i < kARowsPerThread; ++i) a_src[i] = a_row_s[row0 + kRowStride * i];
  const T* b_src[kBRowsPerThread];
#pragma unroll
  for (int i = 0; i < kBRowsPerThread; ++i) {
    const int r = row0 + kRowStride * i;
    const T* src = nullptr;
    if constexpr (kGateUp) {
      // Rows 0..63: w1 rows n0 + r; rows 64..127: w3 rows (F + n0 + r - 64) of expert e.
      const int64_t f = tile.n0 + r % (kBlockN / 2);
      if (f < F) {
        src = static_cast<const T*>(p.w13) + (static_cast<int64_t>(tile.expert) * 2 * F + (r < kBlockN / 2 ? 0 : F) + f) * D;
      }
    } else {
      const int64_t d = tile.n0 + r;
      if (d < D) src = static_cast<const T*>(p.w2) + (static_cast<int64_t>(tile.expert) * D + d) * F;
    }
    b_src[i] = src;
  }

  auto a_stage = [&](int stage) { return reinterpret_cast<T*>(smem + stage * kStageBytes); };
  auto b_stage = [&](int stage) { return reinterpret_cast<T*>(smem + stage * kStageBytes + kATileBytes); };

  // Copies k tile kt into `stage`; padding rows and columns past k_dim (whole 8-element chunks,
  // as k_dim % 16 == 0) become zeros.
  auto load_tile = [&](int64_t kt, int stage) {
    const int64_t k = kt * kBlockK + col;
    const bool k_in = k < k_dim;
    T* a_dst = a_stage(stage);
    T* b_dst = b_stage(stage);
#pragma unroll
    for (int i = 0; i < kARowsPerThread; ++i) {
      T* dst = a_dst + (row0 + kRowStride * i) * kLdTile + col;
      if (a_src[i] != nullptr && k_in) {
        cp_async_16(dst, a_src[i] + k);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int i = 0; i < kBRowsPerThread; ++i) {
      T* dst = b_dst + (row0 + kRowStride * i) * kLdTile + col;
      if (b_src[i] != nullptr && k_in) {
        cp_async_16(dst, b_src[i] + k);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
  };

  const int warp = tid / 32;
  const int warp_m = warp / (kBlockN / kWarpN);
  const int warp_n = warp % (kBlockN / kWarpN);
  FragC acc[kFragsM][kFragsN];
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  const int64_t k_tiles = (k_dim + kBlockK - 1) / kBlockK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();  // possibly empty: one group per tile keeps the wait counts uniform
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // groups 0..kt complete: tile kt has landed
    __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1's stage
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_tile(next, static_cast<int>(next % kStages));  // refills tile kt - 1's stage
    cp_async_commit();

    const int stage = static_cast<int>(kt % kStages);
    const T* a_s = a_stage(stage) + warp_m * kWarpM * kLdTile;
    const T* b_s = b_stage(stage) + warp_n * kWarpN * kLdTile;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      FragA a[kFragsM];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) wmma::load_matrix_sync(a[i], a_s + i * 16 * kLdTile + kk, kLdTile);
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        FragB b;
        wmma::load_matrix_sync(b, b_s + j * 16 * kLdTile + kk, kLdTile);
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages: they become C

  float* c_s = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) {
      wmma::store_matrix_sync(c_s + (warp_m * kWarpM + i * 16) * kLdC + warp_n * kWarpN + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();

  if constexpr (kGateUp) {
    // act[slot, n0 + c .. +8] = silu(C[m, c]) * C[m, 64 + c], 16-byte stores.
    constexpr int kCols = kBlockN / 2;
    for (int item = tid; item < kBlockM * (kCols / 8); item += kGemmThreads) {
      const int m = item / (kCols / 8);
      const int c = (item % (kCols / 8)) * 8;
      if (m >= tile.rows || tile.n0 + c >= F) continue;  // F % 16 == 0: whole chunks are in or out
      const float* gate = c_s + m * kLdC + c;
      const float* up = gate + kCols;
      uint4 packed;
      T* halves = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int q = 0; q < 8; ++q) halves[q] = from_float<T>(silu_mul(gate[q], up[q]));
      *reinterpret_cast<uint4*>(act + static_cast<int64_t>(tile.first + tile.m0 + m) * F + tile.n0 + c) = packed;
    }
  } else {
    // residual[t, n0 + c .. +4] += weight * C[m, c .. +4].
    for (int item = tid; item < kBlockM * (kBlockN / 4); item += kGemmThreads) {
      const int m = item / (kBlockN / 4);
      const int c = (item % (kBlockN / 4)) * 4;
      if (m >= tile.rows || tile.n0 + c >= D) continue;  // D % 16 == 0: whole float4s are in or out
      const float w = weight_s[m];
      const float* src = c_s + m * kLdC + c;
      float* dst = p.residual + static_cast<int64_t>(pair_s[m] / p.top_k) * D + tile.n0 + c;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float4*>(dst), make_float4(w * src[0], w * src[1], w * src[2], w * src[3]));
#else
#pragma unroll
      for (int q = 0; q < 4; ++q) atomicAdd(dst + q, w * src[q]);
#endif
    }
  }
}

template <typename T>
void run_gemm(const MoeExpertsParams& p, T* act, cudaStream_t stream) {
  const int64_t pair_tiles = pair_tiles_bound(static_cast<int64_t>(p.n_tokens) * p.top_k, p.n_experts);
  const int64_t gate_up_ctas = pair_tiles * column_tiles<Proj::kGateUp>(p);
  const int64_t down_ctas = pair_tiles * column_tiles<Proj::kDown>(p);
  expert_gemm_kernel<T, Proj::kGateUp><<<static_cast<unsigned>(gate_up_ctas), kGemmThreads, 0, stream>>>(p, act);
  MC_CUDA_CHECK_LAUNCH();
  expert_gemm_kernel<T, Proj::kDown><<<static_cast<unsigned>(down_ctas), kGemmThreads, 0, stream>>>(p, act);
  MC_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_routing_sizes(const char* op, int64_t n_tokens, int32_t n_experts, int32_t top_k) {
  if (n_tokens < 0) fail(ErrorKind::kInvalidRequest, op, ": n_tokens must be >= 0, got ", n_tokens);
  if (n_experts < 1 || n_experts > kMaxExperts)
    fail(ErrorKind::kUnsupported, op, ": n_experts ", n_experts, " (the CUDA kernels take 1 to ", kMaxExperts, ")");
  if (top_k < 1 || top_k > kMaxTopK)
    fail(ErrorKind::kUnsupported, op, ": top_k ", top_k, " (the CUDA kernels take 1 to ", kMaxTopK, ")");
  if (top_k > n_experts)
    fail(ErrorKind::kInvalidRequest, op, ": top_k ", top_k, " is more than n_experts ", n_experts);
  if (n_tokens * top_k > kMaxPairs)
    fail(ErrorKind::kUnsupported, op, ": ", n_tokens, " tokens x top_k ", top_k, " is more than ", kMaxPairs,
         " pairs");
}

void check_expert_sizes(const MoeExpertsParams& p) {
  check_routing_sizes("moe_experts", p.n_tokens, p.n_experts, p.top_k);
  if (p.dim <= 0 || p.hidden <= 0)
    fail(ErrorKind::kInvalidRequest, "moe_experts: bad sizes dim=", p.dim, ", hidden=", p.hidden);
  // 16-element multiples: whole 16-byte chunks in every row and k step, whole WMMA k steps.
  if (p.dim % 16 != 0) fail(ErrorKind::kUnsupported, "moe_experts: dim ", p.dim, " is not a multiple of 16");
  if (p.hidden % 16 != 0) fail(ErrorKind::kUnsupported, "moe_experts: hidden ", p.hidden, " is not a multiple of 16");
  if (p.dim > (int64_t{1} << 24) || p.hidden > (int64_t{1} << 24))
    fail(ErrorKind::kUnsupported, "moe_experts: dim ", p.dim, " or hidden ", p.hidden, " is too large");
  const int64_t n_pairs = static_cast<int64_t>(p.n_tokens) * p.top_k;
  if (n_pairs > kGemvMaxPairs) {
    const int64_t tiles = pair_tiles_bound(n_pairs, p.n_experts);
    const int64_t ctas = tiles * std::max(column_tiles<Proj::kGateUp>(p), column_tiles<Proj::kDown>(p));
    if (ctas > 0x7fffffff)
      fail(ErrorKind::kUnsupported, "moe_experts: ", n_pairs, " pairs need more than 2^31-1 CTAs");
  }
}

}  // namespace

void moe_route(const MoeRouteParams& p, cudaStream_t stream) {
  check_routing_sizes("moe_route", p.n_tokens, p.n_experts, p.top_k);
  if (p.expert_offsets == nullptr) fail(ErrorKind::kInvalidRequest, "moe_route: null expert_offsets");
  if (p.n_tokens > 0 &&
      (p.router_logits == nullptr || p.expert_ids == nullptr || p.weights == nullptr || p.sorted_pairs == nullptr))
    fail(ErrorKind::kInvalidRequest, "moe_route: null router_logits, expert_ids, weights or sorted_pairs");
  NvtxRange range("moe_route");
  // Also for T = 0: expert_offsets becomes all zeros.
  route_kernel<<<1, kRouteThreads, 0, stream>>>(p);
  MC_CUDA_CHECK_LAUNCH();
}

size_t moe_workspace_bytes(const MoeExpertsParams& p) {
  check_expert_sizes(p);
  const size_t act_bytes = static_cast<size_t>(p.n_tokens) * p.top_k * p.hidden * 2;  // act [P, F] half
  return (act_bytes + 255) / 256 * 256;
}

MoeScratch moe_scratch(const MoeExpertsParams& p, void* workspace) {
  const size_t T = static_cast<size_t>(p.n_tokens), E = static_cast<size_t>(p.n_experts);
  const size_t P = T * static_cast<size_t>(p.top_k);
  size_t used = 0;
  auto take = [&](size_t bytes) {
    const size_t offset = used;
    used += (bytes + 255) / 256 * 256;
    return offset;
  };
  const size_t logits_at = take(T * E * sizeof(float));
  const size_t ids_at = take(P * sizeof(int32_t));
  const size_t weights_at = take(P * sizeof(float));
  const size_t offsets_at = take((E + 1) * sizeof(int32_t));
  const size_t pairs_at = take(P * sizeof(int32_t));
  const size_t experts_at = take(moe_workspace_bytes(p));
  MoeScratch scratch;
  scratch.bytes = used;
  if (workspace == nullptr) return scratch;
  auto* base = static_cast<uint8_t*>(workspace);
  scratch.router_logits = reinterpret_cast<float*>(base + logits_at);
  scratch.expert_ids = reinterpret_cast<int32_t*>(base + ids_at);
  scratch.weights = reinterpret_cast<float*>(base + weights_at);
  scratch.expert_offsets = reinterpret_cast<int32_t*>(base + offsets_at);
  scratch.sorted_pairs = reinterpret_cast<int32_t*>(base + pairs_at);
  scratch.experts = base + experts_at;
  return scratch;
}

void moe_experts(const MoeExpertsParams& p, void* workspace, cudaStream_t stream) {
  check_expert_sizes(p);
  if (p.n_tokens == 0) return;
  if (p.x == nullptr || p.w13 == nullptr || p.w2 == nullptr || p.expert_offsets == nullptr ||
      p.sorted_pairs == nullptr || p.weights == nullptr || p.residual == nullptr || workspace == nullptr)
    fail(ErrorKind::kInvalidRequest, "moe_experts: null x, w13, w2, expert_offsets, sorted_pairs, weights, "
         "residual or workspace pointer");
  if (!aligned16(p.x) || !aligned16(p.w13) || !aligned16(p.w2) || !aligned16(p.residual) || !aligned16(workspace))
    fail(ErrorKind::kInvalidRequest, "moe_experts: x, w13, w2, residual and workspace must be 16-byte aligned "
         "(the kernels move 16 bytes at a time)");
  NvtxRange range("moe_experts");
  dispatch_half(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* act = static_cast<T*>(workspace);
    if (static_cast<int64_t>(p.n_tokens) * p.top_k <= kGemvMaxPairs) {
      run_gemv<T>(p, act, stream);
    } else {
      run_gemm<T>(p, act, stream);
    }
  });
}

}  // namespace mc::cuda
