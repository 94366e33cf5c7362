"""engine.logits / model.step against transformers on tiny random Mistral & Mixtral models.

Every comparison uses tiny_models.assert_logits_close: float32, no NaN/inf, relative
error <= 1e-5 and max abs error <= 1e-5 * max |reference|."""

from __future__ import annotations

import json

import pytest
import torch

import mistral_cuda as mc
import tiny_models as tm
from tiny_models import assert_logits_close


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _expected_config(hf):
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    moe = hf.model_type == "mixtral"
    return dict(
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        head_dim=head_dim,
        hidden_dim=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        sliding_window=hf.sliding_window,
        max_seq_len=hf.max_position_embeddings,
        n_experts=hf.num_local_experts if moe else 0,
        n_experts_per_tok=hf.num_experts_per_tok if moe else 0,
    )


@pytest.mark.parametrize("which", ["mistral_sw", "mistral_full", "mixtral_sw"])
def test_config_matches_hf_config(which, request, load_engine):
    """engine.config mirrors config.json; sliding_window is None for full attention and
    rope_theta comes from rope_parameters (non-default values in these fixtures)."""
    tiny = request.getfixturevalue(which)
    cfg = load_engine(tiny).config
    assert isinstance(cfg, mc.ModelConfig)
    for field, want in _expected_config(tiny.config).items():
        assert getattr(cfg, field) == want, f"config.{field} = {getattr(cfg, field)!r}, expected {want!r}"
    assert cfg.rope_theta == pytest.approx(tiny.config.rope_parameters["rope_theta"])
    assert cfg.norm_eps == pytest.approx(tiny.config.rms_norm_eps)


def test_config_head_dim_null_in_config_json(tmp_path, load_engine):
    """Mixtral's config.json is written with "head_dim": null; head_dim is then dim / n_heads."""
    tiny = tm.make_hf_checkpoint(tmp_path, tm.mixtral_config(), tm.seed_of("head_dim_null"))
    assert json.loads((tmp_path / "config.json").read_text()).get("head_dim", None) is None
    assert load_engine(tiny).config.head_dim == 64 // 4


# --------------------------------------------------------------------------------------
# Single sequences through engine.logits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("which", ["mistral_sw", "mistral_full"])
def test_logits_match_transformers_for_chunk_sizes(which, chunk_size, request, load_engine):
    """A 37-token prompt (4.6x the window of 8) fed 1, 5 or all tokens per step."""
    tiny = request.getfixturevalue(which)
    ids = tiny.random_ids(37, tm.seed_of(f"chunks-{which}-{chunk_size}"))
    out = load_engine(tiny).logits(ids, chunk_size=chunk_size)
    assert_logits_close(out, tiny.reference_logits(ids), f"{which} chunk_size={chunk_size}")


def test_logits_default_chunk_is_whole_prompt(mistral_sw, load_engine):
    """engine.logits(ids) without chunk_size equals chunk_size=None and transformers."""
    ids = mistral_sw.random_ids(30, tm.seed_of("default-chunk"))
    engine = load_engine(mistral_sw)
    out = engine.logits(ids)
    assert_logits_close(out, mistral_sw.reference_logits(ids), "default chunk")
    assert_logits_close(out, engine.logits(ids, chunk_size=None), "default vs None")


def test_single_token_prompt(mistral_sw, load_engine):
    """The smallest request: one token, shape [1, vocab]."""
    ids = mistral_sw.random_ids(1, tm.seed_of("one-token"))
    assert_logits_close(load_engine(mistral_sw).logits(ids), mistral_sw.reference_logits(ids), "1 token")


@pytest.mark.parametrize("block_size", [1, 3, 7, 16])
@pytest.mark.parametrize("which", ["mistral_sw", "mistral_full"])
def test_block_sizes(which, block_size, request, load_engine):
    """KV block sizes that do / don't divide the window, including 1 token per block."""
    tiny = request.getfixturevalue(which)
    ids = tiny.random_ids(45, tm.seed_of(f"block-{which}-{block_size}"))
    engine = load_engine(tiny, block_size=block_size)
    ref = tiny.reference_logits(ids)
    for chunk_size in (7, None):
        out = engine.logits(ids, chunk_size=chunk_size)
        assert_logits_close(out, ref, f"{which} block_size={block_size} chunk_size={chunk_size}")


@pytest.mark.parametrize("block_size", [1, 2, 3, 16])
@pytest.mark.parametrize("chunk_size", [None, 20])
def test_prefill_chunk_much_longer_than_window(mistral_sw, block_size, chunk_size, load_engine):
    """The rolling-buffer trap: a 96-token prefill (12x the window of 8) in one chunk (or
    chunks of 20) while the ring only holds ceil(8/block_size)+1 blocks. Early tokens of
    the chunk must still attend to their own window, not to what later tokens overwrote."""
    ids = mistral_sw.random_ids(96, tm.seed_of(f"trap-{block_size}-{chunk_size}"))
    out = load_engine(mistral_sw, block_size=block_size).logits(ids, chunk_size=chunk_size)
    assert_logits_close(out, mistral_sw.reference_logits(ids), f"block_size={block_size} chunk={chunk_size}")


def test_sliding_window_wider_than_block_and_prompt(tmp_path, load_engine):
    """A window (W=40) larger than the prompt behaves like full attention; then past it."""
    tiny = tm.make_hf_checkpoint(tmp_path, tm.mistral_config(sliding_window=40), tm.seed_of("w40"))
    ids = tiny.random_ids(100, tm.seed_of("w40-ids"))
    engine = load_engine(tiny, block_size=16)
    assert_logits_close(engine.logits(ids[:30]), tiny.reference_logits(ids[:30]), "W=40, 30 tokens")
    assert_logits_close(engine.logits(ids, chunk_size=9), tiny.reference_logits(ids), "W=40, 100 tokens")


@pytest.mark.parametrize(
    "n_heads,n_kv_heads",
    [(4, 4), (4, 2), (8, 2), (4, 1), (8, 1)],
    ids=["MHA-group1", "GQA-group2", "GQA-group4", "MQA-4heads", "MQA-8heads"],
)
def test_grouped_query_attention(n_heads, n_kv_heads, tmp_path, load_engine):
    """KV head sharing for query groups of 1, 2, 4 and multi-query attention."""
    cfg = tm.mistral_config(num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=64 // n_heads)
    tiny = tm.make_hf_checkpoint(tmp_path, cfg, tm.seed_of(f"gqa-{n_heads}-{n_kv_heads}"))
    ids = tiny.random_ids(30, tm.seed_of(f"gqa-ids-{n_heads}-{n_kv_heads}"))
    engine = load_engine(tiny, block_size=4)
    ref = tiny.reference_logits(ids)
    for chunk_size in (1, None):
        assert_logits_close(engine.logits(ids, chunk_size=chunk_size), ref, f"chunk_size={chunk_size}")


@pytest.mark.parametrize("head_dim", [32, 8])
def test_head_dim_differs_from_dim_over_heads(head_dim, tmp_path, load_engine):
    """head_dim is not dim / n_heads (q projection wider or narrower than the model)."""
    cfg = tm.mistral_config(num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)
    tiny = tm.make_hf_checkpoint(tmp_path, cfg, tm.seed_of(f"head-dim-{head_dim}"))
    engine = load_engine(tiny)
    assert engine.config.head_dim == head_dim
    ids = tiny.random_ids(30, tm.seed_of(f"head-dim-ids-{head_dim}"))
    ref = tiny.reference_logits(ids)
    for chunk_size in (3, None):
        assert_logits_close(engine.logits(ids, chunk_size=chunk_size), ref, f"head_dim={head_dim} chunk={chunk_size}")


@pytest.mark.parametrize("n_experts,window", [(4, 8), (8, None), (8, 8)])
def test_mixtral_top2(n_experts, window, tmp_path, load_engine):
    """Mixture of experts with top-2 routing (softmax, top-k, renormalise)."""
    cfg = tm.mixtral_config(num_local_experts=n_experts, num_experts_per_tok=2, sliding_window=window)
    tiny = tm.make_hf_checkpoint(tmp_path, cfg, tm.seed_of(f"moe-{n_experts}-{window}"))
    engine = load_engine(tiny, block_size=4)
    assert (engine.config.n_experts, engine.config.n_experts_per_tok) == (n_experts, 2)
    ids = tiny.random_ids(33, tm.seed_of(f"moe-ids-{n_experts}-{window}"))
    ref = tiny.reference_logits(ids)
    for chunk_size in (1, 7, None):
        assert_logits_close(engine.logits(ids, chunk_size=chunk_size), ref, f"E={n_experts} chunk={chunk_size}")


# --------------------------------------------------------------------------------------
# Checkpoint layouts and dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_sharded_hf_checkpoint(kind, tmp_path, load_engine):
    """model-0000X-of-0000N.safetensors + model.safetensors.index.json."""
    cfg = tm.mistral_config() if kind == "mistral" else tm.mixtral_config()
    tiny = tm.make_hf_checkpoint(tmp_path, cfg, tm.seed_of(f"sharded-{kind}"), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 2
    ids = tiny.random_ids(40, tm.seed_of(f"sharded-ids-{kind}"))
    assert_logits_close(load_engine(tiny).logits(ids, chunk_size=6), tiny.reference_logits(ids), f"sharded {kind}")


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("mistral", {}),
        ("mistral", {"sliding_window": None, "num_key_value_heads": 1}),
        ("mistral", {"head_dim": 32}),
        ("mixtral", {}),
    ],
    ids=["dense-sw", "dense-full-mqa", "dense-head_dim32", "moe"],
)
def test_consolidated_layout_matches_hf(kind, overrides, tmp_path, load_engine):
    """The same weights in Mistral's consolidated layout (params.json, un-permuted wq/wk,
    interleaved-pair RoPE) give the same logits as the HF layout and transformers."""
    cfg = (tm.mistral_config if kind == "mistral" else tm.mixtral_config)(**overrides)
    tiny = tm.make_hf_checkpoint(tmp_path / "hf", cfg, tm.seed_of(f"consolidated-{kind}-{overrides}"))
    cons_dir = tm.write_consolidated(tiny.path, tmp_path / "consolidated", cfg)
    cons = load_engine(cons_dir, block_size=4)
    hf = load_engine(tiny, block_size=4)
    for field, want in _expected_config(cfg).items():
        assert getattr(cons.config, field) == want, f"consolidated config.{field}"
    assert cons.config.rope_theta == pytest.approx(cfg.rope_parameters["rope_theta"])
    ids = tiny.random_ids(35, tm.seed_of(f"consolidated-ids-{kind}-{overrides}"))
    ref = tiny.reference_logits(ids)
    for chunk_size in (1, None):
        out = cons.logits(ids, chunk_size=chunk_size)
        assert_logits_close(out, ref, f"consolidated vs transformers chunk={chunk_size}")
        assert_logits_close(out, hf.logits(ids, chunk_size=chunk_size), f"consolidated vs HF layout chunk={chunk_size}")


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_bf16_checkpoint(kind, tmp_path, load_engine):
    """bfloat16 weights on disk; reference = transformers in float32 on the same
    (bf16-rounded) weights."""
    cfg = tm.mistral_config() if kind == "mistral" else tm.mixtral_config()
    tiny = tm.make_bf16_checkpoint(tmp_path, cfg, tm.seed_of(f"bf16-{kind}"))
    header, _ = tm.read_raw_safetensors(tmp_path / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    ids = tiny.random_ids(30, tm.seed_of(f"bf16-ids-{kind}"))
    engine = load_engine(tiny)
    ref = tiny.reference_logits(ids)
    for chunk_size in (4, None):
        assert_logits_close(engine.logits(ids, chunk_size=chunk_size), ref, f"bf16 {kind} chunk={chunk_size}")


def test_f16_checkpoint(tmp_path, load_engine):
    """float16 weights on disk (subnormals included: small init values underflow in f16)."""
    cfg = tm.mistral_config()
    tiny = tm.make_bf16_checkpoint(tmp_path, cfg, tm.seed_of("f16"), dtype=torch.float16)
    header, _ = tm.read_raw_safetensors(tmp_path / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    ids = tiny.random_ids(30, tm.seed_of("f16-ids"))
    assert_logits_close(load_engine(tiny).logits(ids, chunk_size=7), tiny.reference_logits(ids), "f16")


def test_bf16_consolidated_checkpoint(tmp_path, load_engine):
    """bf16 weights in the consolidated layout."""
    cfg = tm.mistral_config()
    tiny = tm.make_bf16_checkpoint(tmp_path / "hf", cfg, tm.seed_of("bf16-consolidated"))
    cons_dir = tm.write_consolidated(tiny.path, tmp_path / "cons", cfg)
    ids = tiny.random_ids(30, tm.seed_of("bf16-consolidated-ids"))
    assert_logits_close(load_engine(cons_dir).logits(ids), tiny.reference_logits(ids), "bf16 consolidated")


# --------------------------------------------------------------------------------------
# Batched stepping through the runner
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mistral_sw", "mistral_full", "mixtral_sw"])
def test_four_sequences_stepped_together_match_alone(which, request, load_engine):
    """Four sequences of different lengths (some joining later) stepped in shared
    batches, mixing prefill chunks and decode tokens, give the same logits as each
    sequence alone and as transformers."""
    tiny = request.getfixturevalue(which)
    lengths = [37, 11, 60, 25]
    prompts = [tiny.random_ids(n, tm.seed_of(f"batch-{which}-{i}")) for i, n in enumerate(lengths)]
    engine = load_engine(tiny, block_size=4)
    rows, positions = tm.run_interleaved(engine.model, prompts, tiny.vocab_size, seed=tm.seed_of(f"sched-{which}"), start_steps=[0, 0, 3, 7])
    for i, prompt in enumerate(prompts):
        assert positions[i] == list(range(len(prompt)))
        ref = tiny.reference_logits(prompt)
        assert_logits_close(rows[i], ref, f"{which} seq {i} batched vs transformers")
        assert_logits_close(rows[i], engine.logits(prompt), f"{which} seq {i} batched vs alone")


@pytest.mark.parametrize("which", ["mistral_sw", "mixtral_sw"])
def test_step_returns_last_token_logits_by_default(which, request, load_engine):
    """all_logits=False: one [vocab] vector per entry, the logits of the entry's last token."""
    tiny = request.getfixturevalue(which)
    prompts = [tiny.random_ids(n, tm.seed_of(f"last-{which}-{n}")) for n in (29, 13, 41)]
    engine = load_engine(tiny, block_size=3)
    rows, positions = tm.run_interleaved(engine.model, prompts, tiny.vocab_size, seed=tm.seed_of(f"last-sched-{which}"), all_logits=False)
    for i, prompt in enumerate(prompts):
        ref = tiny.reference_logits(prompt)[positions[i]]
        assert_logits_close(rows[i], ref, f"{which} seq {i} last-token logits")


def test_step_default_all_logits_is_false(mistral_sw, load_engine):
    """m.step(entries) without all_logits returns [vocab] vectors."""
    m = load_engine(mistral_sw).model
    s = m.add_sequence()
    ids = mistral_sw.random_ids(6, tm.seed_of("default-all-logits"))
    (out,) = m.step([(s, ids)])
    assert tuple(out.shape) == (mistral_sw.vocab_size,)
    assert_logits_close(out, mistral_sw.reference_logits(ids)[-1], "default all_logits")
    m.free_sequence(s)


def test_add_sequence_returns_distinct_ids(mistral_sw, load_engine):
    """Live sequences get distinct integer ids."""
    m = load_engine(mistral_sw).model
    ids = [m.add_sequence() for _ in range(5)]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == 5
    for i in ids:
        m.free_sequence(i)


def test_engine_logits_does_not_disturb_live_sequences(mistral_sw, load_engine):
    """engine.logits uses its own fresh sequence: a sequence in flight on engine.model
    continues correctly after engine.logits calls."""
    engine = load_engine(mistral_sw, block_size=4)
    m = engine.model
    ids = mistral_sw.random_ids(40, tm.seed_of("in-flight"))
    other = mistral_sw.random_ids(25, tm.seed_of("in-flight-other"))
    s = m.add_sequence()
    first = m.step([(s, ids[:20])], all_logits=True)[0]
    assert_logits_close(engine.logits(other), mistral_sw.reference_logits(other), "interleaved engine.logits")
    second = m.step([(s, ids[20:])], all_logits=True)[0]
    m.free_sequence(s)
    assert_logits_close(torch.cat([first, second]), mistral_sw.reference_logits(ids), "sequence in flight")
