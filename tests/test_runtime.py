"""The runtime over the backend op table: weights kept in their stored dtype on the CPU, the
forward pass split into passes within its limits, the read-only config, and the CPU ops
(mistral_cuda.testing) against plain-torch references written here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import mistral_cuda as mc
import tiny_models as tm
from mistral_cuda import _C
from mistral_cuda import testing as ops
from tiny_models import assert_logits_close


# --------------------------------------------------------------------------------------
# Weights in their own dtype
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_half_checkpoint_stays_half_and_equals_f32_path(kind, dtype, name, tmp_path, load_engine):
    """A bf16/f16 checkpoint is kept as stored; widening to f32 is exact, so its logits equal the
    upcast (dtype="float32") engine's bit for bit, and transformers' on the same rounded weights."""
    cfg = tm.mistral_config(sliding_window=8) if kind == "mistral" else tm.mixtral_config(num_local_experts=4)
    tiny = tm.make_bf16_checkpoint(tmp_path, cfg, tm.seed_of(f"keep-{kind}-{name}"), dtype=dtype)
    kept = load_engine(tiny)
    upcast = load_engine(tiny, dtype="float32")
    assert kept.model.dtype == name and upcast.model.dtype == "float32"
    ids = tiny.random_ids(37, tm.seed_of(f"keep-ids-{kind}"))
    for chunk in (1, 5, 37):
        got = kept.logits(ids, chunk_size=chunk)
        assert torch.equal(got, upcast.logits(ids, chunk_size=chunk)), f"{kind} {name} chunk {chunk}"
        assert_logits_close(got, tiny.reference_logits(ids), f"{kind} {name} chunk {chunk}")


def test_f32_checkpoint_converted_to_bf16_on_load(tmp_path, load_engine):
    """dtype="bfloat16" rounds every weight of a float32 checkpoint on load: logits equal
    transformers' on the bf16-rounded weights."""
    cfg = tm.mistral_config(sliding_window=None)
    tiny = tm.make_hf_checkpoint(tmp_path, cfg, tm.seed_of("f32-to-bf16"))
    engine = load_engine(tiny, dtype="bfloat16")
    assert engine.model.dtype == "bfloat16"
    ref_model = tm.build_model(cfg, tm.seed_of("f32-to-bf16"))
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    ids = tiny.random_ids(20, tm.seed_of("f32-to-bf16-ids"))
    assert_logits_close(engine.logits(ids), tm.reference_logits(ref_model, ids), "f32 -> bf16 on load")


_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, mistral_cuda as mc
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    before = rss()
    e = mc.Engine.from_pretrained(sys.argv[1], progress=False, num_blocks=8, **eval(sys.argv[2]))
    e.model.step([(e.model.add_sequence(), [1, 2, 3])])
    print(rss() - before)
    """
)


def _write_random_bf16_checkpoint(path, dim=512, layers=6, hidden=1536, vocab=8192):
    """A plain-safetensors bf16 Mistral (about 16M parameters), no transformers needed."""
    g = torch.Generator().manual_seed(7)
    heads, kv_heads = 8, 4
    hd = dim // heads
    t = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                  p + "self_attn.q_proj.weight": (heads * hd, dim), p + "self_attn.k_proj.weight": (kv_heads * hd, dim),
                  p + "self_attn.v_proj.weight": (kv_heads * hd, dim), p + "self_attn.o_proj.weight": (dim, heads * hd),
                  p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                  p + "mlp.down_proj.weight": (dim, hidden)})
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in t.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": dim,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": hidden, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": None, "max_position_embeddings": 512, "tie_word_embeddings": False}))
    return sum(v.numel() * 2 for v in tensors.values())


@pytest.mark.parametrize("mmap", [True, False])
def test_bf16_resident_memory_is_checkpoint_size(tmp_path, mmap):
    """Resident memory after load and a first step: a bf16 model costs about its checkpoint
    bytes (not the twice that an f32 upcast costs), memory-mapped or copied."""
    nbytes = _write_random_bf16_checkpoint(tmp_path)
    def grow(kwargs):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), repr(kwargs)], capture_output=True,
                             text=True, timeout=300, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    kept = grow({"mmap": mmap})
    upcast = grow({"mmap": mmap, "dtype": "float32"})
    assert kept < 1.3 * nbytes, f"bf16 model grew RSS by {kept / 1e6:.1f} MB for {nbytes / 1e6:.1f} MB of weights"
    assert upcast > 1.7 * nbytes, f"the f32 upcast grew RSS by only {upcast / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------
# Forward passes within limits; mixed decode and prefill
# --------------------------------------------------------------------------------------


def _load_with_limits(tiny, max_step_tokens, max_step_seqs):
    options = _C.ModelOptions()
    options.max_step_tokens = max_step_tokens
    options.max_step_seqs = max_step_seqs
    return _C.Model.load(str(tiny.path), options)


@pytest.mark.parametrize("limits", [(7, 2), (1, 1), (16, 3)])
def test_step_beyond_limits_runs_as_several_passes(mistral_sw, limits):
    """A step larger than the pass limits (tokens, sequences) is split into passes; every logit
    row equals transformers' and the cache ends where one big pass would leave it."""
    m = _load_with_limits(mistral_sw, *limits)
    assert m.max_step_tokens == limits[0]
    prompts = [mistral_sw.random_ids(n, tm.seed_of(f"limits-{n}")) for n in (23, 1, 9, 4)]
    seqs = [m.add_sequence() for _ in prompts]
    out = m.step(list(zip(seqs, prompts)), all_logits=True)
    for prompt, rows in zip(prompts, out):
        assert_logits_close(rows, mistral_sw.reference_logits(prompt), f"limits {limits}")
    last = m.step([(s, p[-1:]) for s, p in zip(seqs, prompts)])
    for prompt, row in zip(prompts, last):
        assert_logits_close(row, mistral_sw.reference_logits(prompt + prompt[-1:])[-1], "decode after split step")
    assert [m.sequence_length(s) for s in seqs] == [len(p) + 1 for p in prompts]


def test_mixed_decode_and_prefill_keep_entry_order(mistral_full, load_engine):
    """Decode entries run first inside a pass; results still come back in entry order."""
    m = load_engine(mistral_full).model
    a, b, c = m.add_sequence(), m.add_sequence(), m.add_sequence()
    pa, pb, pc = (mistral_full.random_ids(n, tm.seed_of(f"mix-{n}")) for n in (6, 11, 3))
    m.step([(a, pa), (c, pc)])
    # prefill, decode, decode in this order: decode entries are reordered internally.
    out = m.step([(b, pb), (a, [pa[0]]), (c, [pc[0]])])
    assert_logits_close(out[0], mistral_full.reference_logits(pb)[-1], "prefill entry")
    assert_logits_close(out[1], mistral_full.reference_logits(pa + [pa[0]])[-1], "decode entry a")
    assert_logits_close(out[2], mistral_full.reference_logits(pc + [pc[0]])[-1], "decode entry c")


def test_pass_limits_are_validated(mistral_sw):
    options = _C.ModelOptions()
    options.max_step_tokens = -1
    with pytest.raises(mc.InvalidRequestError, match="max_step_tokens"):
        _C.Model.load(str(mistral_sw.path), options)


# --------------------------------------------------------------------------------------
# engine.config is read-only
# --------------------------------------------------------------------------------------


def test_config_is_read_only(mistral_sw, load_engine):
    engine = load_engine(mistral_sw)
    config = engine.config
    assert isinstance(config, mc.ModelConfig)
    for field, value in [("vocab_size", 10), ("n_layers", 1), ("sliding_window", None), ("dim", 2**40)]:
        with pytest.raises(AttributeError, match=f"'{field}'"):
            setattr(config, field, value)
    with pytest.raises(AttributeError):
        config.not_a_field = 1
    out = engine.generate([[1, 5, 9]], mc.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    # A user-built config stays writable (presets, from_config).
    preset = mc.ModelConfig.preset("mistral-7b-v0.1")
    preset.n_layers = 2
    assert preset.n_layers == 2


# --------------------------------------------------------------------------------------
# CPU ops against plain-torch references (the same harness the CUDA tests use)
# --------------------------------------------------------------------------------------


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,N,K", [(1, 33, 511), (3, 64, 16), (5, 7, 100), (2, 129, 1)])
def test_cpu_linear_any_weight_format(T, N, K, wdtype):
    x = _rand(T, K, seed=T * 1000 + K)
    w = _rand(N, K, seed=N * 7 + K, dtype=wdtype)
    y = ops.linear(x, w)
    ref = (x.double() @ w.double().T).float()
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,N,K", [(1, 13, 4096 - 64 + 16 + 5), (1, 20, 4096 + 48 + 3), (1, 9, 4096), (3, 7, 100), (2, 5, 33)])
def test_cpu_linear_half_weights_equal_f32_upcast_bitwise(T, N, K, wdtype):
    """bf16 / f16 weights widen exactly and sum in the f32 kernel's order: the same bits as the
    f32 linear over the upcast matrix, in the one-row decode tiles (K <= 4096), the six-row ones
    (longer rows; N leaves edge rows) and the batched ones; and a token's row is the same at
    batch 1 as inside the batch. (K's remainders: whole 4-block groups, 1-3 blocks, scalars.)"""
    x = _rand(T, K, seed=T * 31 + K)
    w = _rand(N, K, seed=N * 3 + K, dtype=wdtype)
    y = ops.linear(x, w)
    assert torch.equal(y, ops.linear(x, w.float()))
    assert torch.equal(y[-1:], ops.linear(x[-1:].contiguous(), w))
    ref = (x.double() @ w.double().T).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_cpu_rms_norm_fused_residual():
    T, D = 9, 33
    residual = _rand(T, D, seed=1)
    delta = _rand(T, D, seed=2)
    weight = _rand(D, seed=3)
    rows = torch.tensor([8, 0, 3], dtype=torch.int32)
    expected_residual = residual + delta
    r = expected_residual[rows.long()].double()
    ref = (r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()).float()
    out = ops.rms_norm(residual, weight, 1e-5, delta=delta, rows=rows)
    torch.testing.assert_close(residual, expected_residual)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("H,KVH,Dh", [(4, 2, 16), (3, 3, 8), (8, 1, 6)])
def test_cpu_qkv_rope_splits_and_rotates(H, KVH, Dh):
    T = 7
    qkv = _rand(T, (H + 2 * KVH) * Dh, seed=H * 10 + KVH)
    positions = torch.tensor([0, 1, 5, 17, 100, 4095, 40000], dtype=torch.int64)
    theta = 10000.0
    q, k, v = ops.qkv_rope(qkv, positions, H, KVH, theta)
    inv = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)
    angle = positions.float()[:, None] * inv[None, :]  # [T, Dh/2] in float32 like transformers
    cos, sin = torch.cos(angle.double()), torch.sin(angle.double())

    def rot(x):  # [T, heads, Dh], half rotation
        a, b = x[..., : Dh // 2].double(), x[..., Dh // 2 :].double()
        return torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1).float()

    qr, kr, vr = qkv.split([H * Dh, KVH * Dh, KVH * Dh], dim=1)
    torch.testing.assert_close(q, rot(qr.reshape(T, H, Dh)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, rot(kr.reshape(T, KVH, Dh)), rtol=1e-5, atol=1e-5)
    assert torch.equal(v, vr.reshape(T, KVH, Dh))


def test_cpu_silu_mul():
    gate_up = _rand(5, 2 * 37, seed=9)
    g, u = gate_up[:, :37], gate_up[:, 37:]
    torch.testing.assert_close(ops.silu_mul(gate_up), torch.nn.functional.silu(g) * u, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 7, 33])
def test_cpu_moe_against_torch(T):
    E, K, D, F = 8, 2, 24, 40
    x = _rand(T, D, seed=T)
    router = _rand(E, D, seed=100)
    w13 = _rand(E, 2 * F, D, seed=101) * 0.2
    w2 = _rand(E, D, F, seed=102) * 0.2
    y = ops.moe_ffn(x, router, w13, w2, K)
    logits = x.double() @ router.double().T
    top = torch.topk(logits, K, dim=-1)  # ties are measure-zero on random data
    weights = torch.softmax(top.values, dim=-1)
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for slot in range(K):
            e = int(top.indices[t, slot])
            h = torch.nn.functional.silu(w13[e, :F].double() @ x[t].double()) * (w13[e, F:].double() @ x[t].double())
            ref[t] += weights[t, slot] * (w2[e].double() @ h)
    assert len(set(int(e) for e in top.indices.flatten())) > 1
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)


def test_cpu_attention_and_append_against_torch():
    """Two entries, a wrapped window ring (W=5, B=2): attention over prefix + chunk, then append."""
    H, KVH, Dh, B, W = 4, 2, 8, 2, 5
    R = ops.ring_blocks_for(W, B)
    n_blocks = 2 * R
    k_pool = _rand(n_blocks, B, KVH, Dh, seed=1)
    v_pool = _rand(n_blocks, B, KVH, Dh, seed=2)
    starts = [9, 0]
    lens = [1, 4]
    tables = torch.tensor([[0, 1, 2, 3][:R], [4, 5, 6, 7][:R]], dtype=torch.int32)
    cu = torch.tensor([0, 1, 5], dtype=torch.int32)
    start_pos = torch.tensor(starts, dtype=torch.int64)
    T = 5
    q, k_new, v_new = _rand(T, H, Dh, seed=3), _rand(T, KVH, Dh, seed=4), _rand(T, KVH, Dh, seed=5)
    out = ops.paged_attention(q, k_new, v_new, k_pool, v_pool, tables, cu, start_pos, B, W)

    def key_row(entry, pos, pool, fresh):
        if pos >= starts[entry]:
            return fresh[int(cu[entry]) + pos - starts[entry]]
        block = int(tables[entry, (pos // B) % R])
        return pool[block, pos % B]

    for e in range(2):
        for i in range(lens[e]):
            t, qp = int(cu[e]) + i, starts[e] + i
            keys = list(range(max(0, qp - W + 1), qp + 1))
            for h in range(H):
                kvh = h // (H // KVH)
                kk = torch.stack([key_row(e, p, k_pool, k_new)[kvh] for p in keys]).double()
                vv = torch.stack([key_row(e, p, v_pool, v_new)[kvh] for p in keys]).double()
                p_ = torch.softmax(kk @ q[t, h].double() / Dh**0.5, 0)
                torch.testing.assert_close(out[t, h], (p_ @ vv).float(), rtol=1e-5, atol=1e-5)
    ops.kv_append(k_new, v_new, k_pool, v_pool, tables, cu, start_pos, B, W)
    assert torch.equal(k_pool[int(tables[0, (9 // B) % R]), 9 % B], k_new[0])
    for i in range(4):
        assert torch.equal(v_pool[int(tables[1, (i // B) % R]), i % B], v_new[1 + i])
