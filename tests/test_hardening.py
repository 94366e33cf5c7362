"""Crafted checkpoints and configs (as an attacker would write them) give a typed exception,
never a crash, a wrapped size or an out-of-memory kill; generation's cleanup survives any
exception; weights can be copied out of the file (mmap=False).

Each test reproduces one defect of issue 9 and, after the error, checks that the process is
still sound: a good checkpoint loads and reproduces transformers' logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import chat_models as cm
import mistral_cuda as mc
import tiny_models as tm
from mistral_cuda import generation

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _assert_usable(tiny: tm.TinyModel, **load_kw) -> None:
    """A good checkpoint still loads and matches transformers after the error."""
    engine = mc.Engine.from_pretrained(str(tiny.path), device="cpu", progress=False, **load_kw)
    ids = tiny.random_ids(12, tm.seed_of("usable"))
    tm.assert_logits_close(engine.logits(ids, chunk_size=5), tiny.reference_logits(ids), "after the error")


def _load(path, **kw):
    return mc.Engine.from_pretrained(str(path), device="cpu", progress=False, **kw)


def _hf_dir_with_config(src: tm.TinyModel, dst: Path, **fields) -> Path:
    """The good HF checkpoint's weights with config.json fields replaced."""
    dst.mkdir()
    shutil.copy(src.path / "model.safetensors", dst / "model.safetensors")
    config = json.loads((src.path / "config.json").read_text())
    config.update(fields)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _raw_header(header: dict | bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


# --------------------------------------------------------------------------------------
# 1. Shape products that wrap
# --------------------------------------------------------------------------------------


def test_consolidated_shape_product_wraps(mistral_sw, tmp_path):
    """wq of shape [2^48, 2^16] has 2^64 elements: the product wrapped to 0, so empty
    data_offsets passed, Tensor::empty allocated one byte and the RoPE row permutation wrote
    far past it. Every other tensor is present and well-formed, so only the shape check can
    stop it."""
    dim, n_heads, head_dim = 2**16, 2**16, 2**32
    params = dict(dim=dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_heads, head_dim=head_dim,
                  hidden_dim=1, vocab_size=1, norm_eps=1e-5, rope_theta=1e4, max_seq_len=64)
    q_rows = n_heads * head_dim  # 2^48
    shapes = {
        "tok_embeddings.weight": [1, dim],
        "norm.weight": [dim],
        "output.weight": [1, dim],
        "layers.0.attention_norm.weight": [dim],
        "layers.0.ffn_norm.weight": [dim],
        "layers.0.attention.wq.weight": [q_rows, dim],
        "layers.0.attention.wk.weight": [q_rows, dim],
        "layers.0.attention.wv.weight": [q_rows, dim],
        "layers.0.attention.wo.weight": [dim, q_rows],
        "layers.0.feed_forward.w1.weight": [1, dim],
        "layers.0.feed_forward.w2.weight": [dim, 1],
        "layers.0.feed_forward.w3.weight": [1, dim],
    }
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 0 if q_rows in shape else 4 * dim  # the wrapped product claims 0 bytes
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    ckpt = tmp_path / "consolidated"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps(params))
    tm.write_raw_safetensors(ckpt / "consolidated.safetensors", header, bytes(offset))
    with pytest.raises(mc.CheckpointError, match=r"shape|head_dim|n_heads|limit"):
        _load(ckpt)
    _assert_usable(mistral_sw)


@pytest.mark.parametrize(
    "shape",
    [[2**48, 2**16], [2**32, 2**32, 2], [2**62, 4], [2**63 - 1]],
    ids=["2^48x2^16", "2^32x2^32x2", "2^62x4", "2^63-1"],
)
def test_safetensors_shape_product_overflow(shape, mistral_sw, tmp_path):
    """Element counts past 2^48 (or bytes past 2^64) are refused before any size is computed
    from them, whatever the order of the factors."""
    header, data = tm.read_raw_safetensors(mistral_sw.path / "model.safetensors")
    name = tm.tensor_entries(header)[0][0]
    begin = header[name]["data_offsets"][0]
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin]}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(mistral_sw.path / "config.json", ckpt / "config.json")
    tm.write_raw_safetensors(ckpt / "model.safetensors", header, data)
    with pytest.raises(mc.CheckpointError, match=rf"{name}.*(large|overflow)"):
        _load(ckpt)
    _assert_usable(mistral_sw)


# --------------------------------------------------------------------------------------
# 2. Config fields that exhaust memory or overflow
# --------------------------------------------------------------------------------------

HF_BOUNDS = [
    # (config.json field, value, ModelConfig field named in the message)
    ("num_hidden_layers", 10**7, "n_layers"),
    ("hidden_size", 2**40, "dim"),
    ("num_attention_heads", 2**20, "n_heads"),
    ("head_dim", 2**20, "head_dim"),
    ("intermediate_size", 2**40, "hidden_dim"),
    ("vocab_size", 2**40, "vocab_size"),
    ("max_position_embeddings", 2**53, "max_seq_len"),
    ("sliding_window", 2**53, "sliding_window"),
    ("sliding_window", 2**31, "sliding_window"),
]


@pytest.mark.parametrize("key,value,field", HF_BOUNDS, ids=[f"{k}={v}" for k, v, _ in HF_BOUNDS])
def test_config_field_bounds(key, value, field, mistral_sw, tmp_path):
    """A 1 KB config.json can no longer make the loader plan gigabytes (num_hidden_layers=1e7
    allocated ~21 GB before any tensor was checked) or overflow a size (a sliding_window of
    2^53 was narrowed to int32 and silently changed the logits)."""
    ckpt = _hf_dir_with_config(mistral_sw, tmp_path / "ckpt", **{key: value})
    with pytest.raises(mc.CheckpointError, match=rf"{field}.*(limit|at most|exceeds)") as raised:
        _load(ckpt)
    assert "config.json" in str(raised.value)
    _assert_usable(mistral_sw)


def test_config_expert_count_bound(mixtral_sw, tmp_path):
    """num_local_experts = 3e6 planned 3 GB of weight slots for two layers."""
    ckpt = _hf_dir_with_config(mixtral_sw, tmp_path / "ckpt", num_local_experts=3 * 10**6)
    with pytest.raises(mc.CheckpointError, match=r"n_experts.*(limit|at most|exceeds)"):
        _load(ckpt)
    ckpt = _hf_dir_with_config(mixtral_sw, tmp_path / "ckpt2", num_local_experts=1000, num_hidden_layers=1000)
    with pytest.raises(mc.CheckpointError, match=r"n_layers \* n_experts.*(limit|at most|exceeds)"):
        _load(ckpt)
    _assert_usable(mixtral_sw)


def test_config_at_the_bounds_is_cheap(mixtral_sw, tmp_path):
    """At the bounds (1024 layers, 64 experts each) the weight plan stays small (tens of MB)
    and the first inconsistent tensor is named."""
    ckpt = _hf_dir_with_config(mixtral_sw, tmp_path / "ckpt", num_hidden_layers=1024, num_local_experts=64)
    with pytest.raises(mc.CheckpointError, match=r"'model.layers.0.block_sparse_moe.gate.weight' has shape \[4, 64\]"):
        _load(ckpt)


@pytest.mark.parametrize(
    "field,value",
    [("n_layers", 2**59), ("dim", 2**40), ("n_kv_heads", 2**40), ("head_dim", 2**40),
     ("vocab_size", 2**40), ("max_seq_len", 2**62), ("sliding_window", 2**53), ("n_experts", 2**40),
     ("n_experts_per_tok", 2**40)],
)
def test_preset_with_huge_field_from_config(field, value, mistral_sw):
    """n_layers = 2**59 on a preset made the default pool size divide by an overflowed
    product (SIGFPE); every field is bounded by validate() before anything is sized."""
    config = mc.ModelConfig.preset("mistral-7b-v0.1")
    setattr(config, field, value)
    with pytest.raises(mc.CheckpointError, match=rf"{field}"):
        mc.Engine.from_config(config)
    with pytest.raises(mc.CheckpointError, match=rf"{field}"):
        config.validate()
    _assert_usable(mistral_sw)


def test_preset_needing_more_memory_than_the_machine(mistral_sw):
    """Within the bounds, random weights larger than the host's memory fail up front."""
    config = mc.ModelConfig.preset("mixtral-8x7b")
    config.n_layers = 1024
    with pytest.raises(MemoryError, match=r"memory"):
        mc.Engine.from_config(config)
    _assert_usable(mistral_sw)


@pytest.mark.parametrize("field", ["rope_theta", "norm_eps"])
def test_non_finite_float_fields(field, mistral_sw, tmp_path):
    """1e999 parses as infinity: refused, like zero or negative values."""
    ckpt = _hf_dir_with_config(mistral_sw, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    if field == "rope_theta":
        config["rope_parameters"]["rope_theta"] = "INFINITE"
    else:
        config["rms_norm_eps"] = "INFINITE"
    (ckpt / "config.json").write_text(json.dumps(config).replace('"INFINITE"', "1e999"))
    with pytest.raises(mc.CheckpointError, match=rf"{field}.*finite"):
        _load(ckpt)


# --------------------------------------------------------------------------------------
# 5. Misaligned tensor data
# --------------------------------------------------------------------------------------


def _shift_data(src: Path, dst: Path, shift: int, header_pad: int = 0) -> str:
    """Copy of a safetensors file whose data starts `shift` bytes later (every offset moves)
    and whose header carries `header_pad` extra spaces (moving the data section itself)."""
    header, data = tm.read_raw_safetensors(src)
    for name, entry in tm.tensor_entries(header):
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin + shift, end + shift]
    raw = _raw_header(header) + b" " * header_pad
    tm.write_raw_safetensors(dst, raw, bytes(shift) + data)
    return tm.tensor_entries(header)[0][0]


@pytest.mark.parametrize("shift,header_pad", [(2, 0), (1, 0), (0, 2), (0, 1)],
                         ids=["offset+2", "offset+1", "header+2", "header+1"])
def test_misaligned_tensor_data(shift, header_pad, mistral_sw, tmp_path):
    """F32 data at an offset (or after a header length) that is not a multiple of 4 was read
    with misaligned loads (UBSan in dense_ops.cpp, dtype.cpp)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(mistral_sw.path / "config.json", ckpt / "config.json")
    _shift_data(mistral_sw.path / "model.safetensors", ckpt / "model.safetensors", shift, header_pad)
    with pytest.raises(mc.CheckpointError, match=r"misaligned"):
        _load(ckpt)
    _assert_usable(mistral_sw)


def test_misaligned_bf16_data(tmp_path):
    tiny = tm.make_bf16_checkpoint(tmp_path / "bf16", tm.mistral_config(), tm.seed_of("misaligned-bf16"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tiny.path / "config.json", ckpt / "config.json")
    _shift_data(tiny.path / "model.safetensors", ckpt / "model.safetensors", 1)
    with pytest.raises(mc.CheckpointError, match=r"align"):
        _load(ckpt)
    shutil.copy(tiny.path / "model.safetensors", ckpt / "model.safetensors")
    _shift_data(tiny.path / "model.safetensors", ckpt / "model.safetensors", 2)  # 2-byte aligned: fine
    engine = _load(ckpt)
    ids = tiny.random_ids(8, 3)
    tm.assert_logits_close(engine.logits(ids), tiny.reference_logits(ids), "bf16 at even offsets")


# --------------------------------------------------------------------------------------
# 4. Error messages holding bytes that are not UTF-8
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["tensor-name", "dtype", "config-value"])
def test_non_utf8_bytes_in_error_message(where, mistral_sw, tmp_path):
    """An error naming a file's bytes reached Python as UnicodeDecodeError."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(mistral_sw.path / "config.json", ckpt / "config.json")
    if where == "config-value":
        shutil.copy(mistral_sw.path / "model.safetensors", ckpt / "model.safetensors")
        raw = (ckpt / "config.json").read_bytes().replace(b'"hidden_act": "silu"', b'"hidden_act": "\xff\xfe"')
        assert b"\xff" in raw
        (ckpt / "config.json").write_bytes(raw)
    else:
        name, dtype = (b"w\xff\xfeight", b"F32") if where == "tensor-name" else (b"w", b"F\xc3\x28")
        raw = b'{"' + name + b'":{"dtype":"' + dtype + b'","shape":[3],"data_offsets":[0,11]}}'
        tm.write_raw_safetensors(ckpt / "model.safetensors", _raw_header(raw), bytes(12))
    with pytest.raises(mc.CheckpointError) as raised:
        _load(ckpt)
    assert "\ufffd" in str(raised.value)
    _assert_usable(mistral_sw)


# --------------------------------------------------------------------------------------
# 4. A model vocabulary larger than the tokenizer's
# --------------------------------------------------------------------------------------

EXTRA_IDS = 64


@pytest.fixture(scope="module")
def wide_vocab_model(tmp_path_factory) -> Path:
    """A v1-tokenizer model with EXTRA_IDS ids past the tokenizer's 32000, whose LM head
    makes those extra ids the most likely every time: every other row is zero."""
    tok = mc.Tokenizer.from_file(str(cm.V1_TOKENIZER))
    config = tm.mistral_config(vocab_size=tok.vocab_size + EXTRA_IDS, sliding_window=16)
    model = tm.build_model(config, tm.seed_of("wide-vocab"))
    with torch.no_grad():
        model.lm_head.weight[: tok.vocab_size] = 0
        model.lm_head.weight[tok.vocab_size :] *= 20
    path = tm.save_hf(model, tmp_path_factory.mktemp("wide_vocab"))
    shutil.copy(cm.V1_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_restricted_to_the_tokenizer_vocabulary(temperature, wide_vocab_model):
    """Sampling an id the tokenizer lacks aborted the whole generation with ValueError; ids
    at or past the tokenizer's vocab_size are masked to -inf before sampling."""
    engine = _load(wide_vocab_model)
    tok_vocab = engine.tokenizer.vocab_size
    assert engine.config.vocab_size == tok_vocab + EXTRA_IDS
    # The model itself prefers the extra ids: unmasked greedy decoding would pick one.
    logits = engine.logits(engine.tokenizer.encode("Hello there", bos=True))
    assert int(logits[-1].argmax()) >= tok_vocab
    params = mc.SamplingParams(max_tokens=6, temperature=temperature, seed=1, logprobs=3)
    outs = engine.generate(["Hello there", "Once upon"], params)
    for out in outs:
        assert len(out.token_ids) == 6 and all(0 <= t < tok_vocab for t in out.token_ids)
        assert isinstance(out.text, str)
        for entry in out.logprobs:
            assert all(t < tok_vocab for t in entry.top_logprobs)
            assert entry.logprob > float("-inf")
    # Without a tokenizer nothing is masked: ids are the model's own.
    bare = mc.Engine(engine.model)
    out = bare.generate([[1, 22557]], mc.SamplingParams(max_tokens=3, temperature=0))[0]
    assert all(t >= tok_vocab for t in out.token_ids)


# --------------------------------------------------------------------------------------
# 3. Cleanup in generation.run
# --------------------------------------------------------------------------------------


class _Interrupting:
    """A scheduler that raises `error` right after the real call `method` (the `on_call`-th
    call) returns: the exception lands after the effect, before the caller records it."""

    def __init__(self, scheduler, method: str, error: BaseException, on_call: int = 1):
        self._scheduler, self._method, self._error, self._left = scheduler, method, error, on_call

    def __getattr__(self, name):
        attr = getattr(self._scheduler, name)
        if name != self._method:
            return attr

        def call(*args, **kwargs):
            result = attr(*args, **kwargs)
            self._left -= 1
            if self._left == 0:
                raise self._error
            return result

        return call


def _groups(n: int) -> list:
    # Different lengths, so one request finishes (and is freed) while the others run.
    return [
        [generation.Request(index=i, prompt_ids=[1] + list(range(5, 5 + 3 * (i + 1))),
                            params=mc.SamplingParams(max_tokens=2 + 3 * i, temperature=0),
                            eos_id=None, decoder=None)]
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "method,on_call,error",
    [
        ("abort", 1, KeyboardInterrupt()),
        ("abort", 1, RuntimeError("boom")),
        ("step", 3, KeyboardInterrupt()),
        ("add_group", 2, KeyboardInterrupt()),
    ],
    ids=["abort-KeyboardInterrupt", "abort-RuntimeError", "step-KeyboardInterrupt", "add-KeyboardInterrupt"],
)
def test_cleanup_frees_every_sequence_once(method, on_call, error, mistral_sw):
    """An exception landing between an effect (a sequence freed, a request queued) and the
    caller's record of it must neither leak blocks nor replace the original error."""
    engine = _load(mistral_sw.path, num_blocks=64, max_num_seqs=2)
    model = engine.model
    proxy = _Interrupting(engine.scheduler, method, error, on_call)
    events = generation.run(proxy, _groups(4))
    with pytest.raises(type(error)) as raised:
        for request in events:
            if method == "abort" and request.finish_reason is None:
                events.close()  # the caller stops early: run() aborts the rest
    assert raised.value is error
    assert model.free_blocks() == model.num_blocks()
    assert not engine.scheduler.has_unfinished(), "a request was left queued in the core"
    # The engine is still usable, with the whole pool.
    ids = mistral_sw.random_ids(10, 4)
    tm.assert_logits_close(engine.logits(ids), mistral_sw.reference_logits(ids), "after the interrupt")
    out = engine.generate([[1, 5, 6]], mc.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3 and model.free_blocks() == model.num_blocks()


def test_cleanup_when_the_caller_stops_early(mistral_sw):
    engine = _load(mistral_sw.path, num_blocks=64)
    events = generation.run(engine.scheduler, _groups(3))
    next(events)
    assert engine.model.free_blocks() < engine.model.num_blocks()
    events.close()
    assert engine.model.free_blocks() == engine.model.num_blocks()
    assert not engine.scheduler.has_unfinished()


# --------------------------------------------------------------------------------------
# 6. The mmap contract: mmap=False copies the weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "consolidated"])
def test_mmap_false_survives_file_truncation_and_overwrite(layout, mistral_sw, tmp_path):
    """With mmap=False the weights live in private memory: truncating or overwriting the
    files after load changes nothing (with the default mmap=True that is SIGBUS or silently
    different logits, as documented)."""
    if layout == "hf":
        ckpt = shutil.copytree(mistral_sw.path, tmp_path / "ckpt")
        files = [ckpt / "model.safetensors"]
    else:
        ckpt = tm.write_consolidated(mistral_sw.path, tmp_path / "ckpt", mistral_sw.config)
        files = [ckpt / "consolidated.safetensors"]
    engine = _load(ckpt, mmap=False)
    ids = mistral_sw.random_ids(10, 5)
    before = engine.logits(ids)
    tm.assert_logits_close(before, mistral_sw.reference_logits(ids), "mmap=False")
    for path in files:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(b"\x7f" * size)  # overwritten in place
        with open(path, "r+b") as f:
            f.truncate(8)
    after = engine.logits(ids)
    assert torch.equal(before, after)
    out = engine.generate([ids], mc.SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4


def test_mmap_option_is_checked(mistral_sw):
    with pytest.raises(TypeError):
        _load(mistral_sw.path, mmap="no")


# --------------------------------------------------------------------------------------
# The fuzzers' seed corpus (fuzz/make_corpus.py)
# --------------------------------------------------------------------------------------


def test_fuzz_seed_corpus_is_made_of_loadable_checkpoints(tmp_path):
    """Every fuzz_checkpoint_dir seed stands for a model directory the engine loads and runs,
    so the fuzzer mutates valid checkpoints rather than inputs rejected at the first byte."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parent.parent / "fuzz" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    written = make_corpus.write_corpus(tmp_path / "corpus")
    assert set(written) == set(make_corpus.TARGETS) and all(written.values())
    for seed in written["fuzz_checkpoint_dir"]:
        model_dir = tmp_path / "dirs" / seed.name
        model_dir.mkdir(parents=True)
        use_mmap = make_corpus.unpack_dir(seed.read_bytes(), model_dir)
        engine = _load(model_dir, mmap=use_mmap)
        logits = engine.logits([1, 2, 3, 4, 5])
        assert logits.shape == (5, 32) and torch.isfinite(logits).all(), seed.name
