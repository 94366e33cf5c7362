// The fused q|k|v projection's output split into its heads with half-rotation RoPE:
//   qkv [T, (H + 2 KVH) * Dh] half -> q [T, H, Dh] and k [T, KVH, Dh] rotated (out of place),
//   v [T, KVH, Dh] copied; positions [T] int64, inv_freq [Dh/2] f32.
//
// One block per token. Its threads first fill a shared table of cos/sin for the Dh/2 angles of
// the token, computed exactly as cpu::qkv_rope does (angle = float(pos) * inv_freq[i] as an f32
// product, cos/sin in double, rounded to float), so the double-precision sincos runs once per
// (token, i) and not once per head. Then they rotate every head of q and k: a work item is
// kVec consecutive pairs (i .. i+kVec-1, paired with i+Dh/2 ..), two 16-byte loads and stores
// when kVec = 8. The q and k heads are consecutive in the qkv row (q heads, then k heads), so
// item head h reads qkv columns h * Dh .. and writes q head h (h < H) or k head h - H. Then the
// v columns are copied in packs of kVec. Rotation as in cpu::qkv_rope, each product rounded (no
// FMA contraction):
//   out_i = a*c - b*s,  out_{i+Dh/2} = b*c + a*s.
#include "cuda/elementwise.cuh"

namespace mc::cuda {
namespace {

constexpr int kThreads = 128;
// cos and sin tables of Dh/2 floats each must fit the default 48 KiB of dynamic shared memory.
constexpr int32_t kMaxHeadDim = 48 * 1024 / static_cast<int32_t>(sizeof(float));

template <typename T, int kVec>
__device__ __forceinline__ void rotate(const T* in, T* out, const float* cos_t, const float* sin_t, int32_t half,
                                       int32_t i) {
  Pack<T, kVec> lo = *reinterpret_cast<const Pack<T, kVec>*>(in + i);
  Pack<T, kVec> hi = *reinterpret_cast<const Pack<T, kVec>*>(in + half + i);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float c = cos_t[i + j], s = sin_t[i + j];
    const float a = to_float(lo.v[j]), b = to_float(hi.v[j]);
    lo.v[j] = from_float<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
    hi.v[j] = from_float<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
  }
  *reinterpret_cast<Pack<T, kVec>*>(out + i) = lo;
  *reinterpret_cast<Pack<T, kVec>*>(out + half + i) = hi;
}

template <typename T, int kVec>
__global__ void qkv_rope_kernel(const QkvRopeParams p) {
  extern __shared__ float table[];  // cos [Dh/2], then sin [Dh/2]
  const int32_t n_heads = p.n_heads, n_kv_heads = p.n_kv_heads, head_dim = p.head_dim;
  const int32_t half = head_dim / 2;
  float* cos_t = table;
  float* sin_t = table + half;
  const int64_t token = blockIdx.x;

  const float pos = static_cast<float>(p.positions[token]);
  for (int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(pos, p.inv_freq[i]);
    double s, c;
    sincos(static_cast<double>(angle), &s, &c);
    cos_t[i] = static_cast<float>(c);
    sin_t[i] = static_cast<float>(s);
  }
  __syncthreads();

  const int64_t kv_dim = static_cast<int64_t>(n_kv_heads) * head_dim;
  const T* src = static_cast<const T*>(p.qkv) + token * (static_cast<int64_t>(n_heads) * head_dim + 2 * kv_dim);
  T* q_token = static_cast<T*>(p.q) + token * n_heads * head_dim;
  T* k_token = static_cast<T*>(p.k) + token * kv_dim;
  // Items: (head, pack) over the q heads then the k heads of this token.
  const int32_t packs = half / kVec;
  const int32_t items = (n_heads + n_kv_heads) * packs;
  for (int32_t item = threadIdx.x; item < items; item += blockDim.x) {
    const int32_t head = item / packs;
    const int32_t i = (item % packs) * kVec;
    T* out = head < n_heads ? q_token + static_cast<int64_t>(head) * head_dim
                            : k_token + static_cast<int64_t>(head - n_heads) * head_dim;
    rotate<T, kVec>(src + static_cast<int64_t>(head) * head_dim, out, cos_t, sin_t, half, i);
  }

  // v: the last kv_dim columns of the row, unchanged.
  using P = Pack<T, kVec>;
  const P* v_src = reinterpret_cast<const P*>(src + static_cast<int64_t>(n_heads + n_kv_heads) * head_dim);
  P* v_dst = reinterpret_cast<P*>(static_cast<T*>(p.v) + token * kv_dim);
  for (int64_t i = threadIdx.x; i < kv_dim / kVec; i += blockDim.x) v_dst[i] = v_src[i];
}

template <typename T, int kVec>
void launch_qkv_rope(const QkvRopeParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.head_dim) * sizeof(float);
  qkv_rope_kernel<T, kVec><<<static_cast<unsigned>(p.n_tokens), kThreads, smem, stream>>>(p);
  MC_CUDA_CHECK_LAUNCH();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void qkv_rope(const QkvRopeParams& p, cudaStream_t stream) {
  if (p.n_tokens < 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0)
    fail(ErrorKind::kInvalidRequest, "qkv_rope: bad sizes n_tokens=", p.n_tokens, ", n_heads=", p.n_heads,
         ", n_kv_heads=", p.n_kv_heads, ", head_dim=", p.head_dim, " (head_dim must be even)");
  if (p.head_dim > kMaxHeadDim)
    fail(ErrorKind::kInvalidRequest, "qkv_rope: head_dim ", p.head_dim, " above ", kMaxHeadDim);
  // Items per token are counted in int32.
  if (static_cast<int64_t>(p.n_heads) + p.n_kv_heads > (int64_t{1} << 31) / p.head_dim)
    fail(ErrorKind::kInvalidRequest, "qkv_rope: too many heads (", p.n_heads, " + ", p.n_kv_heads, ")");
  if (p.n_tokens > 0x7fffffff) fail(ErrorKind::kInvalidRequest, "qkv_rope: n_tokens ", p.n_tokens, " too large");
  if (p.n_tokens == 0) return;
  if (p.qkv == nullptr || p.q == nullptr || p.k == nullptr || p.v == nullptr || p.positions == nullptr ||
      p.inv_freq == nullptr)
    fail(ErrorKind::kInvalidRequest, "qkv_rope: null qkv, q, k, v, positions or inv_freq pointer");
  NvtxRange range("qkv_rope");
  dispatch_half(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // 8 pairs per item need Dh/2 % 8 == 0: every head row (of qkv and of q, k, v) then starts
    // 16-byte aligned too, and kv_dim is a whole number of packs.
    if ((p.head_dim / 2) % 8 == 0 && aligned16(p.qkv) && aligned16(p.q) && aligned16(p.k) && aligned16(p.v))
      launch_qkv_rope<T, 8>(p, stream);
    else
      launch_qkv_rope<T, 1>(p, stream);
  });
}

}  // namespace mc::cuda
