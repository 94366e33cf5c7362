"""Engine.generate / stream / chat on tiny random Mistral models shipping a real tokenizer
(see chat_models.py): greedy decoding against engine.logits and transformers, seeded
sampling (reproducible, independent of batch companions), finishing (EOS, stop ids, stop
strings, max_tokens), logprobs, streaming, chat templates and the tokenizer-less case.

Where the exact text convention is open (e.g. whether the first generated token's leading
space is kept), expectations are built from the engine's own outputs for the same tokens
(a shorter max_tokens run, the non-streaming run) rather than from a decoding rule.
"""

from __future__ import annotations

import pytest
import torch

import chat_models as cm
import mistral_cuda as mc
import tiny_models as tm

PROMPT_A = "The weather today is sunny and warm."
PROMPT_B = "Once upon a time, in a land far away, there lived a"
PROMPT_C = "Hi"
# 45 random ids (plain pieces, no control/byte tokens) after BOS: longer than the window (16).
LONG_IDS = [cm.BOS_ID] + [300 + t for t in tm.random_ids(45, 31000, tm.seed_of("long-ids"))]
SHORT_IDS = [cm.BOS_ID, 1014, 28705]


def P(**kw) -> "mc.SamplingParams":
    return mc.SamplingParams(**kw)


def greedy(n: int, **kw) -> "mc.SamplingParams":
    kw.setdefault("ignore_eos", True)
    return mc.SamplingParams(max_tokens=n, temperature=0.0, **kw)


def sampled(n: int, seed: int, **kw) -> "mc.SamplingParams":
    kw.setdefault("ignore_eos", True)
    kw.setdefault("temperature", 1.0)
    return mc.SamplingParams(max_tokens=n, seed=seed, **kw)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("v1", tmp_path_factory)


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("v3", tmp_path_factory)


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("eos", tmp_path_factory)


@pytest.fixture(scope="module")
def notok(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("notok", tmp_path_factory)


@pytest.fixture(scope="module")
def engine(v1):
    return cm.load_engine(v1)


@pytest.fixture(scope="module")
def engine_v3(v3):
    return cm.load_engine(v3)


@pytest.fixture(scope="module")
def engine_eos(eos_model):
    return cm.load_engine(eos_model)


@pytest.fixture(scope="module")
def engine_notok(notok):
    return cm.load_engine(notok)


def gen1(engine, prompt, params):
    outs = engine.generate(prompt, params)
    assert isinstance(outs, list) and len(outs) == 1
    return outs[0]


def check_output(out, params=None):
    """Field types and basic invariants of a CompletionOutput."""
    assert isinstance(out.text, str)
    assert isinstance(out.token_ids, list) and all(type(t) is int for t in out.token_ids)
    assert isinstance(out.prompt_token_ids, list) and all(type(t) is int for t in out.prompt_token_ids)
    assert out.finish_reason in ("stop", "length")
    assert len(out.token_ids) >= 1
    if params is not None:
        assert len(out.token_ids) <= params.max_tokens
        if out.finish_reason == "length":
            assert len(out.token_ids) == params.max_tokens
        if params.logprobs is None:
            assert out.logprobs is None


def pick_stop_string(text: str, length: int = 3) -> tuple[str, int]:
    """A substring of ``text`` from its middle that does not occur earlier, has no
    replacement character and is not only whitespace: (stop string, its index)."""
    for start in list(range(len(text) // 2, len(text) - length)) + list(range(1, len(text) // 2)):
        s = text[start : start + length]
        if "\ufffd" in s or not s.strip():
            continue
        if text.find(s) == start:
            return s, start
    raise AssertionError(f"no usable stop string in {text!r}")


# --------------------------------------------------------------------------------------
# Tokenizer pick-up
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["v1", "v3"])
def test_tokenizer_picked_up_from_model_dir(which, request):
    eng = request.getfixturevalue("engine" if which == "v1" else "engine_v3")
    tok = eng.tokenizer
    assert tok is not None
    assert isinstance(tok, mc.Tokenizer)
    assert tok.bos_id == cm.BOS_ID and tok.eos_id == cm.EOS_ID
    ref = mc.Tokenizer.from_file(request.getfixturevalue(which).tokenizer_file)
    assert tok.encode(PROMPT_A, bos=True) == ref.encode(PROMPT_A, bos=True)
    assert tok.version == ref.version


def test_tokenizer_argument_path_and_object(notok, v1):
    for arg in (str(v1.tokenizer_file), mc.Tokenizer.from_file(v1.tokenizer_file)):
        eng = cm.load_engine(notok, tokenizer=arg)
        assert eng.tokenizer is not None
        assert eng.tokenizer.encode(PROMPT_A, bos=True) == mc.Tokenizer.from_file(v1.tokenizer_file).encode(
            PROMPT_A, bos=True
        )
        out = gen1(eng, PROMPT_A, greedy(5))
        assert out.prompt_token_ids == eng.tokenizer.encode(PROMPT_A, bos=True)


# --------------------------------------------------------------------------------------
# No tokenizer
# --------------------------------------------------------------------------------------


def test_no_tokenizer_id_prompts_work(engine_notok, engine):
    assert engine_notok.tokenizer is None
    out = gen1(engine_notok, SHORT_IDS, greedy(8))
    assert out.prompt_token_ids == SHORT_IDS
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    # Same weights as the v1 model: same greedy tokens.
    assert out.token_ids == gen1(engine, SHORT_IDS, greedy(8)).token_ids
    outs = engine_notok.generate([SHORT_IDS, LONG_IDS], [greedy(3), sampled(6, seed=1)])
    assert [len(o.token_ids) for o in outs] == [3, 6]


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.generate("hello", greedy(4)),
        lambda e: e.generate(["hello", "world"], greedy(4)),
        lambda e: list(e.stream("hello", greedy(4))),
        lambda e: e.chat([{"role": "user", "content": "hello"}], greedy(4)),
    ],
    ids=["generate-str", "generate-list-of-str", "stream-str", "chat"],
)
def test_no_tokenizer_text_operations_raise(call, engine_notok):
    with pytest.raises(mc.InvalidRequestError, match="(?i)tokenizer"):
        call(engine_notok)
    # The engine is still usable afterwards.
    assert len(gen1(engine_notok, SHORT_IDS, greedy(2)).token_ids) == 2


# --------------------------------------------------------------------------------------
# Prompt forms and outputs
# --------------------------------------------------------------------------------------


def test_prompt_forms(engine):
    tok = engine.tokenizer
    p = greedy(6)
    a = gen1(engine, PROMPT_A, p)
    check_output(a, p)
    assert a.prompt_token_ids == tok.encode(PROMPT_A, bos=True)
    assert a.prompt_token_ids[0] == cm.BOS_ID

    outs = engine.generate([PROMPT_A, PROMPT_B], p)
    assert len(outs) == 2
    assert outs[0].prompt_token_ids == a.prompt_token_ids
    assert outs[1].prompt_token_ids == tok.encode(PROMPT_B, bos=True)
    assert outs[0].token_ids == a.token_ids and outs[0].text == a.text
    assert outs[1].token_ids == gen1(engine, PROMPT_B, p).token_ids

    ids = gen1(engine, a.prompt_token_ids, p)
    assert ids.prompt_token_ids == a.prompt_token_ids
    assert ids.token_ids == a.token_ids and ids.text == a.text

    outs = engine.generate([SHORT_IDS, LONG_IDS, a.prompt_token_ids], p)
    assert len(outs) == 3
    assert [o.prompt_token_ids for o in outs] == [SHORT_IDS, LONG_IDS, a.prompt_token_ids]
    assert outs[2].token_ids == a.token_ids
    for o in outs:
        check_output(o, p)


def test_default_params(engine):
    out = gen1(engine, PROMPT_A, None)
    check_output(out, mc.SamplingParams())
    assert out.logprobs is None


def test_text_is_the_decoding_of_the_tokens(engine):
    """For a max_tokens finish, the text is the tokenizer's decoding of token_ids (up to
    the leading whitespace convention of the first token)."""
    for seed in (0, 1):
        out = gen1(engine, PROMPT_B, sampled(25, seed))
        assert out.finish_reason == "length"
        assert out.text.lstrip() == engine.tokenizer.decode(out.token_ids).lstrip()


# --------------------------------------------------------------------------------------
# Greedy = argmax of the logits, step by step
# --------------------------------------------------------------------------------------


def _assert_is_argmax(row: torch.Tensor, t: int, what: str) -> None:
    """t is the argmax of row, or within float noise of it (near-ties)."""
    row = row.to(torch.float64)
    best = int(row.argmax())
    if t != best:
        tol = 2e-5 * float(row.abs().max()) + 1e-6
        gap = float(row[best] - row[t])
        assert gap <= tol, f"{what}: generated {t} (logit {row[t]:.6f}) but argmax is {best} (logit {row[best]:.6f})"


@pytest.mark.parametrize("prompt", [PROMPT_A, LONG_IDS], ids=["text", "long-ids"])
def test_greedy_equals_argmax_of_logits(prompt, engine, v1):
    n = 40  # prompt + 40 tokens: the 16-token window's ring wraps several times
    out = gen1(engine, prompt, greedy(n))
    assert out.finish_reason == "length" and len(out.token_ids) == n
    ids = out.prompt_token_ids
    if isinstance(prompt, list):
        assert ids == prompt
    gen = out.token_ids
    for k in range(n):
        row = engine.logits(ids + gen[:k])[-1]
        _assert_is_argmax(row, gen[k], f"engine.logits step {k}")
    ref = v1.reference_logits(ids + gen)[len(ids) - 1 : -1]
    for k in range(n):
        _assert_is_argmax(ref[k], gen[k], f"transformers step {k}")


def test_greedy_v3(engine_v3, v3):
    out = gen1(engine_v3, PROMPT_B, greedy(20))
    ids, gen = out.prompt_token_ids, out.token_ids
    assert ids == engine_v3.tokenizer.encode(PROMPT_B, bos=True)
    ref = v3.reference_logits(ids + gen)[len(ids) - 1 : -1]
    for k in range(len(gen)):
        _assert_is_argmax(ref[k], gen[k], f"v3 transformers step {k}")


# --------------------------------------------------------------------------------------
# Seeded sampling
# --------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(engine):
    p = sampled(30, seed=123, top_p=0.95)
    a = gen1(engine, PROMPT_A, p)
    b = gen1(engine, PROMPT_A, p)
    assert a.token_ids == b.token_ids and a.text == b.text
    others = [gen1(engine, PROMPT_A, sampled(30, seed=s, top_p=0.95)).token_ids for s in (124, 125)]
    assert any(o != a.token_ids for o in others), "three seeds gave the same 30 sampled tokens"
    g = gen1(engine, PROMPT_A, greedy(30)).token_ids
    assert a.token_ids != g, "temperature-1 sampling gave exactly the greedy tokens"


def test_seeded_sampling_independent_of_batch_companions(engine):
    pa = sampled(24, seed=11, top_p=0.9, top_k=100)
    pb = sampled(13, seed=22, temperature=0.7, min_p=0.05)
    pc = greedy(30)
    pd = sampled(40, seed=11, repetition_penalty=1.2)
    solo_a = gen1(engine, PROMPT_A, pa)
    solo_b = gen1(engine, LONG_IDS, pb)
    solo_c = gen1(engine, PROMPT_C, pc)
    solo_d = gen1(engine, SHORT_IDS, pd)
    for prompts, params, expected in [
        ([PROMPT_A, LONG_IDS], [pa, pb], [solo_a, solo_b]),
        ([LONG_IDS, PROMPT_A], [pb, pa], [solo_b, solo_a]),
        ([PROMPT_C, PROMPT_A, SHORT_IDS, LONG_IDS], [pc, pa, pd, pb], [solo_c, solo_a, solo_d, solo_b]),
    ]:
        outs = engine.generate(prompts, params)
        assert len(outs) == len(prompts)
        for i, (o, e) in enumerate(zip(outs, expected)):
            assert o.prompt_token_ids == e.prompt_token_ids, f"prompt {i}"
            assert o.token_ids == e.token_ids, f"prompt {i} of {len(prompts)}: tokens differ from its solo run"
            assert o.text == e.text
            assert o.finish_reason == e.finish_reason


def test_same_seed_same_prompt_twice_in_a_batch(engine):
    """The per-prompt seed is params.seed itself, not offset by the prompt's index."""
    p = sampled(20, seed=7)
    outs = engine.generate([PROMPT_B, PROMPT_B, PROMPT_B], p)
    solo = gen1(engine, PROMPT_B, p)
    for o in outs:
        assert o.token_ids == solo.token_ids


# --------------------------------------------------------------------------------------
# Several prompts finishing on their own
# --------------------------------------------------------------------------------------


def test_multi_prompt_mixed_lengths_finish_on_their_own(engine):
    prompts = [PROMPT_A, LONG_IDS, PROMPT_C, SHORT_IDS]
    full = gen1(engine, PROMPT_C, greedy(30))
    stop_id = full.token_ids[9]
    j = full.token_ids.index(stop_id)
    params = [
        greedy(3),
        sampled(17, seed=5),
        greedy(30, stop_token_ids=[stop_id]),
        greedy(25),
    ]
    outs = engine.generate(prompts, params)
    assert len(outs) == 4
    assert [len(o.token_ids) for o in outs] == [3, 17, j + 1, 25]
    assert [o.finish_reason for o in outs] == ["length", "length", "stop", "length"]
    for prompt, p, o in zip(prompts, params, outs):
        check_output(o, p)
        solo = gen1(engine, prompt, p)
        assert o.token_ids == solo.token_ids and o.text == solo.text


# --------------------------------------------------------------------------------------
# Stop ids, stop strings, EOS
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [None, 3])
def test_stop_token_id(seed, engine):
    base = greedy(40) if seed is None else sampled(40, seed)
    full = gen1(engine, PROMPT_A, base)
    # An id first emitted in the middle of the output.
    j = next(i for i in range(len(full.token_ids) // 2, len(full.token_ids)) if full.token_ids.index(full.token_ids[i]) == i)
    stop_id = full.token_ids[j]
    kw = dict(max_tokens=40, temperature=base.temperature, seed=seed, ignore_eos=True)
    distractor = next(x for x in range(31999, 0, -1) if x not in full.token_ids)
    p = P(stop_token_ids=[distractor, stop_id], **kw)
    out = gen1(engine, PROMPT_A, p)
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: j + 1]
    assert out.token_ids[-1] == stop_id
    # The stop id adds no text: the text is that of the tokens before it.
    before = gen1(engine, PROMPT_A, P(**{**kw, "max_tokens": j}))
    assert out.text == before.text
    assert "".join(engine.stream(PROMPT_A, p)) == out.text


def _check_stop_string(engine, prompt, kw):
    full = gen1(engine, prompt, P(**kw))
    assert full.finish_reason == "length"
    stop, start = pick_stop_string(full.text)
    p = P(stop=["@@never@@", stop], **kw)
    out = gen1(engine, prompt, p)
    assert out.finish_reason == "stop", f"stop string {stop!r} (in {full.text!r}) did not stop generation"
    assert out.text == full.text[:start], f"stop {stop!r}"
    assert stop not in out.text
    n = len(out.token_ids)
    assert out.token_ids == full.token_ids[:n]
    # The last token is the one completing the stop string.
    assert stop in gen1(engine, prompt, P(**{**kw, "max_tokens": n})).text
    if n > 1:
        assert stop not in gen1(engine, prompt, P(**{**kw, "max_tokens": n - 1})).text
    # A single string works like a one-element list.
    single = gen1(engine, prompt, P(stop=stop, **kw))
    assert single.token_ids == out.token_ids and single.text == out.text
    return out, p


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_stop_string(seed, engine):
    if seed is None:
        kw = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    else:
        kw = dict(max_tokens=40, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
    _check_stop_string(engine, PROMPT_B, kw)


def test_stop_string_spanning_tokens(engine):
    """A longer stop string (8 characters) usually spans a token boundary."""
    kw = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = gen1(engine, PROMPT_A, P(**kw))
    stop, start = pick_stop_string(full.text, length=8)
    out = gen1(engine, PROMPT_A, P(stop=[stop], **kw))
    assert out.finish_reason == "stop"
    assert out.text == full.text[:start]
    assert "".join(engine.stream(PROMPT_A, P(stop=[stop], **kw))) == out.text


def test_eos_stops_generation(engine_eos, eos_model):
    step = eos_model.eos_step
    before = eos_model.greedy_before_eos
    p = P(max_tokens=30, temperature=0.0)
    out = gen1(engine_eos, cm.EOS_PROMPT_IDS, p)
    assert out.finish_reason == "stop"
    assert out.token_ids == before + [cm.EOS_ID]
    assert out.text == gen1(engine_eos, cm.EOS_PROMPT_IDS, P(max_tokens=step, temperature=0.0)).text
    assert "".join(engine_eos.stream(cm.EOS_PROMPT_IDS, p)) == out.text
    # ... and with logprobs, one entry per token, EOS included.
    lp = gen1(engine_eos, cm.EOS_PROMPT_IDS, P(max_tokens=30, temperature=0.0, logprobs=2))
    assert lp.token_ids == out.token_ids
    assert [e.token_id for e in lp.logprobs] == out.token_ids


def test_ignore_eos(engine_eos, eos_model):
    step = eos_model.eos_step
    p = P(max_tokens=step + 5, temperature=0.0, ignore_eos=True)
    out = gen1(engine_eos, cm.EOS_PROMPT_IDS, p)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == step + 5
    assert out.token_ids[: step + 1] == eos_model.greedy_before_eos + [cm.EOS_ID]
    assert "".join(engine_eos.stream(cm.EOS_PROMPT_IDS, p)) == out.text


def test_eos_in_a_batch(engine_eos, eos_model):
    """The EOS prompt stops early while its companions run to max_tokens."""
    p_eos = P(max_tokens=30, temperature=0.0)
    outs = engine_eos.generate(
        [PROMPT_B, cm.EOS_PROMPT_IDS, LONG_IDS], [greedy(20), p_eos, sampled(25, seed=4)]
    )
    assert outs[1].finish_reason == "stop"
    assert outs[1].token_ids == eos_model.greedy_before_eos + [cm.EOS_ID]
    assert [len(outs[0].token_ids), len(outs[2].token_ids)] == [20, 25]
    assert outs[2].token_ids == gen1(engine_eos, LONG_IDS, sampled(25, seed=4)).token_ids


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_generate(seed, engine):
    p = sampled(30, seed, top_p=0.95)
    deltas = list(engine.stream(PROMPT_A, p))
    assert all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == gen1(engine, PROMPT_A, p).text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_generate_with_stop_strings(seed, engine):
    out, p = _check_stop_string(engine, PROMPT_A, dict(max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True))
    deltas = list(engine.stream(PROMPT_A, p))
    assert all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == out.text  # the stop string (cut from out.text) is never emitted


def test_stream_greedy_ids_prompt_and_v3(engine, engine_v3):
    p = greedy(30)
    assert "".join(engine.stream(LONG_IDS, p)) == gen1(engine, LONG_IDS, p).text
    assert "".join(engine_v3.stream(PROMPT_B, p)) == gen1(engine_v3, PROMPT_B, p).text


# --------------------------------------------------------------------------------------
# Logprobs
# --------------------------------------------------------------------------------------


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.0, logprobs=5),
        dict(temperature=0.7, top_k=50, repetition_penalty=1.3, seed=9, logprobs=3),
        dict(temperature=1.5, seed=10, logprobs=1),
    ],
    ids=["greedy", "penalty-temperature", "hot"],
)
def test_logprobs(kw, engine):
    """Each entry: the chosen token and its log-softmax of the raw model logits (before
    penalty and temperature), and the k most likely tokens under the same log-softmax,
    most likely first."""
    p = P(max_tokens=15, ignore_eos=True, **kw)
    out = gen1(engine, PROMPT_A, p)
    k = kw["logprobs"]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 15
    ids = out.prompt_token_ids
    for i, (entry, t) in enumerate(zip(out.logprobs, out.token_ids)):
        ref = torch.log_softmax(engine.logits(ids + out.token_ids[:i])[-1].to(torch.float64), dim=-1)
        assert entry.token_id == t
        assert isinstance(entry.logprob, float)
        assert _close(entry.logprob, float(ref[t])), f"step {i}: logprob {entry.logprob} vs {float(ref[t])}"
        top = entry.top_logprobs
        # The k most likely tokens, plus the sampled one when it is not among them (vLLM).
        assert isinstance(top, dict) and t in top, f"step {i}: sampled {t} missing from {top}"
        best = {key: v for key, v in top.items() if key != t or len(top) == k}
        assert len(top) in (k, k + 1) and len(best) == k, f"step {i}: {top}"
        assert entry.rank == 1 + int((ref > ref[t]).sum()), f"step {i}: rank {entry.rank}"
        keys, vals = list(best.keys()), list(best.values())
        assert all(type(key) is int for key in keys)
        assert vals == sorted(vals, reverse=True), f"step {i}: top_logprobs not sorted: {top}"
        assert int(ref.argmax()) in top, f"step {i}: argmax {int(ref.argmax())} missing from {top}"
        kth = float(torch.topk(ref, k).values[-1])
        for key, v in best.items():
            assert _close(v, float(ref[key])), f"step {i}: top_logprobs[{key}] = {v} vs {float(ref[key])}"
            assert float(ref[key]) >= kth - 1e-5, f"step {i}: {key} is not among the top {k}"
        if kw["temperature"] == 0:
            assert keys[0] == t and _close(vals[0], entry.logprob)


def test_logprobs_zero_and_none(engine):
    out = gen1(engine, PROMPT_C, greedy(5, logprobs=0))
    assert len(out.logprobs) == 5
    assert all(e.top_logprobs == {e.token_id: e.logprob} for e in out.logprobs)
    assert [e.token_id for e in out.logprobs] == out.token_ids
    assert gen1(engine, PROMPT_C, greedy(5)).logprobs is None


def test_logprobs_with_stop_string_and_batch(engine):
    kw = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = gen1(engine, PROMPT_B, P(**kw))
    stop, _ = pick_stop_string(full.text)
    outs = engine.generate([PROMPT_B, PROMPT_A], [P(stop=[stop], logprobs=2, **kw), greedy(10)])
    assert outs[0].finish_reason == "stop"
    assert [e.token_id for e in outs[0].logprobs] == outs[0].token_ids
    assert outs[1].logprobs is None


# --------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------

ONE_TURN = [{"role": "user", "content": "Hello, how are you?"}]
MULTI_TURN = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "Tell me a story about a cat."},
]


@pytest.mark.parametrize("which", ["v1", "v3"])
@pytest.mark.parametrize("messages", [ONE_TURN, MULTI_TURN], ids=["one-turn", "multi-turn"])
def test_chat_prompt_is_encode_chat(which, messages, request):
    eng = request.getfixturevalue("engine" if which == "v1" else "engine_v3")
    p = greedy(12)
    out = eng.chat(messages, p)
    check_output(out, p)
    expected = eng.tokenizer.encode_chat(messages, safe_prompt=False)
    assert out.prompt_token_ids == expected
    plain = gen1(eng, expected, p)
    assert out.token_ids == plain.token_ids and out.text == plain.text

    safe = eng.chat(messages, p, safe_prompt=True)
    assert safe.prompt_token_ids == eng.tokenizer.encode_chat(messages, safe_prompt=True)
    assert safe.prompt_token_ids != expected


def test_chat_default_params_and_sampling(engine):
    out = engine.chat(ONE_TURN)
    check_output(out, mc.SamplingParams())
    p = sampled(10, seed=5)
    a = engine.chat(MULTI_TURN, p)
    assert a.token_ids == engine.chat(MULTI_TURN, p).token_ids
    assert a.token_ids == gen1(engine, engine.tokenizer.encode_chat(MULTI_TURN), p).token_ids
