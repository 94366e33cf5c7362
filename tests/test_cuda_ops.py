"""Every CUDA op against its CPU op (llama.cpp test-backend-ops style), on fresh random inputs.

Shapes: T = tokens in the step, H = query heads, KVH = key/value heads, Dh = head_dim,
E = entries (sequences) in the step, B = KV block size, W = sliding window (0 = full),
R = ring entries of a windowed block table (ceil(W / B) + 1), MB = block-table width.

Rule (flash-attention's): inputs are drawn in float32 and rounded to the GPU dtype; ref = the
CPU op on float32 copies of those rounded inputs; the CUDA op's relative error
||out - ref|| / ||ref|| must be <= 2 x the error of a plain torch implementation of the same op
running in the GPU dtype on the GPU (written here) + 1e-5. NaN or inf never passes.
Data-movement ops (embedding, kv_append) must match bit for bit. KV pools start filled with NaN
(or random values), so a kernel that reads a slot nobody wrote, or writes one it must not,
shows up; pools handed to attention must come back unchanged.

The check_* functions take (device, dtype): the tests run them on ("cuda", bf16/f16); on
("cpu", float32) they compare the CPU op with itself and the plain torch version, which checks
this file's own references on a machine without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from gpu_helpers import assert_close_2x, gen, on, ops, rand, requires_cuda


pytestmark = [pytest.mark.cuda, requires_cuda]

DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "f16"]


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so NaN == NaN), on the CPU."""
    x = x.detach().cpu().contiguous()
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = bits(actual) != bits(expected)
    if diff.any():
        idx = diff.nonzero()[:5].tolist()
        pytest.fail(f"{what}: {int(diff.sum())} of {diff.numel()} values differ; first at indices {idx}")


# --------------------------------------------------------------------------------------
# embedding: exact
# --------------------------------------------------------------------------------------


def check_embedding(V, D, T, device, dtype):
    seed = tm.seed_of(f"embedding-{V}-{D}-{T}-{dtype}")
    table = rand((V, D), seed, dtype)
    ids = torch.randint(0, V, (T,), generator=gen(seed + 1), dtype=torch.int32)
    ids[0] = V - 1  # the last row and the first
    if T > 1:
        ids[-1] = 0
    ref = ops().embedding(table, ids)
    assert torch.equal(ref, table[ids.long()]), "CPU embedding differs from table[ids]"
    out = ops().embedding(on(table, device, dtype), on(ids, device))
    assert out.dtype == torch.float32, f"embedding returns {out.dtype}, expected float32"
    assert out.device.type == device
    assert_bits_equal(out, ref, f"embedding V={V} D={D} T={T}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("V,D,T", [(1000, 4096, 33), (32000, 1000, 511), (257, 64, 1)])
def test_embedding(V, D, T, dtype):
    check_embedding(V, D, T, "cuda", dtype)


# --------------------------------------------------------------------------------------
# rms_norm (with the fused residual add and row selection)
# --------------------------------------------------------------------------------------


def check_rms_norm(T, D, with_delta, with_rows, eps, device, dtype):
    seed = tm.seed_of(f"rms-{T}-{D}-{with_delta}-{with_rows}-{dtype}")
    residual = rand((T, D), seed, torch.float32, scale=3.0, offset=0.5)  # the residual stream stays f32
    weight = rand((D,), seed + 1, dtype, scale=0.25, offset=1.0)
    delta = rand((T, D), seed + 2, dtype) if with_delta else None
    rows = None
    if with_rows:
        n = max(1, T // 3)
        perm = torch.randperm(T, generator=gen(seed + 3))
        rows = torch.cat([torch.tensor([T - 1]), perm[perm != T - 1][: n - 1]]).to(torch.int32)  # any order

    res_ref = residual.clone()
    ref = ops().rms_norm(res_ref, weight, eps, delta=delta, rows=rows)
    if with_delta:
        assert torch.equal(res_ref, residual + delta), "CPU rms_norm: residual += delta not applied in place"

    res_dev = on(residual, device)
    out = ops().rms_norm(
        res_dev,
        on(weight, device, dtype),
        eps,
        delta=None if delta is None else on(delta, device, dtype),
        rows=None if rows is None else on(rows, device),
    )
    what = f"rms_norm T={T} D={D} delta={with_delta} rows={with_rows}"
    assert out.dtype == dtype, f"{what}: output {out.dtype}, expected the weight's {dtype}"
    assert out.device.type == device
    # residual (+ delta) in f32: the same IEEE additions on both backends
    assert_bits_equal(res_dev, res_ref, f"{what}: residual after the call")

    x = on(residual, device) + (on(delta, device, dtype).float() if with_delta else 0.0)  # f32
    if with_rows:
        x = x[on(rows, device).long()]
    base = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * on(weight, device, dtype)
    return assert_close_2x(out, ref, base, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "T,D,with_delta,with_rows",
    [(1, 4096, False, False), (33, 4096, True, False), (511, 1000, True, True), (33, 64, False, True), (7, 5120, True, True)],
)
def test_rms_norm(T, D, with_delta, with_rows, dtype):
    check_rms_norm(T, D, with_delta, with_rows, 1e-5, "cuda", dtype)


def test_rms_norm_eps():
    """A large eps (1e-2) on small activations: the eps must enter inside the square root."""
    check_rms_norm(33, 1000, True, False, 1e-2, "cuda", torch.bfloat16)


# --------------------------------------------------------------------------------------
# rope (half rotation, in place)
# --------------------------------------------------------------------------------------


def rope_positions(kind: str, T: int, seed: int) -> torch.Tensor:
    if kind == "random":
        return torch.randint(0, 32768, (T,), generator=gen(seed), dtype=torch.int64)
    return torch.arange(int(kind), int(kind) + T, dtype=torch.int64)


def torch_rope(x, positions, theta):
    """The transformers formula in x's dtype: cos/sin computed in f32, then cast."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.int64, device=x.device).float() / dh))
    angle = positions.to(x.device).float()[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    rotated = torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], dim=-1)
    return x * cos + rotated * sin


def check_rope(T, H, KVH, Dh, theta, pos_kind, device, dtype):
    seed = tm.seed_of(f"rope-{T}-{H}-{KVH}-{Dh}-{theta}-{pos_kind}-{dtype}")
    q = rand((T, H, Dh), seed, dtype)
    k = rand((T, KVH, Dh), seed + 1, dtype)
    v = rand((T, KVH, Dh), seed + 3, dtype)
    positions = rope_positions(pos_kind, T, seed + 2)
    qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=1)  # [T, (H + 2 KVH) * Dh]
    q_ref, k_ref, v_ref = ops().qkv_rope(qkv, positions, H, KVH, theta)
    qd, kd, vd = ops().qkv_rope(on(qkv, device, dtype), on(positions, device), H, KVH, float(theta))
    assert qd.dtype == dtype and kd.dtype == dtype
    assert torch.equal(vd.cpu(), on(v, device, dtype).cpu()), "qkv_rope must copy v unchanged"
    what = f"rope T={T} H={H} KVH={KVH} Dh={Dh} theta={theta} positions={pos_kind}"
    eq = assert_close_2x(qd, q_ref, torch_rope(on(q, device, dtype), positions, theta), what + " (q)")
    ek = assert_close_2x(kd, k_ref, torch_rope(on(k, device, dtype), positions, theta), what + " (k)")
    return eq, ek


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "T,H,KVH,Dh,theta,pos_kind",
    [
        (1, 32, 8, 128, 10000.0, "32767"),  # one decode token far out
        (33, 4, 4, 64, 1e6, "4090"),
        (511, 8, 1, 128, 10000.0, "0"),
        (64, 32, 8, 128, 1e6, "random"),
        (17, 8, 2, 64, 10000.0, "random"),
    ],
)
def test_rope(T, H, KVH, Dh, theta, pos_kind, dtype):
    check_rope(T, H, KVH, Dh, theta, pos_kind, "cuda", dtype)


# --------------------------------------------------------------------------------------
# silu_mul
# --------------------------------------------------------------------------------------


def check_silu_mul(T, Fdim, device, dtype):
    seed = tm.seed_of(f"silu-{T}-{Fdim}-{dtype}")
    gate_up = rand((T, 2 * Fdim), seed, dtype, scale=2.0)
    ref = ops().silu_mul(gate_up)
    xd = on(gate_up, device, dtype)
    out = ops().silu_mul(xd)
    assert out.dtype == dtype, f"silu_mul returns {out.dtype}, expected {dtype}"
    base = F.silu(xd[:, :Fdim]) * xd[:, Fdim:]
    return assert_close_2x(out, ref, base, f"silu_mul T={T} F={Fdim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T,Fdim", [(1, 14336), (33, 1000), (511, 64), (64, 4096)])
def test_silu_mul(T, Fdim, dtype):
    check_silu_mul(T, Fdim, "cuda", dtype)


# --------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------


def check_linear(T, N, K, out_dtype, device, dtype):
    seed = tm.seed_of(f"linear-{T}-{N}-{K}-{out_dtype}-{dtype}")
    x = rand((T, K), seed, dtype)
    w = rand((N, K), seed + 1, dtype, scale=1.0 / math.sqrt(K))
    ref = ops().linear(x, w)
    xd, wd = on(x, device, dtype), on(w, device, dtype)
    kw = {} if out_dtype is None else {"out_dtype": out_dtype}
    out = ops().linear(xd, wd, **kw)
    want = dtype if out_dtype is None else out_dtype
    assert out.dtype == want, f"linear returns {out.dtype}, expected {want}"
    base = xd @ wd.t()
    return assert_close_2x(out, ref, base, f"linear T={T} N={N} K={K} out_dtype={out_dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "T,N,K,out_dtype",
    [
        (1, 6144, 4096, None),  # fused qkv of Mistral-7B, one decode token
        (33, 4096, 1000, None),
        (511, 1000, 4096, None),
        (3, 32000, 4096, torch.float32),  # LM head, f32 logits
        (33, 64, 64, torch.float32),
    ],
)
def test_linear(T, N, K, out_dtype, dtype):
    check_linear(T, N, K, out_dtype, "cuda", dtype)


# --------------------------------------------------------------------------------------
# Paged KV cache: layout, tables, pools
# --------------------------------------------------------------------------------------


class Layout:
    """The cache index math of the contract, written independently of csrc/core/kv_layout.h."""

    def __init__(self, block_size: int, window: int):
        self.B, self.W = block_size, window
        self.R = math.ceil(window / block_size) + 1 if window else 0

    def table_index(self, pos: torch.Tensor) -> torch.Tensor:
        logical = pos // self.B
        return logical % self.R if self.R else logical

    def first_kept(self, begin: int, end: int) -> int:
        return end - self.W if self.W and end - self.W > begin else begin

    def first_visible(self, q_pos: int) -> int:
        return max(0, q_pos - self.W + 1) if self.W else 0

    def entries_needed(self, end: int) -> int:
        blocks = math.ceil(end / self.B)
        return min(blocks, self.R) if self.R else blocks


def make_tables(lens, starts, layout: Layout, seed: int, spare: int = 3):
    """Block tables [E, MB] of distinct, shuffled physical blocks (-1 past what each entry
    needs), and the pool size (a few spare blocks nobody owns)."""
    need = [layout.entries_needed(s + n) for n, s in zip(lens, starts)]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=gen(seed)).to(torch.int32)
    tables = torch.full((len(lens), max(need)), -1, dtype=torch.int32)
    at = 0
    for e, k in enumerate(need):
        tables[e, :k] = perm[at : at + k]
        at += k
    return tables, num_blocks


def cu_seqlens(lens) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


def expected_kv_append(k_pool, v_pool, k, v, tables, lens, starts, layout: Layout):
    """The contract of kv_append on copies of the pools: positions >= first_kept(start, end)
    of each entry land at table[table_index(pos)] * B + pos % B."""
    kp, vp = k_pool.clone(), v_pool.clone()
    KVH, Dh = k.shape[1], k.shape[2]
    kflat, vflat = kp.view(-1, KVH, Dh), vp.view(-1, KVH, Dh)
    off = 0
    for e, (n, s) in enumerate(zip(lens, starts)):
        first = layout.first_kept(s, s + n)
        pos = torch.arange(first, s + n)
        rows = tables[e][layout.table_index(pos)].long() * layout.B + pos % layout.B
        assert (tables[e][layout.table_index(pos)] >= 0).all(), "test bug: a kept position has no block"
        assert len(set(rows.tolist())) == len(rows), "test bug: two kept positions share a slot"
        kflat[rows] = k[off + first - s : off + n]
        vflat[rows] = v[off + first - s : off + n]
        off += n
    return kp, vp


def initial_pool(num_blocks, B, KVH, Dh, poison: str, seed: int, dtype) -> torch.Tensor:
    if poison == "nan":
        return torch.full((num_blocks, B, KVH, Dh), float("nan"))
    return rand((num_blocks, B, KVH, Dh), seed, dtype, scale=10.0)


def spread_starts(n: int, hi: int, seed: int) -> list:
    """n start positions in [0, hi], including 0 and hi."""
    s = torch.randint(0, hi + 1, (n,), generator=gen(seed)).tolist()
    s[0], s[-1] = hi, 0
    return s


# --------------------------------------------------------------------------------------
# kv_append: exact, and nothing else written
# --------------------------------------------------------------------------------------

KV_CASES = [
    # name, lens, starts, KVH, Dh, B, W, initial pool content
    ("mixed-b16-full", [1, 17, 1, 64], [100, 0, 37, 250], 8, 128, 16, 0, "nan"),
    ("mixed-b7-w24", [1, 17, 1, 64], [100, 0, 37, 250], 8, 128, 7, 24, "nan"),
    ("mixed-b3-w24", [1, 17, 1, 64], [100, 5, 37, 250], 2, 64, 3, 24, "random"),
    ("mixed-b1-w24", [1, 17, 1, 64], [99, 30, 0, 7], 1, 64, 1, 24, "nan"),
    ("chunk100-b3-w24", [100], [0], 2, 128, 3, 24, "nan"),
    ("chunk64-after-prefix-b16-w24", [64], [100], 8, 128, 16, 24, "random"),
    ("decode-b64-b16-w4096", [1] * 64, "spread:6000", 1, 64, 16, 4096, "nan"),
    ("decode-b64-b7-full", [1] * 64, "spread:300", 4, 128, 7, 0, "random"),
]


def resolve_starts(starts, n: int, seed: int) -> list:
    if isinstance(starts, str):
        return spread_starts(n, int(starts.split(":")[1]), seed)
    return list(starts)


def check_kv_append(case, device, dtype):
    name, lens, starts, KVH, Dh, B, W, poison = case
    seed = tm.seed_of(f"kv-{name}-{dtype}")
    starts = resolve_starts(starts, len(lens), seed)
    layout = Layout(B, W)
    tables, num_blocks = make_tables(lens, starts, layout, seed + 1)
    T = sum(lens)
    k, v = rand((T, KVH, Dh), seed + 2, dtype), rand((T, KVH, Dh), seed + 3, dtype)
    kp0 = initial_pool(num_blocks, B, KVH, Dh, poison, seed + 4, dtype)
    vp0 = initial_pool(num_blocks, B, KVH, Dh, poison, seed + 5, dtype)
    cu = cu_seqlens(lens)
    start = torch.tensor(starts, dtype=torch.int64)

    kp_ref, vp_ref = kp0.clone(), vp0.clone()
    ops().kv_append(k, v, kp_ref, vp_ref, tables, cu, start, B, W)
    kp_exp, vp_exp = expected_kv_append(kp0, vp0, k, v, tables, lens, starts, layout)
    assert_bits_equal(kp_ref, kp_exp, f"{name}: CPU kv_append k_pool vs the contract")
    assert_bits_equal(vp_ref, vp_exp, f"{name}: CPU kv_append v_pool vs the contract")

    kpd, vpd = on(kp0, device, dtype), on(vp0, device, dtype)
    ops().kv_append(
        on(k, device, dtype), on(v, device, dtype), kpd, vpd, on(tables, device), on(cu, device), on(start, device), B, W
    )
    assert_bits_equal(kpd, kp_ref.to(dtype), f"{name}: CUDA kv_append k_pool (written and untouched slots)")
    assert_bits_equal(vpd, vp_ref.to(dtype), f"{name}: CUDA kv_append v_pool (written and untouched slots)")


@pytest.mark.parametrize("case", KV_CASES, ids=[c[0] for c in KV_CASES])
def test_kv_append(case):
    check_kv_append(case, "cuda", torch.bfloat16)


def test_kv_append_f16():
    check_kv_append(KV_CASES[1], "cuda", torch.float16)


# --------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------


def torch_attention(q, k_new, v_new, k_pool, v_pool, tables, lens, starts, layout: Layout):
    """Plain attention in q's dtype on q's device: per entry, gather the visible cached keys
    through the block table, append the entry's own keys, mask by absolute position,
    softmax, weighted sum of values. GQA by repeating each KV head over its query group."""
    T, H, Dh = q.shape
    KVH = k_new.shape[1]
    group = H // KVH
    dev = q.device
    kflat, vflat = k_pool.reshape(-1, KVH, Dh), v_pool.reshape(-1, KVH, Dh)
    outs = []
    off = 0
    for e, (n, s) in enumerate(zip(lens, starts)):
        lo = layout.first_visible(s)  # the oldest key any of the entry's queries sees
        past = torch.arange(lo, s)
        rows = (tables[e][layout.table_index(past)].long() * layout.B + past % layout.B).to(dev)
        ke = torch.cat([kflat[rows], k_new[off : off + n]]).repeat_interleave(group, dim=1)  # [S, H, Dh]
        ve = torch.cat([vflat[rows], v_new[off : off + n]]).repeat_interleave(group, dim=1)
        kpos = torch.arange(lo, s + n, device=dev)
        qpos = torch.arange(s, s + n, device=dev)
        visible = kpos[None, :] <= qpos[:, None]  # [n, S]
        if layout.W:
            visible &= kpos[None, :] > qpos[:, None] - layout.W
        scores = torch.einsum("nhd,shd->hns", q[off : off + n], ke) * (1.0 / math.sqrt(Dh))
        p = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
        outs.append(torch.einsum("hns,shd->nhd", p, ve))
        off += n
    return torch.cat(outs)


ATTN_CASES = [
    # name, lens, starts, H, KVH, Dh, B, W
    ("prefill33-mha-b16-full", [33], [0], 8, 8, 64, 16, 0),
    ("prefill511-gqa4-b7-w24", [511], [0], 8, 2, 128, 7, 24),
    ("window24-100pos-mqa4-b3", [100], [0], 4, 1, 64, 3, 24),
    ("mixed-1-17-1-64-gqa4-b16-full", [1, 17, 1, 64], [100, 0, 37, 250], 32, 8, 128, 16, 0),
    ("mixed-1-17-1-64-gqa4-b3-w24", [1, 17, 1, 64], [100, 5, 37, 250], 32, 8, 128, 3, 24),
    ("mixed-1-17-1-64-gqa8-b1-w24", [1, 17, 1, 64], [99, 30, 0, 7], 8, 1, 64, 1, 24),
    ("chunk64-after-prefix100-b7-w24", [64], [100], 8, 2, 128, 7, 24),
    ("chunks-after-long-prefix-gqa8-b16", [1, 300, 1, 5], [4000, 4000, 0, 1], 16, 2, 64, 16, 0),
    ("decode-b64-upto5000-gqa4-b16-full", [1] * 64, "spread:5000", 8, 2, 128, 16, 0),
    ("decode-b4-long-w4096", [1] * 4, [5000, 4096, 100, 7000], 32, 8, 128, 16, 4096),
    ("decode-b1-8192-gqa4-d128", [1], [8191], 32, 8, 128, 16, 0),
    ("decode-b1-5000-mha-d64-b7", [1], [5000], 8, 8, 64, 7, 0),
    ("decode-b64-short-mha-b7-w24", [1] * 64, "spread:200", 4, 4, 64, 7, 24),
]


def check_paged_attention(case, device, dtype):
    name, lens, starts, H, KVH, Dh, B, W = case
    seed = tm.seed_of(f"attn-{name}-{dtype}")
    starts = resolve_starts(starts, len(lens), seed)
    layout = Layout(B, W)
    tables, num_blocks = make_tables(lens, starts, layout, seed + 1)
    T = sum(lens)

    # The cached prefix: pools full of NaN, then the prefix written by the CPU kv_append (under
    # a window only its last W positions stay). Anything else that is read poisons the output.
    k_pool = torch.full((num_blocks, B, KVH, Dh), float("nan"))
    v_pool = torch.full((num_blocks, B, KVH, Dh), float("nan"))
    pre = [e for e, s in enumerate(starts) if s > 0]
    if pre:
        n_pre = sum(starts[e] for e in pre)
        pk, pv = rand((n_pre, KVH, Dh), seed + 2, dtype), rand((n_pre, KVH, Dh), seed + 3, dtype)
        ops().kv_append(
            pk, pv, k_pool, v_pool, tables[pre].contiguous(), cu_seqlens([starts[e] for e in pre]),
            torch.zeros(len(pre), dtype=torch.int64), B, W,
        )

    q = rand((T, H, Dh), seed + 4, dtype)
    k_new, v_new = rand((T, KVH, Dh), seed + 5, dtype), rand((T, KVH, Dh), seed + 6, dtype)
    cu = cu_seqlens(lens)
    start = torch.tensor(starts, dtype=torch.int64)
    ref = ops().paged_attention(q, k_new, v_new, k_pool, v_pool, tables, cu, start, B, W)

    qd, knd, vnd, kpd, vpd = (on(x, device, dtype) for x in (q, k_new, v_new, k_pool, v_pool))
    out = ops().paged_attention(qd, knd, vnd, kpd, vpd, on(tables, device), on(cu, device), on(start, device), B, W)
    assert out.dtype == dtype, f"{name}: output {out.dtype}, expected {dtype}"
    assert out.device.type == device
    assert_bits_equal(kpd, k_pool.to(dtype), f"{name}: k_pool modified by paged_attention")
    assert_bits_equal(vpd, v_pool.to(dtype), f"{name}: v_pool modified by paged_attention")
    base = torch_attention(qd, knd, vnd, kpd, vpd, tables, lens, starts, layout)
    return assert_close_2x(out, ref, base, f"paged_attention {name}")


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_paged_attention(case):
    check_paged_attention(case, "cuda", torch.bfloat16)


@pytest.mark.parametrize("index", [3, 8], ids=[ATTN_CASES[3][0], ATTN_CASES[8][0]])
def test_paged_attention_f16(index):
    check_paged_attention(ATTN_CASES[index], "cuda", torch.float16)


def test_paged_attention_then_append_decode_loop():
    """The order a step runs in, over several steps: attend (prefix from the pools + own keys),
    then kv_append; the pools the CUDA ops build step by step stay bit-identical to the CPU
    ops' pools (the ring wraps: W=24, B=7), and every step's output passes the 2x rule."""
    check_decode_loop("cuda", torch.bfloat16)


def check_decode_loop(device, dtype):
    H, KVH, Dh, B, W = 8, 2, 64, 7, 24
    layout = Layout(B, W)
    schedule = [[9, 40, 1], [1, 1, 30], [1, 17, 1], [1, 1, 1], [33, 1, 1]]  # tokens per entry per step
    total = [sum(col) for col in zip(*schedule)]
    tables, num_blocks = make_tables([t for t in total], [0] * len(total), layout, tm.seed_of("loop-tables"))
    k_pool = torch.full((num_blocks, B, KVH, Dh), float("nan"))
    v_pool = torch.full((num_blocks, B, KVH, Dh), float("nan"))
    kpd, vpd = on(k_pool, device, dtype), on(v_pool, device, dtype)
    pos = [0] * len(total)
    for step, lens in enumerate(schedule):
        seed = tm.seed_of(f"loop-{step}")
        T = sum(lens)
        q = rand((T, H, Dh), seed, dtype)
        k_new, v_new = rand((T, KVH, Dh), seed + 1, dtype), rand((T, KVH, Dh), seed + 2, dtype)
        cu, start = cu_seqlens(lens), torch.tensor(pos, dtype=torch.int64)
        ref = ops().paged_attention(q, k_new, v_new, k_pool, v_pool, tables, cu, start, B, W)
        qd, knd, vnd = on(q, device, dtype), on(k_new, device, dtype), on(v_new, device, dtype)
        args = (on(tables, device), on(cu, device), on(start, device), B, W)
        out = ops().paged_attention(qd, knd, vnd, kpd, vpd, *args)
        base = torch_attention(qd, knd, vnd, kpd, vpd, tables, lens, pos, layout)
        assert_close_2x(out, ref, base, f"step {step}")
        ops().kv_append(k_new, v_new, k_pool, v_pool, tables, cu, start, B, W)
        ops().kv_append(knd, vnd, kpd, vpd, *args)
        assert_bits_equal(kpd, k_pool.to(dtype), f"step {step}: k_pool")
        assert_bits_equal(vpd, v_pool.to(dtype), f"step {step}: v_pool")
        pos = [p + n for p, n in zip(pos, lens)]
