"""Moderation guards: refused prompts, and outputs cut where blocked content starts, streamed
and not, never leaking any of the blocked span. Outputs come from a scripted model
(scripted_model.py), so the text under test is known in advance; the expected cut is computed
here with plain `re` on that text."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

import mistral_common

import chat_models as cm
import mistral_cuda as mc
from mistral_cuda.guards import MODERATION_CATEGORIES, NOT_MODERATED, self_reflection_prompt
from scripted_model import ScriptedModel, engine_on

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {
    "v1": DATA / "tokenizer.model.v1",
    "v3": DATA / "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": DATA / "tekken_240718.json",
}
GREEDY = mc.SamplingParams(max_tokens=400, temperature=0.0)
ASK = [{"role": "user", "content": "Tell me something."}]

_cache: dict = {}


def tokenizer(name: str) -> mc.Tokenizer:
    if name not in _cache:
        _cache[name] = mc.Tokenizer.from_file(FILES[name])
    return _cache[name]


def continuation(tok, prompt_ids, ids) -> str:
    head = tok.decode(list(prompt_ids))
    return tok.decode(list(prompt_ids) + list(ids))[len(head) :]


def char_tokens(tok, text: str) -> list:
    """`text` as one token per character where the vocabulary allows (Tekken: single-character
    tokens; SentencePiece: each character's own piece or its bytes), so that blocked words
    arrive split over many tokens."""
    if tok.is_tekken:
        return [i for ch in text for i in tok.encode(ch, bos=False)]
    sp = tok._sp
    ids = []
    for ch in text:
        piece = "\u2581" if ch == " " else ch
        i = sp.piece_to_id(piece)
        if i == sp.unk_id() or tok.is_control(i):
            ids += [sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
        else:
            ids.append(i)
    return ids


def chat_engine(tok, messages, output_ids):
    model = ScriptedModel(tok.vocab_size, tok.eos_id, {tuple(tok.encode_chat(messages)): output_ids})
    return engine_on(model, tok), model


def first_block(patterns, text: str):
    starts = [m.start() for m in (p.search(text) for p in patterns) if m]
    return min(starts, default=None)


def stream_checked(stream, final_text_prefix_of: str) -> list:
    """Deltas of a stream, checking after each that what was streamed so far is a prefix of
    the text that may be shown."""
    deltas, so_far = [], ""
    for d in stream:
        deltas.append(d)
        so_far += d
        assert final_text_prefix_of.startswith(so_far), (so_far, final_text_prefix_of)
    return deltas


# --------------------------------------------------------------------------------------
# Protocol and exports
# --------------------------------------------------------------------------------------


def test_exports_and_error_type():
    assert issubclass(mc.ContentFilteredError, mc.InvalidRequestError)
    assert issubclass(mc.ContentFilteredError, ValueError)
    g = mc.Guard()
    assert g.check_prompt(ASK) is None and g.check_output("anything") is None
    assert mc.KeywordGuard(["bomb"]).hold == 3
    assert mc.KeywordGuard(["bomb", re.compile(r"\d{3}-\d{4}")]).hold == 7
    assert mc.KeywordGuard([re.compile(r"kill\w*")]).hold is None  # unbounded: hold everything
    with pytest.raises(TypeError):
        mc.KeywordGuard([3])
    with pytest.raises(ValueError):
        mc.KeywordGuard([])
    tok = tokenizer("v3")
    engine, _ = chat_engine(tok, ASK, tok.encode("x", bos=False))
    with pytest.raises(TypeError, match="check_prompt"):
        engine.chat(ASK, GREEDY, guard=object())


def test_keyword_guard_matching():
    g = mc.KeywordGuard(["bomb", "credit card", re.compile(r"\b\d{3}-\d{4}\b")])
    assert g.check_output("How to build a BOMB?") == 15
    assert g.check_output("bombastic and abomb") is None  # whole words only
    assert g.check_output("my Credit  card") is None and g.check_output("my credit card") == 3
    assert g.check_output("call 555-1234 now") == 5
    assert g.check_output("bomb then 555-1234") == 0  # the earliest match
    assert g.check_prompt([{"role": "system", "content": "ok"}, {"role": "user", "content": [
        {"type": "text", "text": "a bomb"}]}]) == "message 1 contains blocked content 'bomb'"  # fmt: skip
    assert g.check_prompt([{"role": "user", "content": "fine"}]) is None


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_blocked_prompt_raises_before_generating(name):
    tok = tokenizer(name)
    guard = mc.KeywordGuard(["forbidden"])
    bad = [{"role": "user", "content": "tell me the Forbidden thing"}]
    engine, model = chat_engine(tok, ASK, tok.encode("fine", bos=False))
    for call in (lambda: engine.chat(bad, GREEDY, guard=guard),
                 lambda: engine.stream_chat(bad, GREEDY, guard=[mc.Guard(), guard]),
                 lambda: engine.generate(["the forbidden word", "ok"], GREEDY, guard=guard),
                 lambda: engine.generate([tok.encode("a forbidden id prompt")], GREEDY, guard=guard),
                 lambda: engine.stream("forbidden", GREEDY, guard=guard)):  # fmt: skip
        with pytest.raises(mc.ContentFilteredError, match="KeywordGuard: message 0 contains blocked content"):
            call()
    assert model.prompts_seen == []  # nothing ran
    assert engine.chat(ASK, GREEDY, guard=guard).finish_reason == "stop"


# --------------------------------------------------------------------------------------
# Outputs: cut where blocked content starts, never leaked
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
@pytest.mark.parametrize("split", ["natural", "chars"])
def test_blocked_output_stops_and_never_leaks(name, split):
    tok = tokenizer(name)
    text = "Sure. Here is how to build a BOMB at home, step by step: first, gather things."
    ids = tok.encode(text, bos=False) if split == "natural" else char_tokens(tok, text)
    engine, model = chat_engine(tok, ASK, ids)
    guard = mc.KeywordGuard(["bomb"])
    prompt = tok.encode_chat(ASK)
    full = continuation(tok, prompt, ids)
    allowed = full[: first_block(guard.patterns, full)]
    assert "BOMB" not in allowed and allowed.rstrip().endswith("build a")

    out = engine.chat(ASK, GREEDY, guard=guard)
    assert out.finish_reason == "content_filter" and out.text == allowed
    assert len(out.token_ids) < len(ids)  # generation stopped there
    stream = engine.stream_chat(ASK, GREEDY, guard=guard)
    deltas = stream_checked(stream, allowed)
    assert "".join(deltas) == allowed == stream.output.text
    assert stream.output.finish_reason == "content_filter"
    assert len(deltas) > 3  # text before the blocked span was streamed as it came
    # plain completion too
    (plain,) = engine.generate([prompt], GREEDY, guard=guard)
    assert plain.finish_reason == "content_filter" and plain.text == allowed
    plain_stream = engine.stream(prompt, GREEDY, guard=guard)
    assert "".join(stream_checked(plain_stream, allowed)) == allowed
    assert model.live_sequences() == 0


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "secret", "code", "x", "€uro", "漢", "字", "1-2", "\n", ","]
BLOCKED = ["nuke", "NUKE", "secret code", "漢字", "12-34"]


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_random_outputs_never_leak_a_blocked_span(name):
    """Random texts with blocked words and numbers at random places, tokenized naturally or one
    character per token; stream and non-stream output must both be the text before the first
    match, and every streamed prefix must be a prefix of it."""
    tok = tokenizer(name)
    rng = random.Random(name)
    guard = mc.KeywordGuard(["nuke", "secret code", "漢字", re.compile(r"\d{2}-\d{2}")])
    prompt = tok.encode_chat(ASK)
    blocked = 0
    for trial in range(40):
        parts = [rng.choice(BLOCKED) if rng.random() < 0.04 else rng.choice(WORDS) for _ in range(rng.randint(3, 25))]
        text = " ".join(parts)
        ids = tok.encode(text, bos=False) if trial % 2 else char_tokens(tok, text)
        engine, _ = chat_engine(tok, ASK, ids)
        full = continuation(tok, prompt, ids)
        start = first_block(guard.patterns, full)
        allowed = full if start is None else full[:start]
        out = engine.chat(ASK, GREEDY, guard=guard)
        assert out.text == allowed, (text, out.text)
        assert out.finish_reason == ("stop" if start is None else "content_filter")
        stream = engine.stream_chat(ASK, GREEDY, guard=guard)
        assert "".join(stream_checked(stream, allowed)) == allowed
        blocked += start is not None
    assert 10 < blocked < 40


def test_unbounded_pattern_holds_everything_until_the_end():
    tok = tokenizer("tekken")
    guard = mc.KeywordGuard([re.compile(r"kill\w*", re.IGNORECASE)])
    for text, allowed in [("we must not killers here", "we must not "), ("a peaceful text", "a peaceful text")]:
        ids = char_tokens(tok, text)
        engine, _ = chat_engine(tok, ASK, ids)
        stream = engine.stream_chat(ASK, GREEDY, guard=guard)
        deltas = stream_checked(stream, allowed)
        assert deltas == ([allowed] if allowed else [])  # one delta, at the end
        assert stream.output.text == allowed


class WholeOutputGuard(mc.Guard):
    """A guard that judges only complete outputs (hold None): records what it was shown."""

    hold = None

    def __init__(self, block: str):
        self.block = block
        self.seen = []

    def check_output(self, text):
        self.seen.append(text)
        return 0 if self.block in text else None


def test_whole_output_guard_sees_the_complete_text_once():
    tok = tokenizer("v3")
    text = "One two three. Bad ending."
    ids = tok.encode(text, bos=False)
    engine, _ = chat_engine(tok, ASK, ids)
    full = continuation(tok, tok.encode_chat(ASK), ids)
    for block, allowed, reason in [("Bad", "", "content_filter"), ("absent", full, "stop")]:
        guard = WholeOutputGuard(block)
        out = engine.chat(ASK, GREEDY, guard=guard)
        assert guard.seen == [full] and (out.text, out.finish_reason) == (allowed, reason)
        guard = WholeOutputGuard(block)
        stream = engine.stream_chat(ASK, GREEDY, guard=[mc.KeywordGuard(["zzz"]), guard])
        assert list(stream) == ([allowed] if allowed else []) and guard.seen == [full]


def test_stop_strings_and_guards_together():
    tok = tokenizer("tekken")
    text = "keep this STOP then bomb"
    ids = char_tokens(tok, text)
    engine, _ = chat_engine(tok, ASK, ids)
    params = mc.SamplingParams(max_tokens=400, temperature=0.0, stop=["STOP"])
    out = engine.chat(ASK, params, guard=mc.KeywordGuard(["bomb"]))
    assert (out.text, out.finish_reason) == ("keep this ", "stop")
    out = engine.chat(ASK, params, guard=mc.KeywordGuard(["this"]))
    assert (out.text, out.finish_reason) == ("keep ", "content_filter")


def test_tool_call_output_is_guarded_too():
    tok = tokenizer("v3")
    ids = [tok.tool_call_token, *tok.encode('[{"name": "launch_nuke", "arguments": {}}]', bos=False)]
    engine, _ = chat_engine(tok, ASK, ids + [tok.eos_id])
    out = engine.chat(ASK, GREEDY, guard=mc.KeywordGuard([re.compile("nuke")]))
    assert out.finish_reason == "content_filter" and out.tool_calls is None and "nuke" not in out.text
    assert list(engine.stream_chat(ASK, GREEDY, guard=mc.KeywordGuard([re.compile("nuke")]))) in ([], [out.text])


# --------------------------------------------------------------------------------------
# Self-reflection
# --------------------------------------------------------------------------------------


def test_self_reflection_prompt_lists_mistral_categories():
    prompt = self_reflection_prompt("some text")
    for name in ["illegal", "child abuse", "hate violence harassment", "malware", "physical harm",
                 "economic harm", "fraud", "adult", "political", "privacy", "unqualified law",
                 "unqualified financial", "unqualified health"]:  # fmt: skip
        assert f"- {name}: " in prompt
    assert len(MODERATION_CATEGORIES) == 13
    assert f'"{NOT_MODERATED}"' in prompt and prompt.endswith("Text: some text")


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_self_reflection_guard_with_a_scripted_classifier(name):
    tok = tokenizer(name)
    answer_text = "Here is the plan you asked for."
    answer = tok.encode(answer_text, bos=False)
    user = {"role": "user", "content": "Plan a scam for me."}
    model = ScriptedModel(tok.vocab_size, tok.eos_id, {})
    engine = engine_on(model, tok)

    def classified_as(text, verdict):
        msgs = [{"role": "user", "content": self_reflection_prompt(text)}]
        model.add_script(tok.encode_chat(msgs), tok.encode(verdict, bos=False))

    model.add_script(tok.encode_chat([user]), answer)
    guard = mc.SelfReflectionGuard(engine)
    full = continuation(tok, tok.encode_chat([user]), answer)

    classified_as("Plan a scam for me.", "Fraud.")
    with pytest.raises(mc.ContentFilteredError, match="self-reflection moderation: fraud"):
        engine.chat([user], GREEDY, guard=guard)

    classified_as("Plan a scam for me.", NOT_MODERATED)
    classified_as(full, '"unqualified financial"')
    out = engine.chat([user], GREEDY, guard=guard)
    assert (out.text, out.finish_reason) == ("", "content_filter")
    assert list(engine.stream_chat([user], GREEDY, guard=guard)) == []

    classified_as(full, "Not moderated.")
    out = engine.chat([user], GREEDY, guard=guard)
    assert (out.text, out.finish_reason) == (full, "stop")
    assert list(engine.stream_chat([user], GREEDY, guard=guard)) == [full]

    classified_as(full, "banana split")  # names no category: not blocked
    assert engine.chat([user], GREEDY, guard=guard).finish_reason == "stop"
    assert model.live_sequences() == 0


def test_self_reflection_guard_on_the_real_runner(tmp_path_factory):
    """A tiny random model moderates itself: the nested classification runs on the same C++
    runner while the guarded request's sequence is live; whatever it answers, the call ends
    cleanly and frees everything."""
    engine = cm.load_engine(cm.get_chat_model("v1", tmp_path_factory))
    guard = mc.SelfReflectionGuard(engine, params=mc.SamplingParams(max_tokens=4, temperature=0.0))
    params = mc.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    free_before = getattr(engine.model, "free_blocks", None)
    try:
        out = engine.chat(ASK, params, guard=guard)
    except mc.ContentFilteredError as e:
        assert "self-reflection moderation" in str(e)
    else:
        assert out.finish_reason in ("length", "content_filter")
        again = engine.chat(ASK, params, guard=guard)
        assert again.text == out.text and again.finish_reason == out.finish_reason
    assert getattr(engine.model, "free_blocks", None) == free_before


# --------------------------------------------------------------------------------------
# CLI flags
# --------------------------------------------------------------------------------------


def _cli(*args, stdin=None):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "mistral_cuda", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=180, env=env)  # fmt: skip


def test_cli_guard_flags(tmp_path_factory):
    v1 = cm.get_chat_model("v1", tmp_path_factory)
    flags = ["--device", "cpu", "--max-tokens", "6", "--temperature", "0", "--ignore-eos"]
    # a refused prompt: generate fails with the reason; chat says so and goes on
    r = _cli("generate", v1.path, "how to make a bomb", *flags, "--block-word", "bomb")
    assert r.returncode == 1 and "prompt refused by KeywordGuard" in r.stderr, r.stderr
    r = _cli("chat", v1.path, *flags, "--block-word", "bomb", stdin="a bomb?\nHello there\n")
    assert r.returncode == 0 and "[refused: " in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("finish:") == 1  # the second line was answered
    # a pattern the prompt does not match but gibberish does: the answer stops before it
    r = _cli("generate", v1.path, "x", *flags, "--block-regex", "[^x]")
    assert r.returncode == 0 and "finish: content_filter" in r.stderr, r.stderr
    assert set(r.stdout.strip()) <= {"x"}
    r = _cli("generate", v1.path, "Hello", *flags, "--block-regex", "(")
    assert r.returncode == 2 and "--block-regex" in r.stderr  # a usage error, before loading
