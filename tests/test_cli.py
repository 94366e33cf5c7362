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
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import chat_models as cm
import tiny_models as tm
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
    assert "tok/s" in r.stderr and "tok/s" not in r.stdout, describe(r)


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
    assert "random" in r1.stdout.lower(), describe(r1)
    assert "tok/s" in r1.stderr and "tok/s" not in r1.stdout, describe(r1)
    snap = _snapshot(cache)
    assert any(k.endswith(".safetensors") for k in snap), f"no checkpoint under the cache dir: {sorted(snap)}"
    assert any(Path(k).name.startswith("tokenizer") for k in snap), f"no tokenizer under the cache dir: {sorted(snap)}"

    r2 = run_cli("demo", "--cache-dir", cache, "--max-tokens", "8", timeout=600)
    assert_ok(r2)
    assert "tok/s" in r2.stderr, describe(r2)
    assert _snapshot(cache) == snap, "the second demo run rewrote the cached checkpoint"


# --------------------------------------------------------------------------------------
# Options checked before the model is touched; --help and the README
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,pattern",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--seed", "99999999999999999999999"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--top-p", "abc"], "--top-p"),
        (["--top-k", "-5"], "--top-k"),
        (["--logprobs", "21"], "--logprobs"),
        (["--stop-token-ids", "2,x"], "--stop-token-ids"),
        (["--num-blocks", "0"], "--num-blocks"),
        (["--dtype", "int8"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--block-regex", "("], "--block-regex"),
    ],
)
def test_options_checked_before_loading(flags, pattern, v1, tmp_path):
    """argparse-style: exit status 2, the usage, a message naming the flag; the model is never
    opened (a missing directory is not even noticed, and no loading bar starts)."""
    for model_dir in (v1.path, tmp_path / "no_such_model"):
        r = run_cli("generate", model_dir, PROMPT, *flags, timeout=60)
        assert r.returncode == 2, describe(r)
        assert r.stderr.startswith("usage: mistral-cuda generate"), describe(r)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("mistral-cuda generate: error:") and pattern in last, describe(r)
        assert "Loading" not in r.stderr and "Traceback" not in r.stderr, describe(r)


@pytest.mark.skipif(mc.cuda_compiled() and mc.cuda_device_count() > 0, reason="a GPU is visible here")
def test_device_cuda_without_a_gpu_is_a_usage_error(v1):
    r = run_cli("generate", v1.path, PROMPT, "--device", "cuda", timeout=60)
    assert r.returncode == 2 and "--device cuda" in r.stderr.strip().splitlines()[-1], describe(r)
    assert "Loading" not in r.stderr, describe(r)


def test_missing_prompt_file_is_a_usage_error(v1, tmp_path):
    r = run_cli("generate", v1.path, f"@{tmp_path / 'nope.txt'}", timeout=60)
    assert r.returncode == 2 and "nope.txt" in r.stderr.strip().splitlines()[-1], describe(r)


def _subparsers():
    from mistral_cuda.cli import build_parser

    action = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def _options(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", ["generate", "chat", "demo", "serve"])
def test_help_shows_every_default(command):
    r = subprocess.run(
        [sys.executable, "-m", "mistral_cuda", command, "--help"], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, COLUMNS="250"),
    )  # fmt: skip
    assert_ok(r)
    help_lines = r.stdout.splitlines()
    for action in _options(_subparsers()[command]):
        flag = action.option_strings[0]
        starts = [i for i, ln in enumerate(help_lines) if re.match(rf"\s+{re.escape(flag)}(\s|$)", ln)]
        assert starts, f"{flag} missing from --help\n{r.stdout}"
        # The option's block: its line and the deeper-indented lines after it.
        block = [help_lines[starts[0]]]
        for ln in help_lines[starts[0] + 1 :]:
            if not ln.strip() or re.match(r"\s{1,4}-", ln) or not ln.startswith(" "):
                break
            block.append(ln)
        assert f"(default: {action.default})" in " ".join(block), f"{flag}: no default shown\n" + "\n".join(block)


def _readme_cli_table() -> dict:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `([^`]*)` \|", section, re.M)
    return dict(rows), section


def test_readme_cli_section_matches_help():
    """Every generate/chat option is in the README's table with the default --help shows,
    and the table names no option that does not exist."""
    table, section = _readme_cli_table()
    parsers = _subparsers()
    known = {}
    for command in ("generate", "chat"):
        for action in _options(parsers[command]):
            known[action.option_strings[0]] = str(action.default)
    assert set(table) == set(known), f"README table {sorted(table)} vs --help {sorted(known)}"
    for flag, default in known.items():
        assert table[flag] == default, f"README says {flag} defaults to {table[flag]!r}, --help says {default!r}"
    for action in _options(parsers["demo"]):
        assert action.option_strings[0] in section, f"demo's {action.option_strings[0]} is not in the README"
    from mistral_cuda.sampling import SamplingParams

    api = SamplingParams()
    for flag, field in (("--temperature", "temperature"), ("--max-tokens", "max_tokens")):
        if str(getattr(api, field)) != known[flag]:
            assert re.search(rf"{flag}[^\n]*{re.escape(known[flag])}[^\n]*API[^\n]*{re.escape(str(getattr(api, field)))}",
                             section), f"the README does not say that the CLI's {flag} differs from the API's"


# --------------------------------------------------------------------------------------
# New flags: prompt from stdin or a file, --logprobs, --stop-token-ids, --dtype, --num-blocks
# --------------------------------------------------------------------------------------

GREEDY = mc.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_prompt_from_stdin_and_file(v1, engine, tmp_path):
    ref = engine.generate(PROMPT, GREEDY)[0].text
    r = run_cli("generate", v1.path, "-", *sampling_flags(GREEDY), stdin=PROMPT + "\n")
    assert_ok(r)
    assert_completion(r.stdout, ref, r)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n")
    r = run_cli("generate", v1.path, f"@{prompt_file}", *sampling_flags(GREEDY))
    assert_ok(r)
    assert_completion(r.stdout, ref, r)
    # Several lines, as written.
    multi = "First line.\nSecond line:"
    prompt_file.write_text(multi)
    r = run_cli("generate", v1.path, f"@{prompt_file}", *sampling_flags(GREEDY))
    assert_ok(r)
    assert_completion(r.stdout, engine.generate(multi, GREEDY)[0].text, r)


def test_logprobs_flag(v1, engine):
    p = mc.SamplingParams(max_tokens=6, temperature=0.9, seed=5, logprobs=3, ignore_eos=True)
    ref = engine.generate(PROMPT, p)[0]
    r = run_cli("generate", v1.path, PROMPT, *sampling_flags(p), "--logprobs", "3")
    assert_ok(r)
    rows = [ln.split("\t") for ln in r.stderr.splitlines() if ln.startswith("logprob\t")]
    assert len(rows) == len(ref.logprobs) == 6, describe(r)
    assert "logprob\t" not in r.stdout
    for row, expected in zip(rows, ref.logprobs):
        assert int(row[2]) == expected.token_id
        assert abs(float(row[4]) - expected.logprob) < 1e-4
        top = dict((int(t), float(v)) for t, v in (item.split(":") for item in row[5].split()))
        assert list(top) == list(expected.top_logprobs)
        assert all(abs(top[t] - v) < 1e-4 for t, v in expected.top_logprobs.items())


def test_stop_token_ids_flag(v1, engine):
    full = engine.generate(PROMPT, mc.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    step = next(i for i in range(3, 20) if full.token_ids[i] not in full.token_ids[:i])
    stop_id = full.token_ids[step]
    p = mc.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[31999, stop_id])
    ref = engine.generate(PROMPT, p)[0]
    assert ref.finish_reason == "stop" and ref.token_ids == full.token_ids[: step + 1]
    r = run_cli("generate", v1.path, PROMPT, *sampling_flags(p), "--stop-token-ids", f"31999,{stop_id}")
    assert_ok(r)
    assert_completion(r.stdout, ref.text, r)
    assert f"decode: {step + 1} tokens" in r.stderr and "finish: stop" in r.stderr, describe(r)


def test_device_dtype_num_blocks_flags(v1):
    """--num-blocks reaches the KV pool: a 2-block pool holds the sliding window's ring (16
    tokens, block 16), a 1-block pool runs out once the sequence passes 16 tokens."""
    p = mc.SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = cm.load_engine(v1, num_blocks=2).generate(PROMPT, p)[0].text
    r = run_cli("generate", v1.path, PROMPT, *sampling_flags(p), "--device", "cpu", "--dtype", "float32",
                "--num-blocks", "2")  # fmt: skip
    assert_ok(r)
    assert_completion(r.stdout, ref, r)
    r = run_cli("generate", v1.path, PROMPT, *sampling_flags(p), "--device", "cpu", "--num-blocks", "1")
    _assert_clean_error(r, r"block|cache")


# --------------------------------------------------------------------------------------
# SIGINT during generate
# --------------------------------------------------------------------------------------


def _env():
    return dict(os.environ, OMP_NUM_THREADS="2")


def _read_some(fd: int, want: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data


def test_sigint_during_generate_ends_with_newline_and_statistics(v1, engine):
    p = mc.SamplingParams(max_tokens=1_000_000, temperature=0.0, ignore_eos=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral_cuda", "generate", str(v1.path), PROMPT, *sampling_flags(p)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        head = _read_some(proc.stdout.fileno(), 200, timeout=120)
        assert len(head) >= 200, f"no output before the interrupt: {head!r}"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    out, err = (head + rest).decode(), err.decode()
    assert proc.returncode == 130, f"rc={proc.returncode}\n{err[-3000:]}"
    assert out.endswith("\n") and "Traceback" not in err, err[-3000:]
    stats = re.search(r"decode: (\d+) tokens.*finish: abort", err)
    assert stats, err[-3000:]
    n = int(stats.group(1))
    assert 0 < n < 1_000_000
    # What was printed is the completion of those n tokens (or all but the last, if the
    # interrupt came between sampling a token and decoding it).
    ref = engine.generate(PROMPT, mc.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].text
    assert ref.startswith(out[:-1]) and len(out) > 1, f"{out[-200:]!r} vs {ref[-200:]!r}"


# --------------------------------------------------------------------------------------
# chat: Ctrl-C in a terminal, /reset, conversations longer than max_seq_len
# --------------------------------------------------------------------------------------


class Terminal:
    """The CLI on a pseudo-terminal: Ctrl-C (\\x03) becomes SIGINT as in a real terminal."""

    def __init__(self, args):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            try:
                os.execve(sys.executable, [sys.executable, "-m", "mistral_cuda", *map(str, args)], _env())
            finally:
                os._exit(127)
        self.seen = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Reads until `text` appears after what earlier calls consumed; returns what came before it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    break
        assert text in self.seen, f"{text!r} not seen; output so far:\n{self.seen[-3000:]}"
        before, self.seen = self.seen.split(text, 1)
        return before

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the CLI did not exit; output:\n{self.seen[-3000:]}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_chat_ctrl_c_cancels_the_reply_then_exits_at_the_prompt(v1, engine):
    # An endless reply (ignore EOS, sliding window: no max_seq_len), so Ctrl-C lands mid-reply.
    term = Terminal(["chat", v1.path, "--max-tokens", "1000000", "--temperature", "0", "--ignore-eos"])
    try:
        term.expect("user> ")
        term.send("Hello there\n")
        term.expect("assistant> ")
        term.expect(" ", timeout=60)
        time.sleep(0.5)
        term.send("\x03")
        term.expect("finish: abort", timeout=60)
        term.expect("reply cancelled", timeout=30)
        term.expect("user> ", timeout=30)
        term.send("/exit\n")
        assert term.exit_status() == 0
    finally:
        term.close()

    term = Terminal(["chat", v1.path, *CHAT_FLAGS])
    try:
        term.expect("user> ")
        term.send("Hello there\n")
        reply = term.expect("user> ")
        assert _chat_reply(engine, [{"role": "user", "content": "Hello there"}]).strip() in reply
        term.send("\x03")
        assert term.exit_status() == 130
    finally:
        term.close()


def _prompt_tokens(before_stats: str) -> int:
    return int(re.findall(r"prompt: (\d+) tokens", before_stats)[-1])


def test_chat_cancelled_exchange_is_dropped(v1, engine):
    """After Ctrl-C the next turn's prompt holds only that turn, and its reply is the
    engine's reply to it alone."""
    u1, u2 = "Hello there", "How are you?"
    term = Terminal(["chat", v1.path, "--max-tokens", "2000", "--temperature", "0", "--ignore-eos"])
    try:
        term.expect("user> ")
        term.send(u1 + "\n")
        term.expect("assistant> ")
        term.expect(" ", timeout=60)
        term.send("\x03")
        term.expect("reply cancelled", timeout=60)
        term.expect("user> ", timeout=30)
        term.send(u2 + "\n")
        term.expect("assistant> ")
        reply = term.expect("| finish: length", timeout=300)
        term.expect("user> ", timeout=30)
        term.send("/exit\n")
        assert term.exit_status() == 0
    finally:
        term.close()
    alone = [{"role": "user", "content": u2}]
    assert _prompt_tokens(reply) == len(engine.tokenizer.encode_chat(alone))
    start = engine.chat(alone, mc.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)).text
    assert reply.replace("\r\n", "\n").startswith(start[:-3]), f"{reply[:200]!r} vs {start!r}"


def test_chat_reset_keeps_the_system_prompt(v1, engine):
    u1, u2, system = "Hello there", "How are you?", "Be brief."
    r = run_cli("chat", v1.path, "--system", system, *CHAT_FLAGS, stdin=f"{u1}\n/reset\n{u2}\n")
    assert_ok(r)
    assert "conversation cleared" in r.stderr, describe(r)
    after = [{"role": "system", "content": system}, {"role": "user", "content": u2}]
    assert _prompt_tokens(r.stderr) == len(engine.tokenizer.encode_chat(after)), describe(r)
    fresh = _chat_reply(engine, after)
    assert fresh.strip() and fresh.strip() in r.stdout.split("assistant> ")[-1], describe(r)


@pytest.fixture(scope="module")
def short_chat_model(tmp_path_factory) -> Path:
    """The v1 chat model's shape with full attention and max_seq_len 64."""
    config = cm.chat_config(32000, sliding_window=None, max_position_embeddings=64)
    model = cm.build_chat_model(config, tm.seed_of("chat-short"))
    path = tmp_path_factory.mktemp("chat_short") / "model"
    tm.save_hf(model, path)
    shutil.copyfile(cm.V1_TOKENIZER, path / "tokenizer.model")
    return path


def test_chat_drops_oldest_turns_to_fit_max_seq_len(short_chat_model):
    """Each reply is the engine's reply to the history that fits: the oldest exchanges go
    first, the system prompt stays, and a notice says so."""
    engine = mc.Engine.from_pretrained(short_chat_model, device="cpu", progress=False)
    system = [{"role": "system", "content": "Be brief."}]
    users = ["Hello there", "How are you today?", "Tell me about cheese.", "And about bread?", "Thanks!"]
    history, replies, drops = [], [], 0
    params = mc.SamplingParams(**CHAT_PARAMS)
    for user in users:
        history.append({"role": "user", "content": user})
        while len(engine.tokenizer.encode_chat(system + history)) + params.max_tokens > 64 and len(history) > 1:
            del history[:2]
            drops += 1
        reply = engine.chat(system + history, params).text
        replies.append(reply)
        history.append({"role": "assistant", "content": reply})
    assert drops >= 2, "the test conversation should outgrow max_seq_len"

    r = run_cli("chat", short_chat_model, "--system", "Be brief.", *CHAT_FLAGS, stdin="\n".join(users) + "\n")
    assert_ok(r)
    assert "dropped the oldest" in r.stderr and "system prompt is kept" in r.stderr, describe(r)
    position = 0
    for reply in replies:
        assert reply.strip(), "empty reference reply"
        found = r.stdout.find(reply.strip(), position)
        assert found >= 0, f"reply {reply!r} not found in order\n{describe(r)}"
        position = found + len(reply.strip())
