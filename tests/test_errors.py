"""Bad checkpoints and bad requests raise the documented Python exceptions, with a
message naming the problem -- never a crash."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import mistral_cuda as mc
import tiny_models as tm

# --------------------------------------------------------------------------------------
# Exception hierarchy
# --------------------------------------------------------------------------------------


def test_exception_hierarchy():
    assert issubclass(mc.Error, Exception)
    assert issubclass(mc.CheckpointError, mc.Error) and issubclass(mc.CheckpointError, ValueError)
    assert issubclass(mc.InvalidRequestError, mc.Error) and issubclass(mc.InvalidRequestError, ValueError)
    assert issubclass(mc.CacheFullError, mc.Error) and issubclass(mc.CacheFullError, RuntimeError)


# --------------------------------------------------------------------------------------
# Helpers to make broken checkpoint directories from a good one
# --------------------------------------------------------------------------------------


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def _write_state_dict(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _load(path, **kw):
    return mc.Engine.from_pretrained(str(path), device="cpu", **kw)


def _rx(pattern):
    return re.compile(pattern, re.IGNORECASE)


# --------------------------------------------------------------------------------------
# Corrupt safetensors files (hand-written, see tiny_models.CORRUPTIONS)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(tm.CORRUPTIONS))
def test_corrupt_safetensors_file(name, mistral_sw, tmp_path):
    """Truncation, bad header length, invalid JSON, bad/overlapping offsets, size not
    matching dtype*shape, unknown dtypes -> CheckpointError naming the problem."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(mistral_sw.path / "config.json", ckpt / "config.json")
    pattern = tm.CORRUPTIONS[name](mistral_sw.path / "model.safetensors", ckpt / "model.safetensors")
    with pytest.raises(mc.CheckpointError, match=_rx(pattern)):
        _load(ckpt)


@pytest.mark.parametrize("name", ["truncated-in-data", "overlapping-offsets", "unknown-dtype-I4"])
def test_corrupt_shard_of_sharded_checkpoint(name, tmp_path):
    """A broken shard in a sharded HF checkpoint is reported too."""
    tiny = tm.make_hf_checkpoint(tmp_path / "good", tm.mistral_config(), tm.seed_of("bad-shard"), max_shard_size="100KB")
    bad = _copy_checkpoint(tiny.path, tmp_path / "bad")
    shard = sorted(bad.glob("model-*-of-*.safetensors"))[1]
    pattern = tm.CORRUPTIONS[name](tiny.path / shard.name, shard)
    with pytest.raises(mc.CheckpointError, match=_rx(pattern)):
        _load(bad)


@pytest.mark.parametrize("name", ["truncated-in-data", "invalid-json", "size-not-matching-dtype"])
def test_corrupt_consolidated_file(name, mistral_sw, tmp_path):
    """Same checks for consolidated.safetensors."""
    good = tm.write_consolidated(mistral_sw.path, tmp_path / "good", mistral_sw.config)
    bad = _copy_checkpoint(good, tmp_path / "bad")
    pattern = tm.CORRUPTIONS[name](good / "consolidated.safetensors", bad / "consolidated.safetensors")
    with pytest.raises(mc.CheckpointError, match=_rx(pattern)):
        _load(bad)


# --------------------------------------------------------------------------------------
# Well-formed files with the wrong content
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"],
)
def test_missing_tensor(tensor, mistral_sw, tmp_path):
    """A tensor the model needs is absent -> CheckpointError naming it."""
    ckpt = _copy_checkpoint(mistral_sw.path, tmp_path / "ckpt")
    tensors = tm.read_checkpoint_tensors(ckpt)
    del tensors[tensor]
    _write_state_dict(ckpt / "model.safetensors", tensors)
    key = tensor.split(".")[-2]  # k_proj / norm / lm_head / up_proj
    with pytest.raises(mc.CheckpointError, match=_rx(rf"{re.escape(key)}|missing")):
        _load(ckpt)


def test_missing_expert_tensor(tmp_path):
    """Mixtral: one expert's w2 is absent."""
    tiny = tm.make_hf_checkpoint(tmp_path / "good", tm.mixtral_config(), tm.seed_of("missing-expert"))
    ckpt = _copy_checkpoint(tiny.path, tmp_path / "bad")
    tensors = tm.read_checkpoint_tensors(ckpt)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    _write_state_dict(ckpt / "model.safetensors", tensors)
    with pytest.raises(mc.CheckpointError, match=_rx(r"experts|w2|missing")):
        _load(ckpt)


@pytest.mark.parametrize(
    "tensor,shape",
    [
        ("model.layers.0.self_attn.q_proj.weight", (64, 48)),
        ("model.layers.1.self_attn.v_proj.weight", (48, 64)),
        ("model.embed_tokens.weight", (256, 32)),
        ("model.layers.1.post_attention_layernorm.weight", (63,)),
        ("model.layers.0.mlp.down_proj.weight", (128, 64)),  # transposed
    ],
)
def test_misshapen_tensor(tensor, shape, mistral_sw, tmp_path):
    """A tensor of the wrong shape -> CheckpointError naming the tensor or 'shape'."""
    ckpt = _copy_checkpoint(mistral_sw.path, tmp_path / "ckpt")
    tensors = tm.read_checkpoint_tensors(ckpt)
    tensors[tensor] = torch.randn(*shape)
    _write_state_dict(ckpt / "model.safetensors", tensors)
    key = tensor.split(".")[-2]
    with pytest.raises(mc.CheckpointError, match=_rx(rf"{re.escape(key)}|shape")):
        _load(ckpt)


def test_integer_weight_dtype(mistral_sw, tmp_path):
    """An int32 weight is not a valid model weight -> CheckpointError about the dtype."""
    ckpt = _copy_checkpoint(mistral_sw.path, tmp_path / "ckpt")
    tensors = tm.read_checkpoint_tensors(ckpt)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = torch.randint(-3, 3, tuple(tensors[name].shape), dtype=torch.int32)
    _write_state_dict(ckpt / "model.safetensors", tensors)
    with pytest.raises(mc.CheckpointError, match=_rx(r"dtype|I32|int|o_proj")):
        _load(ckpt)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_hidden_layers"])
def test_config_missing_required_field(field, mistral_sw, tmp_path):
    ckpt = _copy_checkpoint(mistral_sw.path, tmp_path / "ckpt")
    _edit_config(ckpt, lambda c: c.pop(field))
    with pytest.raises(mc.CheckpointError, match=_rx(field)):
        _load(ckpt)


def test_config_invalid_json(mistral_sw, tmp_path):
    ckpt = _copy_checkpoint(mistral_sw.path, tmp_path / "ckpt")
    (ckpt / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": ')
    with pytest.raises(mc.CheckpointError, match=_rx(r"config|json")):
        _load(ckpt)


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("num_key_value_heads", 1, r"k_proj|v_proj|shape|key_value|kv"),
        ("num_attention_heads", 8, r"q_proj|o_proj|shape|heads"),
        ("vocab_size", 300, r"vocab|embed|lm_head|shape"),
        ("intermediate_size", 96, r"intermediate|gate_proj|up_proj|down_proj|shape"),
        ("num_hidden_layers", 3, r"layers\.2|missing|layer"),
        ("num_key_value_heads", 3, r"heads|divis|key_value|kv|shape"),
    ],
)
def test_config_inconsistent_with_weights(field, value, pattern, mistral_sw, tmp_path):
    """config.json disagreeing with the tensors -> CheckpointError naming the mismatch."""
    ckpt = _copy_checkpoint(mistral_sw.path, tmp_path / "ckpt")
    _edit_config(ckpt, lambda c: c.__setitem__(field, value))
    with pytest.raises(mc.CheckpointError, match=_rx(pattern)):
        _load(ckpt)


def test_params_json_missing_field(mistral_sw, tmp_path):
    """Consolidated layout: params.json without 'dim'."""
    ckpt = tm.write_consolidated(mistral_sw.path, tmp_path / "cons", mistral_sw.config)
    params = json.loads((ckpt / "params.json").read_text())
    del params["dim"]
    (ckpt / "params.json").write_text(json.dumps(params))
    with pytest.raises(mc.CheckpointError, match=_rx(r"\bdim\b")):
        _load(ckpt)


def test_params_json_inconsistent_with_weights(mistral_sw, tmp_path):
    """Consolidated layout: n_kv_heads disagreeing with wk."""
    ckpt = tm.write_consolidated(mistral_sw.path, tmp_path / "cons", mistral_sw.config)
    params = json.loads((ckpt / "params.json").read_text())
    params["n_kv_heads"] = 1
    (ckpt / "params.json").write_text(json.dumps(params))
    with pytest.raises(mc.CheckpointError, match=_rx(r"wk|wv|shape|kv")):
        _load(ckpt)


# --------------------------------------------------------------------------------------
# Missing files
# --------------------------------------------------------------------------------------


def test_nonexistent_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "does-not-exist")


def test_model_dir_without_weights(mistral_sw, tmp_path):
    """config.json but no safetensors file."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(mistral_sw.path / "config.json", ckpt / "config.json")
    with pytest.raises(FileNotFoundError):
        _load(ckpt)


def test_empty_model_dir(tmp_path):
    """Neither config.json nor params.json."""
    with pytest.raises(FileNotFoundError):
        _load(tmp_path)


def test_sharded_checkpoint_missing_shard(tmp_path):
    """The index names a shard file that is not there."""
    tiny = tm.make_hf_checkpoint(tmp_path / "ckpt", tm.mistral_config(), tm.seed_of("missing-shard"), max_shard_size="100KB")
    sorted(tiny.path.glob("model-*-of-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError):
        _load(tiny.path)


# --------------------------------------------------------------------------------------
# Bad requests
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sw_engine(mistral_sw):
    return _load(mistral_sw.path, block_size=4)


def test_empty_token_list(sw_engine):
    m = sw_engine.model
    s = m.add_sequence()
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"empty|token")):
        m.step([(s, [])])
    m.free_sequence(s)
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"empty|token")):
        sw_engine.logits([])


@pytest.mark.parametrize("bad", [256, 257, 10**6, -1, -256])
def test_token_id_out_of_range(bad, sw_engine):
    """Token ids must be in [0, vocab_size)."""
    m = sw_engine.model
    s = m.add_sequence()
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"vocab|token|range")):
        m.step([(s, [3, bad, 5])])
    m.free_sequence(s)
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"vocab|token|range")):
        sw_engine.logits([1, 2, bad])


def test_unknown_sequence_id(sw_engine):
    m = sw_engine.model
    s = m.add_sequence()
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"sequence")):
        m.step([(s + 1000, [1, 2])])
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"sequence")):
        m.step([(-1, [1])])
    m.free_sequence(s)


def test_sequence_used_after_free(sw_engine):
    m = sw_engine.model
    s = m.add_sequence()
    m.step([(s, [1, 2, 3])])
    m.free_sequence(s)
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"sequence")):
        m.step([(s, [4])])
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"sequence")):
        m.free_sequence(s)  # double free
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"sequence")):
        m.blocks_in_use(s)


def test_same_sequence_twice_in_one_step(sw_engine):
    m = sw_engine.model
    s = m.add_sequence()
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"sequence|duplicate|twice|once")):
        m.step([(s, [1, 2]), (s, [3])])
    m.free_sequence(s)


def test_invalid_request_has_no_effect(mistral_sw, sw_engine):
    """A rejected step (bad entry anywhere in the batch) leaves every sequence as it was:
    the sequences continue and match transformers."""
    m = sw_engine.model
    ids = mistral_sw.random_ids(30, tm.seed_of("no-effect"))
    other = mistral_sw.random_ids(12, tm.seed_of("no-effect-other"))
    s, t = m.add_sequence(), m.add_sequence()
    rows = [m.step([(s, ids[:10])], all_logits=True)[0]]
    t_rows = [m.step([(t, other[:6])], all_logits=True)[0]]
    for bad_batch in (
        [(s, ids[10:15]), (t, [])],
        [(s, ids[10:15]), (t, [256])],
        [(t, other[6:8]), (s, [-1])],
        [(s, ids[10:15]), (t + s + 1000, [1])],
        [(s, ids[10:15]), (t, [1]), (s, [2])],
    ):
        with pytest.raises(mc.InvalidRequestError):
            m.step(bad_batch, all_logits=True)
    out = m.step([(s, ids[10:]), (t, other[6:])], all_logits=True)
    rows.append(out[0])
    t_rows.append(out[1])
    m.free_sequence(s)
    m.free_sequence(t)
    tm.assert_logits_close(torch.cat(rows), mistral_sw.reference_logits(ids), "s after rejected steps")
    tm.assert_logits_close(torch.cat(t_rows), mistral_sw.reference_logits(other), "t after rejected steps")


def test_position_past_max_seq_len(mistral_short):
    """Full-attention model with max_position_embeddings=32: 32 tokens are fine, the
    33rd is an InvalidRequestError (whether it arrives alone or inside a chunk), and the
    sequence is left intact."""
    engine = _load(mistral_short.path, block_size=4)
    assert engine.config.max_seq_len == 32 and engine.config.sliding_window is None
    m = engine.model
    ids = mistral_short.random_ids(40, tm.seed_of("max-seq-len"))
    s = m.add_sequence()
    rows = [m.step([(s, ids[:30])], all_logits=True)[0]]
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"max_seq_len|position|length|context")):
        m.step([(s, ids[30:35])])
    rows.append(m.step([(s, ids[30:32])], all_logits=True)[0])
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"max_seq_len|position|length|context")):
        m.step([(s, [ids[32]])])
    m.free_sequence(s)
    tm.assert_logits_close(torch.cat(rows), mistral_short.reference_logits(ids[:32]), "up to max_seq_len")
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"max_seq_len|position|length|context")):
        engine.logits(ids)
    with pytest.raises(mc.InvalidRequestError, match=_rx(r"max_seq_len|position|length|context")):
        engine.logits(ids, chunk_size=5)


def test_cache_exhaustion_error(mistral_full):
    """Running out of KV blocks is a CacheFullError (a RuntimeError), not a crash."""
    engine = _load(mistral_full.path, block_size=4, num_blocks=2)
    m = engine.model
    ids = mistral_full.random_ids(9, tm.seed_of("exhaust"))
    s = m.add_sequence()
    m.step([(s, ids[:8])])
    with pytest.raises(mc.CacheFullError, match=_rx(r"block|cache|full|memory")):
        m.step([(s, ids[8:])])
    t = m.add_sequence()
    with pytest.raises(mc.CacheFullError, match=_rx(r"block|cache|full|memory")):
        m.step([(t, ids[:1])])
    m.free_sequence(s)
    (out,) = m.step([(t, ids[:1])])
    tm.assert_logits_close(out, mistral_full.reference_logits(ids[:1])[0], "after freeing")
    m.free_sequence(t)


@pytest.mark.parametrize("kw", [{"block_size": 0}, {"block_size": -4}, {"num_blocks": -1}])
def test_invalid_engine_arguments(kw, mistral_sw):
    """Nonsensical cache geometry is rejected with a ValueError naming the argument."""
    key = next(iter(kw))
    with pytest.raises(ValueError, match=_rx(key)):
        _load(mistral_sw.path, **kw)
