"""The core's scheduler and sampling op: continuous batching with admission, preemption and
abort; the sampling op against the readable Python reference (mc.sampling.reference_sample)
on random logits; vLLM's sampling semantics on hand-made distributions (an oracle written
here); the vLLM-shaped facade mc.LLM."""

from __future__ import annotations

import math

import pytest
import torch

import chat_models as cm
import mistral_cuda as mc
import tiny_models as tm
from mistral_cuda import _C
from mistral_cuda import sampling as S

requires_cuda = pytest.mark.skipif(
    not (_C.cuda_compiled() and _C.cuda_device_count() > 0), reason="needs an NVIDIA GPU and the CUDA backend"
)


# --------------------------------------------------------------------------------------
# The sampling op against the reference
# --------------------------------------------------------------------------------------


def _random_rows(n, V, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(n):
        pick = lambda options: options[int(torch.randint(0, len(options), (1,), generator=g))]  # noqa: E731
        history = torch.randperm(V, generator=g)[: int(torch.randint(0, 12, (1,), generator=g))].tolist()
        rows.append(S.SampleRow(
            temperature=pick([0.0, 0.3, 0.7, 1.0, 1.8]), top_k=pick([0, 1, 3, 40, V + 5]),
            top_p=pick([1.0, 0.95, 0.6, 0.2]), min_p=pick([0.0, 0.02, 0.3]),
            repetition_penalty=pick([1.0, 1.3, 0.8]), presence_penalty=pick([0.0, 0.5, -0.4]),
            frequency_penalty=pick([0.0, 0.25]), vocab_limit=pick([0, V - 7]),
            seed=int(torch.randint(0, 2**62, (1,), generator=g)), stream=pick([0, 1, 5]),
            position=int(torch.randint(0, 5000, (1,), generator=g)), logprobs=pick([-1, 0, 3, 20]),
            history_ids=history, output_counts=[int(c) for c in torch.randint(0, 3, (len(history),), generator=g)],
            logit_bias=[(int(torch.randint(0, V, (1,), generator=g)), 3.0)] if r % 3 == 0 else [],
            banned=[1, 2] if r % 4 == 1 else []))
    return rows


def _core_row(row: S.SampleRow) -> "_C.ops.SampleRow":
    out = _C.ops.SampleRow()
    for name, value in row.__dict__.items():
        setattr(out, name, value)
    return out


def _check_against_reference(device, V, seed, n=24, scale=3.0):
    rows = _random_rows(n, V, seed)
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(seed + 1)) * scale
    backend = _C.ops.Backend(device)
    got = backend.sample(logits.to(device), [_core_row(r) for r in rows])
    for r, (row, out) in enumerate(zip(rows, got)):
        token, logprob, rank, top = S.reference_sample(logits[r], row)
        assert out[0] == token, f"row {r} ({row}): sampled {out[0]}, reference {token}"
        if row.logprobs >= 0:
            assert out[2] == rank and math.isclose(out[1], logprob, rel_tol=1e-5, abs_tol=1e-5), f"row {r}"
            assert [i for i, _ in out[3]] == [i for i, _ in top], f"row {r}: top ids"
            assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) for (_, a), (_, b) in zip(out[3], top))


@pytest.mark.parametrize("V,seed", [(97, 1), (1000, 2), (32000, 3)])
def test_cpu_sample_op_equals_reference(V, seed):
    _check_against_reference("cpu", V, seed)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("V,seed", [(97, 4), (1000, 5), (32768, 6)])
def test_cuda_sample_op_equals_reference(V, seed):
    _check_against_reference("cuda", V, seed)


# --------------------------------------------------------------------------------------
# vLLM's semantics, on an oracle written here
# --------------------------------------------------------------------------------------


def oracle(probs, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """vLLM V1: temperature, then min-p, top-k and top-p in sequence, each renormalized."""
    p = torch.softmax(torch.log(torch.tensor(probs, dtype=torch.float64)) / temperature, 0)
    if min_p > 0:
        p = torch.where(p >= min_p * p.max(), p, torch.zeros_like(p))
        p = p / p.sum()
    if 0 < top_k < len(probs):
        kth = torch.sort(p, descending=True).values[top_k - 1]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum()
    if top_p < 1:
        order = sorted(range(len(probs)), key=lambda i: (-float(p[i]), i))
        keep, above = set(), 0.0
        for i in order:
            if above < top_p:
                keep.add(i)
            above += float(p[i])
        p = torch.tensor([float(p[i]) if i in keep else 0.0 for i in range(len(probs))], dtype=torch.float64)
        p = p / p.sum()
    return p


PROBS_B = [0.50, 0.20, 0.15, 0.10, 0.05]
SEQUENTIAL_CASES = [
    # Sequential (vLLM): top-p after the renormalized top-k keeps {0, 1} (intersecting both
    # judged on the full distribution would keep {0, 1, 2}).
    (dict(top_k=3, top_p=0.8), {0, 1}),
    (dict(min_p=0.25, top_p=0.7), {0, 1}),
    (dict(min_p=0.25, top_k=2), {0, 1}),
    (dict(temperature=0.5, top_p=0.9), {0, 1, 2}),
]


@pytest.mark.parametrize("kw,expected", SEQUENTIAL_CASES, ids=[str(c[0]) for c in SEQUENTIAL_CASES])
def test_filters_apply_in_sequence(kw, expected):
    q = oracle(PROBS_B, **kw)
    assert {i for i, v in enumerate(q.tolist()) if v > 0} == expected, "test bug: oracle"
    logits = torch.log(torch.tensor(PROBS_B, dtype=torch.float32))
    n = 3000
    draws = [S.reference_sample(logits, S.SampleRow(seed=s, **kw))[0] for s in range(n)]
    assert set(draws) <= expected
    for i in expected:
        want, got = float(q[i]), draws.count(i) / n
        assert abs(got - want) <= 5 * math.sqrt(want * (1 - want) / n) + 0.01, f"token {i}: {got} vs {want}"


def test_penalties_as_vllm_defines_them():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    row = S.SampleRow(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                      history_ids=[0, 1, 3], output_counts=[0, 2, 1], logit_bias=[(4, 1.5)])
    # 0: prompt only -> 2/2 = 1; 1: -1*2 - 0.5 - 0.5 = -3; 3: 3/2 - 0.5 - 0.25 = 0.75; 4: 1 + 1.5 = 2.5
    assert S.reference_sample(logits, row)[0] == 4
    row.logit_bias = []
    assert S.reference_sample(logits, row)[0] == 0  # 1.0 beats 0.75 and 0.5


def test_logprobs_include_sampled_token_with_rank():
    logits = torch.tensor([0.1, 2.0, 1.0, -3.0])
    token, logprob, rank, top = S.reference_sample(logits, S.SampleRow(temperature=0.0, banned=[1], logprobs=1))
    ref = torch.log_softmax(logits.double(), 0)
    assert token == 2 and rank == 2 and math.isclose(logprob, float(ref[2]), rel_tol=1e-6)
    assert [i for i, _ in top] == [1]


# --------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("v1", tmp_path_factory)


def _solo(path, prompt, params):
    """The request alone on a roomy engine: the reference for batched and preempted runs."""
    return cm.load_engine(path, num_blocks=256).generate([prompt], params)[0]


def test_more_requests_than_the_cache_holds_all_complete_as_alone(v1):
    """20 seeded requests of mixed lengths on a pool that holds a few at a time: all finish,
    with preemptions, each with exactly the tokens it gets alone."""
    engine = cm.load_engine(v1, num_blocks=14, block_size=4, max_num_seqs=8, max_num_batched_tokens=32)
    g = torch.Generator().manual_seed(3)
    prompts = [[cm.BOS_ID] + torch.randint(300, 30000, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 20, (20,), generator=g)]
    params = [mc.SamplingParams(max_tokens=int(m), seed=100 + i, temperature=0.9, ignore_eos=True)
              for i, m in enumerate(torch.randint(4, 12, (20,), generator=g))]
    outs = engine.generate(prompts, params)
    assert engine.scheduler.stats["preemptions"] > 0, "the pool was meant to force preemption"
    assert engine.model.free_blocks() == engine.model.num_blocks()
    for i in (0, 7, 13, 19):
        alone = _solo(v1.path, prompts[i], params[i])
        assert outs[i].token_ids == alone.token_ids, f"request {i}"
    assert all(len(o.token_ids) == p.max_tokens for o, p in zip(outs, params))


def test_request_too_large_for_the_pool_fails_alone(v1):
    """(The model's window of 16 bounds a sequence at a ring of 5 blocks of 4.)"""
    engine = cm.load_engine(v1, num_blocks=3, block_size=4)
    with pytest.raises(mc.InvalidRequestError, match="KV blocks"):
        engine.generate([[cm.BOS_ID] + [400] * 30], mc.SamplingParams(max_tokens=8))
    assert engine.model.free_blocks() == 3
    out = engine.generate([[cm.BOS_ID, 500, 501]], mc.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_abort_and_stream_close_free_every_block(v1):
    engine = cm.load_engine(v1, num_blocks=64)
    stream = engine.stream([cm.BOS_ID, 600, 601, 602], mc.SamplingParams(max_tokens=50, ignore_eos=True, seed=1))
    it = iter(stream)
    next(it)
    stream.close()
    assert stream.output is not None and stream.output.finish_reason == "abort"
    assert engine.model.free_blocks() == 64
    sched = engine.scheduler
    params = _C.RequestParams()
    params.max_tokens = 20
    rid = sched.add([cm.BOS_ID, 5, 6], params)
    sched.step()
    assert engine.model.free_blocks() < 64
    assert sched.abort(rid) and not sched.abort(rid)
    assert engine.model.free_blocks() == 64 and not sched.has_unfinished()


def test_seeded_tokens_do_not_depend_on_batch_companions(v1):
    engine = cm.load_engine(v1)
    p = mc.SamplingParams(max_tokens=8, seed=42, ignore_eos=True)
    alone = engine.generate([[cm.BOS_ID, 700, 701]], p)[0]
    together = engine.generate([[cm.BOS_ID, 900], [cm.BOS_ID, 700, 701], [cm.BOS_ID] * 5], p)[1]
    assert alone.token_ids == together.token_ids


def test_n_samples_share_the_prefill(v1):
    """n samples of a long prompt: its prefill runs once (the others fork its cached K/V), and
    each sample equals the same sample run with no sharing (a pool too small to fork)."""
    prompt = [cm.BOS_ID] + list(range(400, 440))
    params = mc.SamplingParams(n=3, max_tokens=6, seed=5, ignore_eos=True)
    engine = cm.load_engine(v1, num_blocks=64)
    outs = engine.generate([prompt], params)[0]
    assert [o.index for o in outs] == [0, 1, 2] and len({tuple(o.token_ids) for o in outs}) > 1
    sched = engine.scheduler.stats
    assert engine.model.free_blocks() == 64
    again = engine.generate([prompt], params)[0]
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]
    alone = [cm.load_engine(v1, num_blocks=64).generate([prompt], mc.SamplingParams(
        max_tokens=6, seed=5, ignore_eos=True))[0].token_ids]
    assert outs[0].token_ids == alone[0], "sample 0 is the request run alone"
    # Prefilled tokens: one prefill (40 tokens) + 3 last-prompt-token steps, not 3 x 41.
    tokens = []
    engine2 = cm.load_engine(v1, num_blocks=64)
    for _ in engine2._run(engine2._requests([prompt], params)):
        tokens.append(engine2.scheduler.stats["last_batch_tokens"])
    assert sum(tokens) < 2 * len(prompt) + 3 * 6, f"batch tokens per step {tokens}"
    del sched


def test_n_samples_min_tokens_and_stop_reason(v1):
    engine = cm.load_engine(v1)
    greedy = engine.generate([[cm.BOS_ID, 800]], mc.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    stop_id = greedy.token_ids[2]
    first = greedy.token_ids.index(stop_id)
    out = engine.generate([[cm.BOS_ID, 800]], mc.SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id and len(out.token_ids) == first + 1
    # min_tokens masks the stop id until reached: greedy then picks the next best token.
    out = engine.generate([[cm.BOS_ID, 800]], mc.SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop_id],
                                                                min_tokens=first + 1))[0]
    assert len(out.token_ids) > first and out.token_ids[first] != stop_id


def test_stop_string_earliest_completed_wins_and_include(v1):
    engine = cm.load_engine(v1)
    base = engine.generate(["Hello"], mc.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    text = base.text
    assert len(text) > 6, "test bug: the model generated too little text"
    a, b = text[2:5], text[3:4]  # b completes first (inside a)
    out = engine.generate(["Hello"], mc.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[a, b]))[0]
    assert out.stop_reason == b and out.text == text[: text.find(b)]
    out = engine.generate(["Hello"], mc.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[a, b],
                                                       include_stop_str_in_output=True))[0]
    assert out.text == text[: text.find(b) + len(b)]


def test_sampling_params_vllm_names_and_errors():
    p = mc.SamplingParams(n=2, presence_penalty=0.5, frequency_penalty=0.1, logit_bias={5: 1.0}, min_tokens=2,
                          include_stop_str_in_output=True, skip_special_tokens=True, seed=2**64 - 1)
    assert p.n == 2
    with pytest.raises(TypeError, match="not_a_field"):
        mc.SamplingParams(not_a_field=1)
    for field, value in [("presence_penalty", 3.0), ("logit_bias", {-1: 1.0}), ("min_tokens", 100), ("n", 0),
                         ("seed", 2**64), ("best_of", 3)]:
        with pytest.raises(ValueError, match=field):
            mc.SamplingParams(**{field: value})


def test_llm_facade_runs_vllm_style_code(v1):
    llm = mc.LLM(str(v1.path), num_blocks=128)
    outputs = llm.generate(["Hello", "The sky"], mc.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [o.prompt for o in outputs] == ["Hello", "The sky"]
    for o in outputs:
        assert isinstance(o, mc.RequestOutput) and o.finished and len(o.outputs) == 1
        assert len(o.outputs[0].token_ids) == 4 and o.prompt_token_ids[0] == cm.BOS_ID
    chats = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]],
                     mc.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(chats) == 2 and all(len(c.outputs[0].token_ids) == 3 for c in chats)
    assert llm.engine.model.free_blocks() == llm.engine.model.num_blocks()


def test_a_tokenizer_smaller_than_the_vocab_never_yields_unknown_ids(tmp_path):
    """The model's vocabulary is padded past the tokenizer's: such ids are never sampled."""
    cfg = cm.chat_config(32000 + 64)
    model = cm.build_chat_model(cfg, tm.seed_of("padded-vocab"))
    with torch.no_grad():
        model.lm_head.weight[32000:] += 5.0  # make the padding ids the most likely
    cm._save(model, tmp_path, cm.V1_TOKENIZER, "tokenizer.model")
    engine = cm.load_engine(tmp_path)
    out = engine.generate(["Hi"], mc.SamplingParams(max_tokens=10, seed=1, ignore_eos=True))[0]
    assert all(t < 32000 for t in out.token_ids)
