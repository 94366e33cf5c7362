"""Single ops of the CPU and CUDA backends, for backend-comparison tests and benchmarks.

Every function dispatches on its tensors' device: CPU float32 tensors run the CPU reference op
(csrc/cpu), CUDA bfloat16/float16 tensors run the CUDA kernel (csrc/cuda) on the current
stream of the tensors' device, without synchronizing. Arguments are checked here (a TypeError
for a wrong type or dtype, a ValueError for a wrong device, shape or layout, naming the
argument) before any data pointer is taken; the bindings in csrc/python/bind_ops.cpp trust them.
Checks of index values (ids, rows, cu_seqlens) read them on the host, which syncs on CUDA.

Shapes: T = tokens, D = dim, V = vocab, R = selected rows, H / KVH = query / key-value heads,
Dh = head_dim, F = FFN width, E = entries (sequences) of a step, MB = block-table width,
NB = blocks in a pool, B = block_size, W = sliding window (0 = full attention), N x K = linear.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Optional, Sequence

import torch

from mistral_cuda import _C
from mistral_cuda.cuda_libs import preload_cublas

_ops = _C.ops
_HALF_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}

__all__ = [
    "embedding",
    "kv_append",
    "linear",
    "moe_experts",
    "moe_ffn",
    "moe_route",
    "paged_attention",
    "ring_blocks_for",
    "rms_norm",
    "rope",
    "rope_inv_freq",
    "silu_mul",
]


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
        if t.dtype not in _HALF_NAMES:
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


def _device_scope(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


# ---- shared tables ----


def ring_blocks_for(window: int, block_size: int) -> int:
    """Block-table entries a sequence keeps under sliding window W: ceil(W / B) + 1 (0 for W = 0)."""
    return _ops.kv_ring_blocks(_int("window", window, 0), _int("block_size", block_size, 1))


def rope_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """The backends' RoPE table [Dh/2] float32: 1 / theta^(2i/Dh), computed in float32 by the core."""
    head_dim = _int("head_dim", head_dim, 2)
    return torch.tensor(_ops.rope_inv_freq(head_dim, _float("rope_theta", rope_theta, True)), dtype=torch.float32)


# ---- ops ----


def embedding(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """out[t] = table[ids[t]]: table [V, D], ids int32 [T] -> float32 [T, D]."""
    _tensor("table", table, 2)
    cuda = _backend("table", table)
    V, D = table.shape
    _check("table", table, (V, D), table.dtype, table.device, "(V, D)")
    if V == 0 or D == 0:
        raise ValueError(f"table must be non-empty, got shape {tuple(table.shape)}")
    T = _tensor("ids", ids, 1).shape[0]
    _check("ids", ids, (T,), torch.int32, table.device, "(T,)")
    _check_indices("ids", ids, 0, V)
    out = torch.empty(T, D, dtype=torch.float32, device=table.device)
    if cuda:
        with _device_scope(table):
            _ops.cuda_embedding(table=table.data_ptr(), ids=ids.data_ptr(), out=out.data_ptr(), n_tokens=T, dim=D,
                                dtype=_HALF_NAMES[table.dtype], stream=_stream(table))
    else:
        _ops.cpu_embedding(table=table.data_ptr(), ids=ids.data_ptr(), out=out.data_ptr(), n_tokens=T, dim=D)
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
    cuda = _backend("weight", weight)
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
    if cuda:
        with _device_scope(weight):
            _ops.cuda_rms_norm(residual=residual.data_ptr(), delta=0 if delta is None else delta.data_ptr(),
                               weight=weight.data_ptr(), out=out.data_ptr(),
                               rows=0 if rows is None else rows.data_ptr(), n_tokens=T, n_rows=R, dim=D, eps=eps,
                               dtype=_HALF_NAMES[weight.dtype], stream=_stream(weight))
        return out
    # The CPU backend's sequence: add the delta, gather the selected rows, normalize them.
    if delta is not None:
        _ops.cpu_add_inplace(x=residual.data_ptr(), y=delta.data_ptr(), count=T * D)
    x = residual if rows is None else residual.index_select(0, rows.long())  # [R, D]
    _ops.cpu_rms_norm(x=x.data_ptr(), weight=weight.data_ptr(), out=out.data_ptr(), n_rows=R, dim=D, eps=eps)
    return out


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rope_theta: float) -> None:
    """Half-rotation RoPE in place: q [T, H, Dh], k [T, KVH, Dh], positions int64 [T].

    Pair (i, i + Dh/2) of token t turns by float32(positions[t]) * inv_freq[i], inv_freq the
    backends' own table (rope_inv_freq).
    """
    _tensor("q", q, 3)
    cuda = _backend("q", q)
    T, H, Dh = q.shape
    _check("q", q, (T, H, Dh), q.dtype, q.device, "(T, H, Dh)")
    if H == 0 or Dh == 0 or Dh % 2:
        raise ValueError(f"q needs heads and an even, non-zero head_dim, got shape {tuple(q.shape)}")
    KVH = _tensor("k", k, 3).shape[1]
    _check("k", k, (T, KVH, Dh), q.dtype, q.device, "(T, KVH, Dh)")
    if KVH == 0:
        raise ValueError("k needs at least one head")
    _check("positions", positions, (T,), torch.int64, q.device, "(T,)")
    inv_freq = rope_inv_freq(Dh, rope_theta).to(q.device)  # [Dh/2]
    if cuda:
        with _device_scope(q):
            _ops.cuda_rope(q=q.data_ptr(), k=k.data_ptr(), positions=positions.data_ptr(),
                           inv_freq=inv_freq.data_ptr(), n_tokens=T, n_heads=H, n_kv_heads=KVH, head_dim=Dh,
                           dtype=_HALF_NAMES[q.dtype], stream=_stream(q))
        return
    half = Dh // 2
    cos = torch.empty(T, half, dtype=torch.float32)
    sin = torch.empty(T, half, dtype=torch.float32)
    _ops.cpu_rope_tables(positions=positions.data_ptr(), inv_freq=inv_freq.data_ptr(), n_tokens=T, half=half,
                         cos=cos.data_ptr(), sin=sin.data_ptr())
    _ops.cpu_rope(x=q.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), n_tokens=T, heads=H, head_dim=Dh)
    _ops.cpu_rope(x=k.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), n_tokens=T, heads=KVH, head_dim=Dh)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """out[t, i] = silu(gate_up[t, i]) * gate_up[t, F + i]: gate_up [T, 2F] -> [T, F]."""
    _tensor("gate_up", gate_up, 2)
    cuda = _backend("gate_up", gate_up)
    T, F2 = gate_up.shape
    _check("gate_up", gate_up, (T, F2), gate_up.dtype, gate_up.device, "(T, 2F)")
    if F2 == 0 or F2 % 2:
        raise ValueError(f"gate_up's last dimension must be even and non-zero, got {F2}")
    F = F2 // 2
    out = torch.empty(T, F, dtype=gate_up.dtype, device=gate_up.device)
    if cuda:
        with _device_scope(gate_up):
            _ops.cuda_silu_mul(gate_up=gate_up.data_ptr(), out=out.data_ptr(), n_tokens=T, hidden=F,
                               dtype=_HALF_NAMES[gate_up.dtype], stream=_stream(gate_up))
        return out
    gate = gate_up[:, :F].contiguous()  # [T, F]
    up = gate_up[:, F:].contiguous()  # [T, F]
    _ops.cpu_silu_mul(gate=gate.data_ptr(), up=up.data_ptr(), out=out.data_ptr(), count=T * F)
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

    def pointers(self) -> dict:
        k, v, k_pool, v_pool, block_tables, cu_seqlens, start_pos = self.tensors
        return dict(k_pool=k_pool.data_ptr(), v_pool=v_pool.data_ptr(), block_tables=block_tables.data_ptr(),
                    cu_seqlens=cu_seqlens.data_ptr(), start_pos=start_pos.data_ptr(), n_entries=self.E,
                    max_blocks=self.MB, head_dim=self.Dh, block_size=self.block_size, window=self.window)


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
    args = step.pointers()
    if step.cuda:
        with _device_scope(k):
            _ops.cuda_kv_append(k=k.data_ptr(), v=v.data_ptr(), n_tokens=step.T, n_kv_heads=step.KVH,
                                dtype=_HALF_NAMES[k.dtype], stream=_stream(k), **args)
    else:
        _ops.cpu_kv_append(k=k.data_ptr(), v=v.data_ptr(), n_kv_heads=step.KVH, **args)


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
    args = step.pointers()
    if not step.cuda:
        _ops.cpu_paged_attention(q=q.data_ptr(), k_new=k_new.data_ptr(), v_new=v_new.data_ptr(), out=out.data_ptr(),
                                 n_heads=H, n_kv_heads=step.KVH, **args)
        return out
    # Host-side bounds for the kernel's plan: longest query chunk, most keys any query sees.
    visible = step.ends.clamp(max=step.window) if step.window else step.ends
    visible = torch.where(step.lengths > 0, visible, torch.zeros_like(visible))
    with _device_scope(q):
        params = _ops.cuda_attention_params(
            q=q.data_ptr(), k_new=k_new.data_ptr(), v_new=v_new.data_ptr(), out=out.data_ptr(), n_tokens=step.T,
            n_heads=H, n_kv_heads=step.KVH, max_query_len=int(step.lengths.max()), max_context=int(visible.max()),
            dtype=_HALF_NAMES[q.dtype], **args)
        workspace = torch.empty(_ops.cuda_attention_workspace_bytes(params), dtype=torch.uint8, device=q.device)
        _ops.cuda_paged_attention(params, workspace.data_ptr() if workspace.numel() else 0, _stream(q))
    return out


def linear(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x · wᵀ: x [T, K], w [N, K] -> [T, N] (CPU: cpu::matmul in float32; CUDA: cuBLAS).

    out_dtype: None = x's dtype; on CUDA also torch.float32 (logits).
    """
    _tensor("x", x, 2)
    cuda = _backend("x", x)
    T, K = x.shape
    _check("x", x, (T, K), x.dtype, x.device, "(T, K)")
    N = _tensor("w", w, 2).shape[0]
    _check("w", w, (N, K), x.dtype, x.device, "(N, K)")
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
    if not cuda:
        _ops.cpu_matmul(x=x.data_ptr(), w=w.data_ptr(), y=y.data_ptr(), n_tokens=T, n=N, k=K)
        return y
    preload_cublas()
    names = {**_HALF_NAMES, torch.float32: "float32"}
    with _device_scope(x):
        _ops.cuda_linear(x=x.data_ptr(), w=w.data_ptr(), y=y.data_ptr(), n_tokens=T, n=N, k=K,
                         in_dtype=names[x.dtype], out_dtype=names[out_dtype], stream=_stream(x))
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


def _run_moe_experts(x, w13, w2, offsets, pairs, weights, residual, T, E, K, D, F) -> None:
    dtype = _HALF_NAMES[x.dtype]
    with _device_scope(x):
        nbytes = _ops.cuda_moe_workspace_bytes(n_tokens=T, n_experts=E, top_k=K, dim=D, hidden=F, dtype=dtype)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=x.device)  # act [P, F]
        _ops.cuda_moe_experts(x=x.data_ptr(), w13=w13.data_ptr(), w2=w2.data_ptr(), expert_offsets=offsets.data_ptr(),
                              sorted_pairs=pairs.data_ptr(), weights=weights.data_ptr(), residual=residual.data_ptr(),
                              workspace=workspace.data_ptr() if nbytes else 0, n_tokens=T, n_experts=E, top_k=K,
                              dim=D, hidden=F, dtype=dtype, stream=_stream(x))


def moe_route(router_logits: torch.Tensor, top_k: int):
    """Mixtral routing of float32 router logits [T, E] -> (expert_ids int32 [T, K], weights float32
    [T, K], expert_offsets int32 [E + 1], sorted_pairs int32 [T * K]) on the logits' device.

    Token t's experts are its K largest logits (ties to the lower expert index), its weights the
    softmax over those K logits. Expert e's pairs are sorted_pairs[offsets[e] : offsets[e + 1]],
    ascending. CPU: the CPU backend's routing; CUDA: one kernel, no sync (E <= 64, K <= 8).
    """
    _tensor("router_logits", router_logits, 2)
    device = router_logits.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"router_logits is on {device}; moe_route runs on 'cpu' or 'cuda'")
    T, E = router_logits.shape
    _check("router_logits", router_logits, (T, E), torch.float32, device, "(T, E)")
    if E == 0:
        raise ValueError("router_logits needs at least one expert column")
    K = _moe_top_k(top_k, E)
    cuda = device.type == "cuda"
    if cuda and not _ops.has_cuda:
        raise _C.UnsupportedError("this build of mistral_cuda has no CUDA backend")
    ids = torch.empty(T, K, dtype=torch.int32, device=device)
    weights = torch.empty(T, K, dtype=torch.float32, device=device)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=device)
    pairs = torch.empty(T * K, dtype=torch.int32, device=device)
    args = dict(router_logits=router_logits.data_ptr(), expert_ids=ids.data_ptr(), weights=weights.data_ptr(),
                expert_offsets=offsets.data_ptr(), sorted_pairs=pairs.data_ptr(), n_tokens=T, n_experts=E, top_k=K)
    if cuda:
        with _device_scope(router_logits):
            _ops.cuda_moe_route(stream=_stream(router_logits), **args)
    else:
        _ops.cpu_moe_route(**args)
    return ids, weights, offsets, pairs


def moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_pairs: torch.Tensor,
    weights: torch.Tensor,
    residual: torch.Tensor,
    top_k: int,
) -> None:
    """residual[t] += Σ_k weights[t, k] · w2_e(silu(w1_e x_t) * (w3_e x_t)) in place, e = the
    experts of a routing from moe_route. CUDA only (on the CPU the whole layer is moe_ffn).

    x [T, D], w13 [E, 2F, D] (rows 0..F-1 = w1, F..2F-1 = w3 of each expert), w2 [E, D, F], one
    half dtype; expert_offsets int32 [E + 1], sorted_pairs int32 [T * K], weights float32 [T, K],
    residual float32 [T, D]. The kernels take D and F multiples of 16. The routing's values are
    checked on the host (a sync).
    """
    _tensor("x", x, 2)
    if not _backend("x", x):
        raise ValueError("moe_experts runs on CUDA tensors (bfloat16/float16); on the CPU use moe_ffn")
    T, D, E, F = _moe_shapes(x, w13, w2)
    K = _moe_top_k(top_k, E)
    P = T * K
    _check("expert_offsets", expert_offsets, (E + 1,), torch.int32, x.device, "(E + 1,)")
    _check("sorted_pairs", sorted_pairs, (P,), torch.int32, x.device, "(T * K,)")
    _check("weights", weights, (T, K), torch.float32, x.device, "(T, K)")
    _check("residual", residual, (T, D), torch.float32, x.device, "(T, D)")
    off = expert_offsets.cpu()
    if int(off[0]) != 0 or int(off[-1]) != P or bool((off[1:] < off[:-1]).any()):
        raise ValueError(f"expert_offsets must rise from 0 to T * K = {P}, got {off.tolist()}")
    _check_indices("sorted_pairs", sorted_pairs, 0, P)
    if T == 0:
        return
    _run_moe_experts(x, w13, w2, expert_offsets, sorted_pairs, weights, residual, T, E, K, D, F)


def moe_ffn(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's sparse MoE FFN -> y float32 [T, D]: y[t] = Σ_k weight[t, k] · w2_e(silu(w1_e x_t) *
    (w3_e x_t)) over token t's top_k experts e, routed by the logits x · routerᵀ (moe_route).

    x [T, D], router [E, D], w13 [E, 2F, D] (rows 0..F-1 = w1, F..2F-1 = w3), w2 [E, D, F].
    CPU float32: cpu::moe_ffn. CUDA bfloat16/float16: float32 router logits (linear), moe_route,
    then the expert kernels adding into a zeroed float32 buffer; no sync.
    """
    _tensor("x", x, 2)
    cuda = _backend("x", x)
    T, D, E, F = _moe_shapes(x, w13, w2)
    _check("router", router, (E, D), x.dtype, x.device, "(E, D)")
    K = _moe_top_k(top_k, E)
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    if T == 0:
        return y
    if not cuda:
        _ops.cpu_moe_ffn(x=x.data_ptr(), router=router.data_ptr(), w13=w13.data_ptr(), w2=w2.data_ptr(),
                         y=y.data_ptr(), n_tokens=T, dim=D, hidden=F, n_experts=E, top_k=K)
        return y
    logits = linear(x, router, out_dtype=torch.float32)  # [T, E]
    _, weights, offsets, pairs = moe_route(logits, K)
    _run_moe_experts(x, w13, w2, offsets, pairs, weights, y, T, E, K, D, F)
    return y
