"""API checks a newcomer runs into (issue 15): Engine() given a path, SamplingParams' seed
range, Stream.close(), model_type / architectures at load, the memory estimate and its
refusal, load progress (bytes, lazily started bar) and Ctrl-C during a load, and the
ImportError of a source tree without the compiled extension."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import chat_models as cm
import mistral_cuda as mc
import tiny_models as tm
from mistral_cuda import _C
from mistral_cuda import engine as engine_module

REPO = Path(__file__).resolve().parent.parent


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _tiny_config(**overrides) -> mc.ModelConfig:
    c = mc.ModelConfig()
    c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim = 64, 3, 4, 2, 16
    c.hidden_dim, c.vocab_size, c.sliding_window, c.max_seq_len = 96, 300, 8, 512
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def _hf_parameter_count(config: mc.ModelConfig) -> int:
    """The number of weights transformers' MistralForCausalLM / MixtralForCausalLM of this shape has."""
    kw = dict(
        hidden_size=config.dim, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, intermediate_size=config.hidden_dim,
        vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
    )  # fmt: skip
    if config.n_experts:
        model = tm.build_model(tm.mixtral_config(num_local_experts=config.n_experts, **kw), 0)
    else:
        model = tm.build_model(tm.mistral_config(**kw), 0)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------
# Engine(), SamplingParams, Stream.close()
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["/some/model/dir", Path("/some/model/dir"), None, 3])
def test_engine_constructor_rejects_anything_but_a_model(bad):
    with pytest.raises(TypeError, match="from_pretrained"):
        mc.Engine(bad)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70])
def test_sampling_params_seed_out_of_range(seed):
    with pytest.raises(ValueError, match="seed"):
        mc.SamplingParams(seed=seed)


def test_sampling_params_seed_extremes_generate(tmp_path_factory):
    """0 and 2**64 - 1 are accepted and sample: the seed really reaches the generator."""
    engine = cm.load_engine(cm.get_chat_model("v1", tmp_path_factory))
    outs = [
        engine.generate("Hello", mc.SamplingParams(max_tokens=6, seed=s, ignore_eos=True))[0].token_ids
        for s in (0, 2**64 - 1, 2**64 - 1)
    ]
    assert outs[1] == outs[2] and len(outs[0]) == 6


def test_stream_close_sets_output_abort(tmp_path_factory):
    engine = cm.load_engine(cm.get_chat_model("v1", tmp_path_factory))
    p = mc.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = engine.generate("The weather today is", p)[0]
    stream = engine.stream("The weather today is", p)
    text = ""
    for delta in stream:
        text += delta
        if len(text) >= 5:
            break
    stream.close()
    out = stream.output
    assert out is not None and out.finish_reason == "abort"
    n = len(out.token_ids)
    assert 0 < n < 40 and out.token_ids == full.token_ids[:n]
    assert out.text.startswith(text) and full.text.startswith(out.text)
    assert engine.model.free_blocks() == engine.model.num_blocks(), "close() left KV blocks in use"

    # Closed before it started: an empty abort; closing a finished stream keeps its output.
    early = engine.stream("The weather today is", p)
    early.close()
    assert early.output.finish_reason == "abort" and early.output.token_ids == []
    done = engine.stream("The weather today is", mc.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert "".join(done) == engine.generate("The weather today is", mc.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0].text
    done.close()
    assert done.output.finish_reason == "length"


# --------------------------------------------------------------------------------------
# model_type / architectures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,named",
    [
        (lambda c: c.update(model_type="gemma"), "gemma"),
        (lambda c: c.update(model_type="gemma", architectures=["GemmaForCausalLM"], hidden_act="gelu_pytorch_tanh"),
         "gemma"),
        (lambda c: c.update(architectures=["GemmaForCausalLM"]), "GemmaForCausalLM"),
        (lambda c: c.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "qwen2"),
        (lambda c: c.update(architectures=["MixtralForCausalLM"]), "MixtralForCausalLM"),
        (lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True), "attention_bias"),
        (lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=True), "mlp_bias"),
    ],
    ids=["model_type-gemma", "gemma-config", "architecture-gemma", "qwen2", "mismatch", "llama-attention-bias", "llama-mlp-bias"],
)
def test_unsupported_model_type_refused(edit, named, mistral_sw, tmp_path):
    path = shutil.copytree(mistral_sw.path, tmp_path / "model")
    _edit_config(path, edit)
    with pytest.raises(mc.CheckpointError, match=named):
        mc.Engine.from_pretrained(path, device="cpu", progress=False)
    with pytest.raises(mc.CheckpointError, match=named):
        mc.ModelConfig.from_dir(str(path))


def test_config_without_model_type_loads_as_mistral(mistral_sw, tmp_path):
    path = shutil.copytree(mistral_sw.path, tmp_path / "model")
    _edit_config(path, lambda c: [c.pop("model_type"), c.pop("architectures", None)])
    ids = mistral_sw.random_ids(12, seed=1)
    logits = mc.Engine.from_pretrained(path, device="cpu", progress=False).logits(ids)
    tm.assert_logits_close(logits, mistral_sw.reference_logits(ids), "no model_type")


def test_llama_checkpoint_matches_transformers(tmp_path):
    """model_type "llama" (no biases, no rope scaling) is the same architecture: its logits
    match transformers' LlamaForCausalLM, and no sliding window is assumed."""
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(tm.seed_of("llama"))
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    tm.save_hf(model, tmp_path / "llama")
    engine = mc.Engine.from_pretrained(tmp_path / "llama", device="cpu", progress=False)
    assert engine.config.sliding_window is None
    ids = tm.random_ids(40, 256, seed=2)
    tm.assert_logits_close(engine.logits(ids, chunk_size=7), tm.reference_logits(model, ids), "llama")


# --------------------------------------------------------------------------------------
# Memory estimate
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"sliding_window": None, "max_seq_len": 256}, {"n_experts": 4, "n_experts_per_tok": 2}, {"tie_embeddings": True}],
    ids=["dense-swa", "dense-full", "moe", "tied"],
)
def test_memory_estimate_counts_weights_and_kv(overrides):
    """Weights: transformers' parameter count x 4 bytes; KV: the pool the runner really builds."""
    config = _tiny_config(**overrides)
    engine = mc.Engine.from_config(config, device="cpu", progress=False)
    kv_block = config.n_layers * 2 * engine.model.block_size * config.n_kv_heads * config.head_dim * 4
    expected = _hf_parameter_count(config) * 4 + engine.model.num_blocks() * kv_block
    assert engine_module.memory_estimate(config, "cpu", None, 16, None) == expected
    assert engine_module.memory_estimate(config, "cpu", None, 16, 7) == _hf_parameter_count(config) * 4 + 7 * kv_block


def test_available_memory_reads_meminfo():
    have = engine_module.available_memory("cpu")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert have is not None and 0 < have <= total


def test_from_config_refuses_a_model_larger_than_memory():
    """Mixtral-8x7B in float32 (~190 GB) on the CPU is refused before anything is allocated."""
    start = time.perf_counter()
    with pytest.raises(mc.InsufficientMemoryError, match=r"GiB.*check_memory=False") as info:
        mc.Engine.from_config(mc.ModelConfig.preset("mixtral-8x7b"), device="cpu")
    assert time.perf_counter() - start < 5
    assert isinstance(info.value, MemoryError) and isinstance(info.value, mc.Error)


def test_memory_check_with_little_memory_and_its_opt_out(monkeypatch, mistral_sw):
    monkeypatch.setattr(engine_module, "available_memory", lambda device: 64 << 10)
    with pytest.raises(mc.InsufficientMemoryError, match="RAM"):
        mc.Engine.from_config(_tiny_config(), device="cpu", progress=False)
    with pytest.raises(mc.InsufficientMemoryError, match="RAM"):
        mc.Engine.from_pretrained(mistral_sw.path, device="cpu", progress=False)
    mc.Engine.from_config(_tiny_config(), device="cpu", progress=False, check_memory=False)
    ids = mistral_sw.random_ids(6, seed=3)
    logits = mc.Engine.from_pretrained(mistral_sw.path, device="cpu", progress=False, check_memory=False).logits(ids)
    tm.assert_logits_close(logits, mistral_sw.reference_logits(ids), "check_memory=False")


# --------------------------------------------------------------------------------------
# Progress and Ctrl-C during loads
# --------------------------------------------------------------------------------------


def _options(progress) -> "_C.ModelOptions":
    options = _C.ModelOptions()
    options.device = "cpu"
    options.progress = progress
    return options


def test_from_config_reports_progress_in_bytes():
    config = _tiny_config()
    calls = []
    _C.Model.from_config(config, 0, _options(lambda done, total: calls.append((done, total))))
    total = _hf_parameter_count(config) * 4
    assert calls and all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total


@pytest.mark.parametrize("how", ["from_config", "load"])
def test_keyboard_interrupt_in_progress_stops_the_load(how, mistral_sw):
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        if how == "from_config":
            _C.Model.from_config(_tiny_config(), 0, _options(progress))
        else:
            _C.Model.load(str(mistral_sw.path), _options(progress))
    assert len(calls) == 3, "the load went on after the interrupt"
    # The process is fine afterwards.
    ids = mistral_sw.random_ids(5, seed=4)
    logits = mc.Engine.from_pretrained(mistral_sw.path, device="cpu", progress=False).logits(ids)
    tm.assert_logits_close(logits, mistral_sw.reference_logits(ids), "after an interrupted load")


def _python(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **kw)


def test_sigint_stops_a_long_from_config():
    """A real Ctrl-C (SIGINT) during a long random-weight build ends it promptly, after the
    bar has shown progress; the build alone would take far longer."""
    code = (
        "import mistral_cuda as mc\n"
        "c = mc.ModelConfig.preset('mistral-7b-v0.1')\n"
        "c.n_layers = 40\n"  # ~18 GB of bfloat16 if it ran to the end (physical memory caps it)
        "mc.Engine.from_config(c, device='cpu', dtype='bfloat16', check_memory=False)\n"
    )
    proc = _python(code, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "Drawing random weights" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.read(1)
        assert "Drawing random weights" in seen, seen
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in rest, rest[-2000:]


def test_bar_starts_only_after_validation(tmp_path, mistral_sw, capsys):
    """No bar for a load that fails on the directory or headers; a bar in bytes with a
    byte rate for one that loads."""
    broken = shutil.copytree(mistral_sw.path, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    for path in (tmp_path / "missing", broken):
        with pytest.raises((mc.ModelNotFoundError, mc.CheckpointError)):
            mc.Engine.from_pretrained(path, device="cpu")
        assert "Loading" not in capsys.readouterr().err
    mc.Engine.from_pretrained(mistral_sw.path, device="cpu")
    err = capsys.readouterr().err
    assert "Loading weights" in err and "100%" in err and "B/s" in err, err


# --------------------------------------------------------------------------------------
# Import of a source tree without the compiled extension
# --------------------------------------------------------------------------------------


def test_import_without_compiled_extension_explains(tmp_path):
    """The situation of running from the repository root after `pip install .`: the source
    tree (no _C) is found first. -S keeps site-packages (and any install of ours) out."""
    shutil.copytree(REPO / "mistral_cuda", tmp_path / "mistral_cuda", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    r = subprocess.run(
        [sys.executable, "-S", "-c", "import mistral_cuda"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "mistral_cuda._C" in last, r.stderr
    assert "pip install" in last and "another directory" in last and str(tmp_path) in last, r.stderr
