"""The command line: ``python -m mistral_cuda generate|chat|demo`` (and the ``mistral-cuda``
console script), checked against the in-process Engine on the same tiny checkpoints.

The CLI's output is compared leniently in form (anything may precede the completion on
stdout, e.g. an echoed prompt; trailing whitespace is ignored) but strictly in content:
the completion must be exactly the engine's text for the same sampling parameters, so
every sampling flag the test passes is checked to reach the sampler. All flags whose
CLI default could differ from SamplingParams' default are passed explicitly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import chat_models as cm
import mistral_cuda as mc

PROMPT = "The weather today is sunny and warm."


def run_cli(*args, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run(
        [sys.executable, "-m", "mistral_cuda", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def describe(r: subprocess.CompletedProcess) -> str:
    return f"rc={r.returncode}\n--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}"


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, describe(r)
    assert "Traceback" not in r.stderr, describe(r)


def assert_completion(stdout: str, text: str, r) -> None:
    """stdout ends with the completion ``text`` (up to trailing whitespace)."""
    assert text.strip(), f"empty reference completion {text!r}"
    assert stdout.rstrip().endswith(text.rstrip()), f"expected completion {text!r}\n{describe(r)}"


def sampling_flags(p: "mc.SamplingParams") -> list[str]:
    flags = [
        "--max-tokens", p.max_tokens,
        "--temperature", p.temperature,
        "--top-k", p.top_k,
        "--top-p", p.top_p,
        "--min-p", p.min_p,
        "--repetition-penalty", p.repetition_penalty,
    ]  # fmt: skip
    if p.seed is not None:
        flags += ["--seed", p.seed]
    if p.ignore_eos:
        flags += ["--ignore-eos"]
    return [str(f) for f in flags]


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("v1", tmp_path_factory)


@pytest.fixture(scope="module")
def engine(v1):
    return cm.load_engine(v1)


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("eos", tmp_path_factory)


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------


def test_help_lists_commands():
    r = run_cli("--help")
    assert_ok(r)
    for cmd in ("generate", "chat", "demo"):
        assert cmd in r.stdout, describe(r)


@pytest.mark.parametrize(
    "params",
    [
        dict(max_tokens=12, temperature=0.0, ignore_eos=True),
        dict(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=3),
    ],
    ids=["greedy", "sampled"],
)
def test_generate_matches_engine(params, v1, engine):
    p = mc.SamplingParams(**params)
    ref = engine.generate(PROMPT, p)[0]
    r = run_cli("generate", v1.path, PROMPT, *sampling_flags(p))
    assert_ok(r)
    assert_completion(r.stdout, ref.text, r)
    assert "tok/s" in r.stderr, describe(r)


def test_generate_stop_strings(v1, engine):
    p = mc.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = engine.generate(PROMPT, p)[0].text
    mid = len(full) // 2
    start = next(
        i for i in range(mid, len(full) - 3)
        if full[i : i + 3].strip() and "\ufffd" not in full[i : i + 3] and full.find(full[i : i + 3]) == i
    )  # fmt: skip
    stop = full[start : start + 3]
    ref = engine.generate(PROMPT, mc.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=["@@never@@", stop]))[0]
    assert ref.text == full[:start]
    r = run_cli("generate", v1.path, PROMPT, *sampling_flags(p), "--stop", "@@never@@", "--stop", stop)
    assert_ok(r)
    assert_completion(r.stdout, ref.text, r)
    assert stop not in r.stdout[r.stdout.rfind(ref.text.rstrip()) :], describe(r)
    assert "tok/s" in r.stderr, describe(r)


def test_generate_eos_and_ignore_eos(eos_model):
    eng = cm.load_engine(eos_model)
    assert eng.tokenizer.encode(PROMPT, bos=True) == cm.EOS_PROMPT_IDS
    p_stop = mc.SamplingParams(max_tokens=30, temperature=0.0)
    ref_stop = eng.generate(PROMPT, p_stop)[0]
    assert ref_stop.finish_reason == "stop"
    p_ign = mc.SamplingParams(max_tokens=eos_model.eos_step + 6, temperature=0.0, ignore_eos=True)
    ref_ign = eng.generate(PROMPT, p_ign)[0]
    assert ref_ign.finish_reason == "length"
    for p, ref in ((p_stop, ref_stop), (p_ign, ref_ign)):
        r = run_cli("generate", eos_model.path, PROMPT, *sampling_flags(p))
        assert_ok(r)
        assert_completion(r.stdout, ref.text, r)


# --------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------

CHAT_FLAGS = ["--max-tokens", "10", "--temperature", "0", "--repetition-penalty", "1.0",
              "--top-k", "0", "--top-p", "1.0", "--min-p", "0.0"]  # fmt: skip
CHAT_PARAMS = dict(max_tokens=10, temperature=0.0)


def _chat_reply(engine, messages) -> str:
    return engine.chat(messages, mc.SamplingParams(**CHAT_PARAMS)).text


def test_chat_two_turns_with_history(v1, engine):
    u1, u2, u3 = "Hello there", "How are you?", "This line comes after /exit"
    r = run_cli("chat", v1.path, *CHAT_FLAGS, stdin=f"{u1}\n{u2}\n/exit\n{u3}\n")
    assert_ok(r)
    out = r.stdout

    reply1 = _chat_reply(engine, [{"role": "user", "content": u1}])
    assert reply1.strip()
    i1 = out.find(reply1.strip())
    assert i1 >= 0, f"first reply {reply1!r} not on stdout\n{describe(r)}"

    # The history holds the first reply (as streamed, or stripped of surrounding whitespace).
    found = None
    for content in dict.fromkeys([reply1, reply1.strip()]):
        history = [
            {"role": "user", "content": u1},
            {"role": "assistant", "content": content},
            {"role": "user", "content": u2},
        ]
        reply2 = _chat_reply(engine, history)
        i2 = out.find(reply2.strip(), i1 + len(reply1.strip()))
        if reply2.strip() and i2 >= 0:
            found = (history, reply2)
            break
    no_history = _chat_reply(engine, [{"role": "user", "content": u2}])
    assert found is not None, (
        f"second reply (with the first turn in the history) not on stdout; "
        f"without history it would be {no_history!r}\n{describe(r)}"
    )
    history, reply2 = found
    # Nothing is generated after /exit.
    content2 = reply2 if history[1]["content"] == reply1 else reply2.strip()
    reply3 = _chat_reply(engine, history + [{"role": "assistant", "content": content2}, {"role": "user", "content": u3}])
    if reply3.strip() and reply3.strip() not in (reply1.strip(), reply2.strip()):
        assert reply3.strip() not in out, f"a reply was generated after /exit\n{describe(r)}"


def test_chat_ends_on_eof(v1, engine):
    r = run_cli("chat", v1.path, *CHAT_FLAGS, stdin="Hello there\n")
    assert_ok(r)
    reply = _chat_reply(engine, [{"role": "user", "content": "Hello there"}])
    assert reply.strip() in r.stdout, describe(r)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _assert_clean_error(r, pattern: str) -> None:
    assert r.returncode != 0, describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, describe(r)
    assert re.search(pattern, lines[-1], re.I), f"last stderr line does not name the problem ({pattern})\n{describe(r)}"


def test_missing_model_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    r = run_cli("generate", missing, PROMPT, "--max-tokens", "4")
    _assert_clean_error(r, r"no_such_model|not found|no such|does not exist|missing")


@pytest.mark.parametrize(
    "flags,pattern",
    [
        (["--temperature", "-1"], "temperature"),
        (["--max-tokens", "0"], "max.tokens"),
        (["--top-p", "abc"], "top.p"),
    ],
    ids=["temperature=-1", "max-tokens=0", "top-p=abc"],
)
def test_invalid_flag_value(flags, pattern, v1):
    r = run_cli("generate", v1.path, PROMPT, *flags)
    _assert_clean_error(r, pattern)


def test_console_script(v1, engine):
    exe = shutil.which("mistral-cuda")
    if exe is None:
        pytest.skip("the mistral-cuda console script is not installed in this environment (reinstall the package)")
    p = mc.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    r = subprocess.run(
        [exe, "generate", str(v1.path), PROMPT, *sampling_flags(p)], capture_output=True, text=True, timeout=120
    )
    assert_ok(r)
    assert_completion(r.stdout, engine.generate(PROMPT, p)[0].text, r)


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


def _snapshot(d: Path) -> dict:
    return {
        str(f.relative_to(d)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in d.rglob("*")
        if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name.startswith("tokenizer"))
    }


def test_demo_builds_once_and_reuses_cache(tmp_path):
    cache = tmp_path / "demo_cache"
    r1 = run_cli("demo", "--cache-dir", cache, "--max-tokens", "8", timeout=600)
    assert_ok(r1)
    both1 = r1.stdout + r1.stderr
    assert "random" in both1.lower(), describe(r1)
    assert "tok/s" in both1, describe(r1)
    snap = _snapshot(cache)
    assert any(k.endswith(".safetensors") for k in snap), f"no checkpoint under the cache dir: {sorted(snap)}"
    assert any(Path(k).name.startswith("tokenizer") for k in snap), f"no tokenizer under the cache dir: {sorted(snap)}"

    r2 = run_cli("demo", "--cache-dir", cache, "--max-tokens", "8", timeout=600)
    assert_ok(r2)
    both2 = r2.stdout + r2.stderr
    assert "tok/s" in both2, describe(r2)
    assert _snapshot(cache) == snap, "the second demo run rewrote the cached checkpoint"
