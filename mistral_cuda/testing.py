"""Single ops of the CPU and CUDA backends, for backend-comparison tests and benchmarks.

Not part of the user-facing API. Every function runs one op of the backend op table
(csrc/core/backend.h) that the runtime's forward pass calls, chosen by its tensors' device: CPU
float32 tensors run the CPU backend, CUDA bfloat16/float16 tensors the CUDA backend (which is
synchronized with torch before and after the op). Arguments are checked here (a TypeError for a
wrong type or dtype, a ValueError for a wrong device, shape or layout, naming the argument)
before the tensors reach the bindings (csrc/python/bind_ops.cpp), which trust them. Checks of
index values (ids, rows, cu_seqlens) read them on the host, which syncs on CUDA.

Shapes: T = tokens, D = dim, V = vocab, R = selected rows, H / KVH = query / key-value heads,
Dh = head_dim, F = FFN width, E = entries (sequences) of a step, MB = block-table width,
NB = blocks in a pool, B = block_size, W = sliding window (0 = full attention), N x K = linear.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch

from mistral_cuda import _C
from mistral_cuda.cuda_libs import preload_cublas

_ops = _C.ops
_HALF = (torch.bfloat16, torch.float16)
_BACKENDS = {}

__all__ = [
    "embedding",
    "kv_append",
    "linear",
    "moe_ffn",
    "moe_route",
    "paged_attention",
    "QuantizedWeight",
    "qkv_rope",
    "quantize",
    "quantized_linear",
    "quantized_moe_ffn",
    "ring_blocks_for",
    "rms_norm",
    "rope_inv_freq",
    "silu_mul",
]


def _run(op: str, t: torch.Tensor, *args, **kwargs) -> None:
    """Runs backend op `op` on the backend of t's device."""
    device = t.device.type
    if device not in _BACKENDS:
        if device == "cuda":
            preload_cublas()
        _BACKENDS[device] = _ops.Backend(device)
    backend = _BACKENDS[device]
    if device == "cuda":
        # The backend runs on its own stream: torch's work on these tensors must be done first.
        with torch.cuda.device(t.device):
            torch.cuda.synchronize()
            getattr(backend, op)(*args, **kwargs)
            backend.synchronize()
    else:
        getattr(backend, op)(*args, **kwargs)


# ---- argument checks ----


def _tensor(name: str, t, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def _backend(name: str, t: torch.Tensor) -> bool:
    """True for the CUDA op, False for the CPU op, from the tensor that fixes device and dtype."""
    if t.device.type == "cpu":
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: CPU ops take float32 tensors, got {t.dtype}")
        return False
    if t.device.type == "cuda":
        if t.dtype not in _HALF:
            raise TypeError(f"{name}: CUDA ops take bfloat16 or float16 tensors, got {t.dtype}")
        if not _ops.has_cuda:
            raise _C.UnsupportedError("this build of mistral_cuda has no CUDA backend")
        return True
    raise ValueError(f"{name} is on {t.device}; ops run on 'cpu' (float32) or 'cuda' (bfloat16/float16)")


def _check(name: str, t, shape: Sequence[int], dtype: torch.dtype, device: torch.device, legend: str) -> torch.Tensor:
    """t must be a contiguous tensor of this shape (legend names the dims), dtype and device."""
    _tensor(name, t, len(shape))
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other tensors")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {legend} = {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_indices(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every value of t in [low, high)."""
    if t.numel() and (int(t.min()) < low or int(t.max()) >= high):
        raise ValueError(f"{name} values must be in [{low}, {high}), got [{int(t.min())}, {int(t.max())}]")


# ---- shared tables ----


def ring_blocks_for(window: int, block_size: int) -> int:
    """Block-table entries a sequence keeps under sliding window W: ceil(W / B) + 1 (0 for W = 0)."""
    return _ops.ring_blocks_for(_int("window", window, 0), _int("block_size", block_size, 1))


def rope_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """The backends' RoPE table [Dh/2] float32: 1 / theta^(2i/Dh), computed in float32 by the core."""
    head_dim = _int("head_dim", head_dim, 2)
    return torch.tensor(_ops.rope_inv_freq(head_dim, _float("rope_theta", rope_theta, True)), dtype=torch.float32)


# ---- ops ----


def embedding(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """out[t] = table[ids[t]]: table [V, D], ids int32 [T] -> float32 [T, D]."""
    _tensor("table", table, 2)
    _backend("table", table)
    V, D = table.shape
    _check("table", table, (V, D), table.dtype, table.device, "(V, D)")
    if V == 0 or D == 0:
        raise ValueError(f"table must be non-empty, got shape {tuple(table.shape)}")
    T = _tensor("ids", ids, 1).shape[0]
    _check("ids", ids, (T,), torch.int32, table.device, "(T,)")
    _check_indices("ids", ids, 0, V)
    out = torch.empty(T, D, dtype=torch.float32, device=table.device)
    if T:
        _run("embedding", table, table, ids, out)
    return out


def rms_norm(
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    delta: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """RMSNorm fused with the residual add.

    residual float32 [T, D]; weight [D]; delta [T, D] in weight's dtype; rows int32 [R].
    If delta is given, residual += delta in place (all T rows). Returns
    out[r] = residual[rows[r]] / sqrt(mean(residual[rows[r]]^2) + eps) * weight, [R or T, D] in
    weight's dtype (rows None = every row).
    """
    _tensor("weight", weight, 1)
    _backend("weight", weight)
    D = weight.shape[0]
    if D == 0:
        raise ValueError("weight must be non-empty")
    device = weight.device
    T = _tensor("residual", residual, 2).shape[0]
    _check("residual", residual, (T, D), torch.float32, device, "(T, D)")
    _check("weight", weight, (D,), weight.dtype, device, "(D,)")
    eps = _float("eps", eps, False)
    if delta is not None:
        _check("delta", delta, (T, D), weight.dtype, device, "(T, D)")
    R = T
    if rows is not None:
        R = _tensor("rows", rows, 1).shape[0]
        _check("rows", rows, (R,), torch.int32, device, "(R,)")
        _check_indices("rows", rows, 0, T)
    out = torch.empty(R, D, dtype=weight.dtype, device=device)
    if T:
        _run("rms_norm", weight, residual, weight, out, delta=delta, rows=rows, eps=eps)
    return out


def qkv_rope(
    qkv: torch.Tensor, positions: torch.Tensor, n_heads: int, n_kv_heads: int, rope_theta: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits the fused projection qkv [T, (H + 2 KVH) * Dh] into q [T, H, Dh], k [T, KVH, Dh]
    and v [T, KVH, Dh], with half-rotation RoPE applied to q and k: pair (i, i + Dh/2) of token t
    turns by float32(positions[t]) * inv_freq[i], inv_freq the backends' own table
    (rope_inv_freq). positions int64 [T].
    """
    _tensor("qkv", qkv, 2)
    _backend("qkv", qkv)
    H = _int("n_heads", n_heads, 1)
    KVH = _int("n_kv_heads", n_kv_heads, 1)
    T, width = qkv.shape
    if width % (H + 2 * KVH):
        raise ValueError(f"qkv's width {width} is not a multiple of H + 2 KVH = {H + 2 * KVH}")
    Dh = width // (H + 2 * KVH)
    if Dh == 0 or Dh % 2:
        raise ValueError(f"head_dim must be even and non-zero, got {Dh}")
    _check("qkv", qkv, (T, width), qkv.dtype, qkv.device, "(T, (H + 2 KVH) * Dh)")
    _check("positions", positions, (T,), torch.int64, qkv.device, "(T,)")
    inv_freq = rope_inv_freq(Dh, rope_theta).to(qkv.device)  # [Dh/2]
    q = torch.empty(T, H, Dh, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(T, KVH, Dh, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty(T, KVH, Dh, dtype=qkv.dtype, device=qkv.device)
    if T:
        _run("qkv_rope", qkv, qkv, q, k, v, positions, inv_freq)
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """out[t, i] = silu(gate_up[t, i]) * gate_up[t, F + i]: gate_up [T, 2F] -> [T, F]."""
    _tensor("gate_up", gate_up, 2)
    _backend("gate_up", gate_up)
    T, F2 = gate_up.shape
    _check("gate_up", gate_up, (T, F2), gate_up.dtype, gate_up.device, "(T, 2F)")
    if F2 == 0 or F2 % 2:
        raise ValueError(f"gate_up's last dimension must be even and non-zero, got {F2}")
    F = F2 // 2
    out = torch.empty(T, F, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        _run("silu_mul", gate_up, gate_up, out)
    return out


class _Step:
    """The checked cache arguments shared by kv_append and paged_attention."""

    def __init__(self, names, k_new, v_new, k_pool, v_pool, block_tables, cu_seqlens, start_pos, block_size, window):
        k_name, v_name = names
        _tensor(k_name, k_new, 3)
        self.cuda = _backend(k_name, k_new)
        self.T, self.KVH, self.Dh = k_new.shape
        dtype, device = k_new.dtype, k_new.device
        _check(k_name, k_new, (self.T, self.KVH, self.Dh), dtype, device, "(T, KVH, Dh)")
        if self.KVH == 0 or self.Dh == 0:
            raise ValueError(f"{k_name} needs heads and a non-zero head_dim, got shape {tuple(k_new.shape)}")
        _check(v_name, v_new, (self.T, self.KVH, self.Dh), dtype, device, "(T, KVH, Dh)")
        self.block_size = _int("block_size", block_size, 1)
        self.window = _int("window", window, 0)
        NB = _tensor("k_pool", k_pool, 4).shape[0]
        pool_shape = (NB, self.block_size, self.KVH, self.Dh)
        _check("k_pool", k_pool, pool_shape, dtype, device, "(NB, B, KVH, Dh)")
        _check("v_pool", v_pool, pool_shape, dtype, device, "(NB, B, KVH, Dh)")
        self.E, self.MB = _tensor("block_tables", block_tables, 2).shape
        if self.MB == 0:
            raise ValueError("block_tables needs at least one column")
        _check("block_tables", block_tables, (self.E, self.MB), torch.int32, device, "(E, MB)")
        _check("cu_seqlens", cu_seqlens, (self.E + 1,), torch.int32, device, "(E + 1,)")
        _check("start_pos", start_pos, (self.E,), torch.int64, device, "(E,)")
        # -1 marks an unallocated table entry; the ops must never reach one.
        _check_indices("block_tables", block_tables, -1, NB)
        cu = cu_seqlens.cpu()
        lengths = cu[1:] - cu[:-1]  # [E] new tokens per entry
        if int(cu[0]) != 0 or int(cu[-1]) != self.T or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {self.T}, got {cu.tolist()}")
        starts = start_pos.cpu()
        _check_indices("start_pos", starts, 0, 2**62)
        self.lengths, self.ends = lengths, starts + lengths  # [E]
        self.tensors = (k_new, v_new, k_pool, v_pool, block_tables, cu_seqlens, start_pos)

    def paged_kv(self):
        """The op's PagedKv view; host copies of cu_seqlens and start_pos plan the kernels."""
        _, _, _, _, block_tables, cu_seqlens, start_pos = self.tensors
        cu, starts = cu_seqlens.cpu(), start_pos.cpu()
        return _ops.PagedKv(block_tables, cu_seqlens, start_pos, self.block_size, self.window, cu.tolist(),
                            starts.tolist())


def kv_append(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    start_pos: torch.Tensor,
    block_size: int,
    window: int,
) -> None:
    """Writes a step's K/V into the pools, in place (the CPU backend's cpu::kv_append semantics).

    k, v [T, KVH, Dh]; pools [NB, B, KVH, Dh]; block_tables int32 [E, MB]; cu_seqlens int32
    [E + 1]; start_pos int64 [E]. Entry e's tokens sit at positions start_pos[e] ..; only the
    last W positions of each entry are written under a window W (0 = full attention: all).
    """
    step = _Step(("k", "v"), k, v, k_pool, v_pool, block_tables, cu_seqlens, start_pos, block_size, window)
    if step.T:
        _run("kv_append", k, k, v, k_pool, v_pool, step.paged_kv())


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    start_pos: torch.Tensor,
    block_size: int,
    window: int,
) -> torch.Tensor:
    """Causal (and sliding-window) GQA attention of a step's tokens -> out [T, H, Dh].

    q [T, H, Dh]; k_new, v_new [T, KVH, Dh] (this step's K/V, RoPE applied); the rest as in
    kv_append. Keys at positions >= start_pos[e] come from k_new/v_new, older ones from the pools.
    """
    step = _Step(("k_new", "v_new"), k_new, v_new, k_pool, v_pool, block_tables, cu_seqlens, start_pos, block_size,
                 window)
    H = _tensor("q", q, 3).shape[1]
    _check("q", q, (step.T, H, step.Dh), k_new.dtype, k_new.device, "(T, H, Dh)")
    if H == 0 or H % step.KVH:
        raise ValueError(f"q's heads ({H}) must be a non-zero multiple of k's ({step.KVH})")
    out = torch.empty_like(q)
    if step.T == 0:
        return out
    _run("attention", q, q, k_new, v_new, k_pool, v_pool, step.paged_kv(), out)
    return out


def linear(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x · wᵀ: x [T, K], w [N, K] -> [T, N] (CPU: float32 x, w float32/bfloat16/float16;
    CUDA: cuBLAS, w in x's dtype).

    out_dtype: None = x's dtype; on CUDA also torch.float32 (logits).
    """
    _tensor("x", x, 2)
    cuda = _backend("x", x)
    T, K = x.shape
    _check("x", x, (T, K), x.dtype, x.device, "(T, K)")
    N = _tensor("w", w, 2).shape[0]
    w_dtype = w.dtype if not cuda and w.dtype in (torch.float32,) + _HALF else x.dtype
    _check("w", w, (N, K), w_dtype, x.device, "(N, K)")
    if out_dtype is None:
        out_dtype = x.dtype
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be None or a torch.dtype, got {type(out_dtype).__name__}")
    allowed = (x.dtype, torch.float32) if cuda else (torch.float32,)
    if out_dtype not in allowed:
        raise TypeError(f"out_dtype must be one of {sorted(set(map(str, allowed)))}, got {out_dtype}")
    y = torch.empty(T, N, dtype=out_dtype, device=x.device)
    if T == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    _run("linear", x, x, w, y)
    return y


# ---- Mixtral MoE (E = experts, K = experts per token, P = T * K pairs, pair p = t * K + k) ----


def _moe_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    """(T, D, E, F) of x [T, D], w13 [E, 2F, D], w2 [E, D, F], all in x's dtype and device."""
    T, D = x.shape
    _check("x", x, (T, D), x.dtype, x.device, "(T, D)")
    E, F2 = _tensor("w13", w13, 3).shape[:2]
    if D == 0 or E == 0 or F2 == 0 or F2 % 2:
        raise ValueError(f"need D > 0, E > 0 and an even 2F > 0, got x {tuple(x.shape)}, w13 {tuple(w13.shape)}")
    F = F2 // 2
    _check("w13", w13, (E, 2 * F, D), x.dtype, x.device, "(E, 2F, D)")
    _check("w2", w2, (E, D, F), x.dtype, x.device, "(E, D, F)")
    return T, D, E, F


def _moe_top_k(top_k, n_experts: int) -> int:
    K = _int("top_k", top_k, 1)
    if K > n_experts:
        raise ValueError(f"top_k ({K}) must not exceed the number of experts ({n_experts})")
    return K


def moe_route(router_logits: torch.Tensor, top_k: int):
    """Mixtral routing of float32 router logits [T, E] -> (expert_ids int32 [T, K], weights float32
    [T, K], expert_offsets int32 [E + 1], sorted_pairs int32 [T * K]) on the logits' device: the
    routing step of the backend's moe op.

    Token t's experts are its K largest logits (ties to the lower expert index), its weights the
    softmax over those K logits. Expert e's pairs are sorted_pairs[offsets[e] : offsets[e + 1]],
    ascending.
    """
    _tensor("router_logits", router_logits, 2)
    device = router_logits.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"router_logits is on {device}; moe_route runs on 'cpu' or 'cuda'")
    if device.type == "cuda" and not _ops.has_cuda:
        raise _C.UnsupportedError("this build of mistral_cuda has no CUDA backend")
    T, E = router_logits.shape
    _check("router_logits", router_logits, (T, E), torch.float32, device, "(T, E)")
    if E == 0:
        raise ValueError("router_logits needs at least one expert column")
    K = _moe_top_k(top_k, E)
    ids = torch.empty(T, K, dtype=torch.int32, device=device)
    weights = torch.empty(T, K, dtype=torch.float32, device=device)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=device)
    pairs = torch.empty(T * K, dtype=torch.int32, device=device)
    if T:
        _run("moe_route", router_logits, router_logits, K, ids, weights, offsets, pairs)
    return ids, weights, offsets, pairs


def moe_ffn(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's sparse MoE FFN -> y float32 [T, D]: y[t] = Σ_k weight[t, k] · w2_e(silu(w1_e x_t) *
    (w3_e x_t)) over token t's top_k experts e, routed by the logits x · routerᵀ (moe_route).

    x [T, D], router [E, D], w13 [E, 2F, D] (rows 0..F-1 = w1, F..2F-1 = w3), w2 [E, D, F]: the
    backend's moe op, adding into a zeroed float32 residual.
    """
    _tensor("x", x, 2)
    _backend("x", x)
    T, D, E, F = _moe_shapes(x, w13, w2)
    _check("router", router, (E, D), x.dtype, x.device, "(E, D)")
    K = _moe_top_k(top_k, E)
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    if T:
        _run("moe", x, x, router, w13, w2, y, K)
    return y


# ---- quantized weights (csrc/core/weight.h: formats "int8" and "int4") ----


class QuantizedWeight:
    """A quantized matrix [N, K] or stack [E, N, K] in the engine's own layout, as torch tensors:

    int8: data int8 [E?, N, K], scales float32 [E?, N]; w = q * s.
    int4: data uint8 [E?, N, K // 2], each 32 columns in 16 bytes (byte i = q[i] | q[i + 16] << 4),
    scales and zeros float32 [E?, N, K // G]; w = (q - z) * s; col_perm int32 [E?, K] or None
    (stored column k holds input column col_perm[k]).
    """

    def __init__(self, format: str, shape, data, scales, zeros=None, group_size: int = 0, col_perm=None,
                 quantize_activations: bool = False):
        if format not in ("int8", "int4"):
            raise ValueError(f"format must be 'int8' or 'int4', got {format!r}")
        self.format = format
        self.shape = tuple(int(s) for s in shape)
        self.data, self.scales, self.zeros, self.col_perm = data, scales, zeros, col_perm
        self.group_size = int(group_size)
        # CPU fast mode: x quantized to int8 per row, integer dot products (cpu/quantized_activations.h).
        self.quantize_activations = bool(quantize_activations)
        lead = self.shape[:-1]
        N, K = self.shape[-2:]
        expect = {"data": (data, lead + ((K,) if format == "int8" else (K // 2,)), torch.int8 if format == "int8" else torch.uint8)}
        if format == "int8":
            expect["scales"] = (scales, lead, torch.float32)
        else:
            if self.group_size <= 0 or self.group_size % 32 or K % self.group_size or K % 32:
                raise ValueError(f"int4 needs K and group_size multiples of 32 with group_size | K, got K={K}, G={group_size}")
            groups = lead + (K // self.group_size,)
            expect["scales"] = (scales, groups, torch.float32)
            expect["zeros"] = (zeros, groups, torch.float32)
            if col_perm is not None:
                expect["col_perm"] = (col_perm, self.shape[:-2] + (K,), torch.int32)
        device = data.device
        for name, (t, want, dtype) in expect.items():
            _check(name, t, want, dtype, device, "")

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.format, self.shape, move(self.data), move(self.scales), move(self.zeros),
                               self.group_size, move(self.col_perm), self.quantize_activations)

    def with_quantized_activations(self, on: bool = True) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.shape, self.data, self.scales, self.zeros, self.group_size,
                               self.col_perm, on)


def quantize(w: torch.Tensor, format: str, group_size: int = 128) -> QuantizedWeight:
    """The engine's quantize-on-load rule (csrc/core/quantized.h) on a CPU float matrix [N, K] or
    stack [E, N, K] (float32, bfloat16 or float16)."""
    if not isinstance(w, torch.Tensor) or w.dim() not in (2, 3) or w.device.type != "cpu":
        raise ValueError("w must be a CPU tensor [N, K] or [E, N, K]")
    if w.dtype not in (torch.float32,) + _HALF:
        raise TypeError(f"w must be float32, bfloat16 or float16, got {w.dtype}")
    if format not in ("int8", "int4"):
        raise ValueError(f"format must be 'int8' or 'int4', got {format!r}")
    w = w.contiguous()
    lead, K = tuple(w.shape[:-1]), w.shape[-1]
    if format == "int8":
        data = torch.empty(lead + (K,), dtype=torch.int8)
        scales = torch.empty(lead, dtype=torch.float32)
        zeros = None
    else:
        if group_size <= 0 or K % group_size or group_size % 32:
            raise ValueError(f"int4 needs group_size a multiple of 32 dividing K={K}, got {group_size}")
        data = torch.empty(lead + (K // 2,), dtype=torch.uint8)
        scales = torch.empty(lead + (K // group_size,), dtype=torch.float32)
        zeros = torch.empty_like(scales)
    _ops.quantize(w, format, group_size if format == "int4" else 0, data, scales, zeros)
    return QuantizedWeight(format, w.shape, data, scales, zeros, group_size if format == "int4" else 0)


def _quantized_check(x: torch.Tensor, w: QuantizedWeight, ndim: int) -> bool:
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"w must be a QuantizedWeight, got {type(w).__name__}")
    if len(w.shape) != ndim:
        raise ValueError(f"expected a {ndim}-D quantized weight, got shape {w.shape}")
    if w.device != x.device:
        raise ValueError(f"the weight is on {w.device} but x on {x.device}")
    return _backend("x", x)


def quantized_linear(x: torch.Tensor, w: QuantizedWeight, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x · dequant(w)ᵀ: x [T, K], w [N, K] quantized -> [T, N] in out_dtype (None: x's dtype;
    on CUDA also float32)."""
    _tensor("x", x, 2)
    cuda = _quantized_check(x, w, 2)
    T, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"x has K={K} columns but w is {w.shape}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    allowed = (x.dtype, torch.float32) if cuda else (torch.float32,)
    if out_dtype not in allowed:
        raise TypeError(f"out_dtype must be one of {sorted(set(map(str, allowed)))}, got {out_dtype}")
    y = torch.empty(T, N, dtype=out_dtype, device=x.device)
    if T and N:
        _run("linear", x, x.contiguous(), w, y)
    return y


def quantized_moe_ffn(x: torch.Tensor, router: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
                      top_k: int) -> torch.Tensor:
    """moe_ffn with quantized experts w13 [E, 2F, D] and w2 [E, D, F] -> float32 [T, D]."""
    _tensor("x", x, 2)
    _quantized_check(x, w13, 3)
    _quantized_check(x, w2, 3)
    T, D = x.shape
    E, F2, D13 = w13.shape
    if D13 != D or F2 % 2 or w2.shape != (E, D, F2 // 2):
        raise ValueError(f"need w13 (E, 2F, D) and w2 (E, D, F) for D={D}, got {w13.shape} and {w2.shape}")
    _check("router", router, (E, D), x.dtype, x.device, "(E, D)")
    K = _moe_top_k(top_k, E)
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    if T:
        _run("moe", x, x.contiguous(), router, w13, w2, y, K)
    return y
