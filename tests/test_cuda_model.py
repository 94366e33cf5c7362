"""The whole Mistral model on the GPU (bf16) against transformers and the CPU backend.

Oracle: ref = transformers float32 logits (on the CPU) of tiny random models saved with
transformers (tiny_models.py). Rule: the relative error of the CUDA engine (bf16) must be
<= 2 x the relative error of transformers itself run in bf16 on the GPU, + 1e-3
(relative Frobenius norms over the whole [n, vocab] logits), and the same bound holds against
the CPU backend's float32 logits. The tiny models use head_dim 64 or 128 (what the CUDA
attention supports) and a sliding window of 16 that wraps many times.

Also: greedy generation on the GPU vs the CPU, Engine.from_config on both devices with the
same seed, a Mistral-7B-shaped model cut to 2 layers, and ModelConfig.preset (CPU only).
"""

from __future__ import annotations

import pytest
import torch

import mistral_cuda as mc
import tiny_models as tm
from gpu_helpers import (
    assert_within,
    cpu_engine,
    cuda_engine,
    rel,
    requires_cuda,
    transformers_gpu,
    transformers_logits,
)


SLACK = 1e-3  # absolute slack on top of 2 x transformers' own bf16 error
FROM_CONFIG_TOL = 0.1  # bf16 vs f32 of the same random model (no transformers peer; transformers
# bf16 itself is ~4e-2 off on the tiny models here); two different seeds are ~1.4 apart


# --------------------------------------------------------------------------------------
# Models and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_sw(tmp_path_factory) -> tm.TinyModel:
    """hidden 256, 4 heads of 64, 2 KV heads, 2 layers, vocab 512, sliding window 16."""
    cfg = tm.mistral_config(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=512,
        max_position_embeddings=1024,
        sliding_window=16,
    )
    return tm.make_hf_checkpoint(tmp_path_factory.mktemp("gpu_sw"), cfg, tm.seed_of("gpu_sw"))


@pytest.fixture(scope="module")
def gpu_full(tmp_path_factory) -> tm.TinyModel:
    """hidden 256, 4 heads of 128 (q wider than the model), 1 KV head, vocab 1000, full
    attention, rope theta 1e6."""
    cfg = tm.mistral_config(
        hidden_size=256,
        intermediate_size=640,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=128,
        vocab_size=1000,
        max_position_embeddings=1024,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    return tm.make_hf_checkpoint(tmp_path_factory.mktemp("gpu_full"), cfg, tm.seed_of("gpu_full"))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("block_size", [16, 3])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("which", ["gpu_sw", "gpu_full"])
def test_logits_match_transformers_and_cpu(which, chunk_size, block_size, request):
    """A 70-token prompt (4.4x the window of 16) whole, or 1 / 7 tokens per step."""
    tiny = request.getfixturevalue(which)
    ids = tiny.random_ids(70, tm.seed_of(f"gpu-logits-{which}"))
    ref = tiny.reference_logits(ids)
    hf_err = rel(transformers_logits(transformers_gpu(tiny.model), ids), ref)
    out = cuda_engine(tiny, block_size=block_size).logits(ids, chunk_size=chunk_size)
    what = f"{which} chunk={chunk_size} block={block_size}"
    assert_within(out, ref, hf_err, f"{what} vs transformers f32")
    cpu = cpu_engine(tiny, block_size=block_size).logits(ids, chunk_size=chunk_size)
    assert_within(out, cpu, hf_err, f"{what} vs CPU backend f32")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", ["float16", torch.bfloat16, "bfloat16"], ids=["f16-str", "bf16-torch", "bf16-str"])
def test_dtype_argument(gpu_sw, dtype):
    """dtype as a string or a torch dtype; float16 is held to transformers in float16."""
    ids = gpu_sw.random_ids(40, tm.seed_of("gpu-dtype"))
    ref = gpu_sw.reference_logits(ids)
    peer = torch.float16 if dtype == "float16" else torch.bfloat16
    hf_err = rel(transformers_logits(transformers_gpu(gpu_sw.model, peer), ids), ref)
    assert_within(cuda_engine(gpu_sw, dtype=dtype).logits(ids, chunk_size=9), ref, hf_err, f"dtype={dtype}")


@pytest.mark.cuda
@requires_cuda
def test_device_auto_picks_cuda(gpu_sw):
    engine = mc.Engine.from_pretrained(str(gpu_sw.path), device="auto", progress=False)
    assert str(engine.device).startswith("cuda"), f"device='auto' gave {engine.device!r} on a GPU machine"


# --------------------------------------------------------------------------------------
# Several sequences per step: prefill chunks and decode tokens mixed
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("block_size", [3, 16])
@pytest.mark.parametrize("which", ["gpu_sw", "gpu_full"])
def test_four_sequences_mixed_prefill_and_decode(which, block_size, request):
    """Four sequences (two joining later) share each step: chunked prefill entries beside
    decode entries, through model.step."""
    tiny = request.getfixturevalue(which)
    prompts = [tiny.random_ids(n, tm.seed_of(f"gpu-batch-{which}-{i}")) for i, n in enumerate([37, 11, 60, 25])]
    engine = cuda_engine(tiny, block_size=block_size)
    rows, _ = tm.run_interleaved(
        engine.model, prompts, tiny.vocab_size, seed=tm.seed_of(f"gpu-sched-{which}"), start_steps=[0, 0, 3, 7]
    )
    hf = transformers_gpu(tiny.model)
    for i, prompt in enumerate(prompts):
        ref = tiny.reference_logits(prompt)
        hf_err = rel(transformers_logits(hf, prompt), ref)
        assert_within(rows[i], ref, hf_err, f"{which} block={block_size} seq {i} (len {len(prompt)})")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("block_size", [3, 16])
def test_sliding_window_blocks_stay_bounded(gpu_sw, block_size):
    """Under a window of 16 a sequence never holds more than ceil(16 / B) + 1 blocks."""
    m = cuda_engine(gpu_sw, block_size=block_size).model
    ids = gpu_sw.random_ids(120, tm.seed_of("gpu-ring"))
    s = m.add_sequence()
    at = 0
    for k in [37, 1, 1, 20, 1, 40, 1, 1, 18]:
        m.step([(s, ids[at : at + k])])
        at += k
        assert m.blocks_in_use(s) <= tm.ring_bound(16, block_size), f"{m.blocks_in_use(s)} blocks after {at} tokens"
    m.free_sequence(s)


# --------------------------------------------------------------------------------------
# Greedy generation: GPU vs CPU
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("which", ["gpu_sw", "gpu_full"])
def test_greedy_generate_matches_cpu(which, request):
    """Four prompts generated together, 10 greedy tokens each. A GPU token must equal the
    CPU's wherever the CPU's top-2 logit margin exceeds 3 x the largest GPU-vs-CPU logit
    difference on that row (+1e-3; 2x would already rule out any other argmax); after a
    near-tie that went the other way the continuations differ, so the rest of that prompt is
    not compared. At least 3 tokens must have been compared."""
    tiny = request.getfixturevalue(which)
    prompts = [tiny.random_ids(n, tm.seed_of(f"gpu-greedy-{which}-{n}")) for n in (5, 23, 40, 61)]
    n_new = 10
    params = mc.SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    cpu, gpu = cpu_engine(tiny), cuda_engine(tiny)
    cpu_out, gpu_out = cpu.generate(prompts, params), gpu.generate(prompts, params)
    compared = 0
    for prompt, c, g in zip(prompts, cpu_out, gpu_out):
        assert len(g.token_ids) == n_new and len(c.token_ids) == n_new
        seq = prompt + list(c.token_ids)
        rows = slice(len(prompt) - 1, len(prompt) - 1 + n_new)  # the rows that predict each new token
        lc, lg = cpu.logits(seq)[rows], gpu.logits(seq)[rows]
        for i in range(n_new):
            assert int(lc[i].argmax()) == c.token_ids[i], "CPU greedy token is not the argmax of CPU logits"
            top2 = lc[i].topk(2).values
            margin = float(top2[0] - top2[1])
            noise = float((lg[i] - lc[i]).abs().max())
            if margin > 3 * noise + 1e-3:
                assert g.token_ids[i] == c.token_ids[i], (
                    f"{which} prompt len {len(prompt)} token {i}: GPU {g.token_ids[i]} vs CPU {c.token_ids[i]} "
                    f"with CPU top-2 margin {margin:.4g} (GPU-CPU logit difference {noise:.3g})"
                )
                compared += 1
            elif g.token_ids[i] != c.token_ids[i]:
                break  # a near tie went the other way; the rest is a different continuation
    assert compared >= 3, f"only {compared} of {len(prompts) * n_new} tokens had a clear margin: the test checked too little"


# --------------------------------------------------------------------------------------
# Engine.from_config and presets
# --------------------------------------------------------------------------------------


def small_config():
    """A small custom config built from a preset (the fields are writable)."""
    cfg = mc.ModelConfig.preset("mistral-7b-v0.1")
    cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim = 256, 2, 4, 2, 64
    cfg.hidden_dim, cfg.vocab_size, cfg.max_seq_len = 512, 1000, 512
    cfg.sliding_window = 16
    cfg.rope_theta = 1e6
    return cfg


@pytest.mark.cuda
@requires_cuda
def test_from_config_same_seed_same_model_on_cpu_and_gpu():
    """Weights come from a counter-based hash: CPU f32 and GPU bf16 engines built with the same
    seed are one model up to bf16 rounding; another seed is another model."""
    cfg = small_config()
    cpu = mc.Engine.from_config(cfg, device="cpu", seed=3)
    gpu = mc.Engine.from_config(cfg, device="cuda", seed=3)
    assert gpu.config.dim == 256 and gpu.config.n_layers == 2
    ids = tm.random_ids(40, cfg.vocab_size, tm.seed_of("from-config-ids"))
    lc = cpu.logits(ids)
    assert torch.isfinite(lc).all() and float(lc.std()) > 0, "from_config CPU logits are degenerate"
    other = mc.Engine.from_config(cfg, device="cpu", seed=4).logits(ids)
    assert rel(other, lc) > 0.5, "seeds 3 and 4 give (nearly) the same model"
    for chunk_size in (None, 7, 1):
        lg = gpu.logits(ids, chunk_size=chunk_size)
        assert lg.dtype == torch.float32 and tuple(lg.shape) == (40, cfg.vocab_size)
        assert torch.isfinite(lg).all(), f"chunk={chunk_size}: NaN/inf logits"
        err = rel(lg, lc)
        assert err <= FROM_CONFIG_TOL, f"chunk={chunk_size}: GPU bf16 vs CPU f32 relative error {err:.3g} > {FROM_CONFIG_TOL}"


@pytest.mark.cuda
@requires_cuda
def test_mistral_7b_shape_two_layers_decodes_on_gpu():
    """Mistral-7B shapes (dim 4096, 32/8 heads of 128, hidden 14336, vocab 32000, window 4096)
    with 2 layers: two sequences prefill, then decode together; logits finite and not flat."""
    cfg = mc.ModelConfig.preset("mistral-7b-v0.1")
    cfg.n_layers = 2
    engine = mc.Engine.from_config(cfg, device="cuda", dtype="bfloat16", seed=0, num_blocks=256)
    m = engine.model
    a, b = m.add_sequence(), m.add_sequence()
    pa, pb = tm.random_ids(20, cfg.vocab_size, 1), tm.random_ids(33, cfg.vocab_size, 2)
    la, lb = m.step([(a, pa), (b, pb)])
    for _ in range(4):
        for x in (la, lb):
            assert tuple(x.shape) == (cfg.vocab_size,) and x.dtype == torch.float32
            assert torch.isfinite(x).all(), "NaN/inf logits"
            assert float(x.std()) > 0, "flat logits"
        la, lb = m.step([(a, [int(la.argmax())]), (b, [int(lb.argmax())])])
    assert torch.isfinite(la).all() and torch.isfinite(lb).all()
    assert m.blocks_in_use(b) >= 3  # 37 tokens in blocks of 16
    m.free_sequence(a)
    m.free_sequence(b)


@pytest.mark.cuda
@requires_cuda
def test_mistral_7b_shape_two_layers_gpu_vs_cpu():
    """The same 2-layer Mistral-7B-shaped model (same seed) on both devices: real widths
    (4096 / 14336 / vocab 32000) through every GPU kernel, against the CPU in float32."""
    cfg = mc.ModelConfig.preset("mistral-7b-v0.1")
    cfg.n_layers = 2
    ids = tm.random_ids(24, cfg.vocab_size, tm.seed_of("7b-shape-ids"))
    lc = mc.Engine.from_config(cfg, device="cpu", seed=5, num_blocks=64).logits(ids)
    gpu = mc.Engine.from_config(cfg, device="cuda", dtype="bfloat16", seed=5, num_blocks=64)
    for chunk_size in (None, 5):
        lg = gpu.logits(ids, chunk_size=chunk_size)
        assert torch.isfinite(lg).all(), f"chunk={chunk_size}: NaN/inf logits"
        err = rel(lg, lc)
        assert err <= FROM_CONFIG_TOL, f"chunk={chunk_size}: GPU bf16 vs CPU f32 relative error {err:.3g} > {FROM_CONFIG_TOL}"


PRESETS = {
    "mistral-7b-v0.1": dict(vocab_size=32000, rope_theta=10000.0, sliding_window=4096, n_experts=0, n_experts_per_tok=0),
    "mistral-7b-v0.3": dict(vocab_size=32768, rope_theta=1e6, sliding_window=None, n_experts=0, n_experts_per_tok=0),
    "mixtral-8x7b": dict(vocab_size=32000, rope_theta=1e6, sliding_window=None, n_experts=8, n_experts_per_tok=2),
}
COMMON = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, norm_eps=1e-5, max_seq_len=32768)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_fields(name):
    """The published shapes (Hugging Face config.json of each model)."""
    cfg = mc.ModelConfig.preset(name)
    assert isinstance(cfg, mc.ModelConfig)
    for field, want in {**COMMON, **PRESETS[name]}.items():
        got = getattr(cfg, field)
        if isinstance(want, float):
            assert got == pytest.approx(want), f"{name}.{field} = {got!r}, expected {want!r}"
        else:
            assert got == want, f"{name}.{field} = {got!r}, expected {want!r}"


def test_preset_is_a_fresh_writable_copy():
    cfg = mc.ModelConfig.preset("mistral-7b-v0.1")
    cfg.n_layers, cfg.sliding_window = 2, None
    assert cfg.n_layers == 2 and cfg.sliding_window is None
    again = mc.ModelConfig.preset("mistral-7b-v0.1")
    assert again.n_layers == 32 and again.sliding_window == 4096


def test_preset_unknown_name_raises():
    with pytest.raises(ValueError):  # mc.InvalidRequestError is a ValueError
        mc.ModelConfig.preset("mistral-13b")
