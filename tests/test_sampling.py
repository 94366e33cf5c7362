"""SamplingParams validation and the reference sampler mc.sampling.sample_next (vLLM semantics).

The sampler is checked against an independent oracle written here (float64), on small
hand-made distributions: every draw must be a token the oracle allows, and with few allowed
tokens every allowed token must be drawn with a frequency close to its renormalised
probability. Greedy (temperature 0), the repetition penalty and generator determinism are
checked directly.
"""

from __future__ import annotations

import math

import pytest
import torch

import mistral_cuda as mc

N_DRAWS = 2000


# --------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------


def oracle(
    logits,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    repetition_penalty=1.0,
    context=(),
) -> torch.Tensor:
    """The distribution sample_next draws from, float64 [vocab] (zeros for excluded ids)."""
    x = torch.as_tensor(logits, dtype=torch.float32).to(torch.float64).clone()
    for i in set(int(c) for c in context):
        x[i] = x[i] / repetition_penalty if x[i] > 0 else x[i] * repetition_penalty
    n = x.numel()
    if temperature == 0:
        out = torch.zeros(n, dtype=torch.float64)
        out[int(torch.argmax(x))] = 1.0  # torch.argmax returns the first maximal index
        return out
    # vLLM V1: min-p, then top-k, then top-p, each on what the previous left (renormalized).
    p = torch.softmax(x / temperature, dim=0)

    def keep(mask):
        q = p * torch.tensor(mask, dtype=torch.float64)
        return q / q.sum()

    if min_p > 0:
        pl = p.tolist()
        p = keep([v >= min_p * max(pl) for v in pl])
    if top_k not in (0, -1):
        pl = p.tolist()
        kth = sorted(pl, reverse=True)[min(top_k, n) - 1]
        p = keep([v >= kth for v in pl])
    if top_p != 1.0:
        pl = p.tolist()
        allowed = [True] * n
        above = 0.0
        for i in sorted(range(n), key=lambda i: (-pl[i], i)):
            if not above < top_p:
                allowed[i] = False
            above += pl[i]
        p = keep(allowed)
    return p


def logits_of(probs) -> torch.Tensor:
    """float32 logits whose softmax is ``probs`` (equal probabilities give equal logits)."""
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)


def params(**kw) -> "mc.SamplingParams":
    return mc.SamplingParams(**kw)


def draw(logits, p, seed, n=N_DRAWS, context=()) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = mc.sampling.sample_next(logits.clone(), p, g, list(context))
        out.append(t)
    return out


def check_draws(draws, q: torch.Tensor, what: str, frequencies: bool = True) -> None:
    """Every draw is allowed by ``q``; with ``frequencies``, each allowed token's frequency
    is within 5 standard deviations (+0.5%) of its probability."""
    allowed = {i for i, v in enumerate(q.tolist()) if v > 0}
    bad = sorted({t for t in draws if t not in allowed})
    assert not bad, f"{what}: drew excluded tokens {bad}; allowed set {sorted(allowed)}"
    if not frequencies:
        return
    n = len(draws)
    counts = torch.bincount(torch.tensor(draws), minlength=q.numel()).tolist()
    for i in sorted(allowed):
        want = q[i].item()
        got = counts[i] / n
        tol = 5 * math.sqrt(want * (1 - want) / n) + 0.005
        assert abs(got - want) <= tol, (
            f"{what}: token {i} drawn with frequency {got:.4f}, expected {want:.4f} (tol {tol:.4f}); "
            f"counts {counts}, expected distribution {[round(v, 4) for v in q.tolist()]}"
        )


# --------------------------------------------------------------------------------------
# Hand-made distributions
# --------------------------------------------------------------------------------------

# Sorted by probability: id1 .30, id3 .20, id4 .15, id5 .10, id6 .10 (tie), id0 .05, id8 .05
# (tie), id7 .03, id2 .02.
PROBS_A = [0.05, 0.30, 0.02, 0.20, 0.15, 0.10, 0.10, 0.03, 0.05]
PROBS_B = [0.50, 0.20, 0.15, 0.10, 0.05]

CASES = [
    # (name, probs, params, expected allowed set (checked against the oracle too))
    ("no-filter", PROBS_A, dict(), set(range(9))),
    ("top_k=-1", PROBS_A, dict(top_k=-1), set(range(9))),
    ("top_k=3", PROBS_A, dict(top_k=3), {1, 3, 4}),
    ("top_k=1", PROBS_A, dict(top_k=1), {1}),
    ("top_k=4-keeps-tie", PROBS_A, dict(top_k=4), {1, 3, 4, 5, 6}),
    ("top_k>vocab", PROBS_A, dict(top_k=100), set(range(9))),
    ("top_p=0.6", PROBS_A, dict(top_p=0.6), {1, 3, 4}),
    ("top_p=0.7-tie-lower-id-first", PROBS_A, dict(top_p=0.7), {1, 3, 4, 5}),
    ("top_p=0.1", PROBS_A, dict(top_p=0.1), {1}),
    ("min_p=0.45", PROBS_A, dict(min_p=0.45), {1, 3, 4}),
    ("min_p=0.3", PROBS_A, dict(min_p=0.3), {1, 3, 4, 5, 6}),
    ("min_p=1", PROBS_A, dict(min_p=1.0), {1}),
    ("T=0.5,top_p=0.6", PROBS_A, dict(temperature=0.5, top_p=0.6), {1, 3}),
    ("T=2,min_p=0.5", PROBS_A, dict(temperature=2.0, min_p=0.5), {1, 3, 4, 5, 6}),
    ("T=2", PROBS_A, dict(temperature=2.0), set(range(9))),
    ("all-three", PROBS_A, dict(top_k=5, top_p=0.9, min_p=0.4), {1, 3, 4}),
    # In sequence (vLLM): top-p after the renormalised top-k drops id 2 (judging both on the
    # full distribution would keep it).
    ("top_k=3,top_p=0.8-sequential", PROBS_B, dict(top_k=3, top_p=0.8), {0, 1}),
    ("top_p=0.6,min_p=0.25", PROBS_B, dict(top_p=0.6, min_p=0.25), {0, 1}),
    ("top_k=2,min_p=0.1", PROBS_B, dict(top_k=2, min_p=0.1), {0, 1}),
]


@pytest.mark.parametrize("name,probs,kw,expected", CASES, ids=[c[0] for c in CASES])
def test_oracle_matches_hand_computed_sets(name, probs, kw, expected):
    """The test's own oracle agrees with the allowed sets worked out by hand."""
    q = oracle(logits_of(probs), **kw)
    assert {i for i, v in enumerate(q.tolist()) if v > 0} == expected


@pytest.mark.parametrize("name,probs,kw,expected", CASES, ids=[c[0] for c in CASES])
def test_sample_next_draws_only_allowed_tokens_with_right_frequencies(name, probs, kw, expected):
    logits = logits_of(probs)
    p = params(**kw)
    draws = draw(logits, p, seed=1234)
    check_draws(draws, oracle(logits, **kw), name)


def test_sample_next_on_a_large_vocabulary():
    """Random logits over 32000 tokens (std 4) with all three filters: every draw allowed."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(32000, generator=g) * 4
    for kw in (
        dict(top_k=20),
        dict(top_p=0.5),
        dict(min_p=0.2),
        dict(top_k=50, top_p=0.9, min_p=0.05, temperature=0.8),
    ):
        q = oracle(logits, **kw)
        draws = draw(logits, params(**kw), seed=99, n=100)
        check_draws(draws, q, f"vocab 32000 {kw}", frequencies=False)


def test_sample_next_returns_python_int():
    t = mc.sampling.sample_next(logits_of(PROBS_A), params(), torch.Generator().manual_seed(0), [])
    assert isinstance(t, int) and not isinstance(t, bool)
    assert 0 <= t < len(PROBS_A)


# --------------------------------------------------------------------------------------
# Greedy and repetition penalty
# --------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        logits = torch.randn(1000, generator=g) * 3
        for kw in (dict(), dict(top_k=5, top_p=0.5, min_p=0.1)):
            t = mc.sampling.sample_next(logits.clone(), params(temperature=0.0, **kw), g, [])
            assert t == int(torch.argmax(logits)), f"trial {trial} {kw}"


def test_greedy_ties_pick_lowest_index():
    logits = torch.tensor([1.0, 3.0, 0.0, 3.0, 3.0], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    assert mc.sampling.sample_next(logits, params(temperature=0), g, []) == 1


PENALTY_CASES = [
    # (logits, context, penalty, expected greedy token)
    ([2.0, 1.9, -0.5, -0.4], [], 1.5, 0),  # no context: no change
    ([2.0, 1.9, -0.5, -0.4], [0], 1.5, 1),  # positive logit divided: 1.33 < 1.9
    ([-1.0, -1.1, -3.0], [0], 2.0, 1),  # negative logit multiplied: -2.0 < -1.1
    ([2.0, 1.2, 0.5], [0, 0, 0], 1.5, 0),  # once per distinct id: 1.33 > 1.2 (twice: 0.89)
    ([1.0, 1.5, 0.2], [0], 0.5, 0),  # penalty < 1 boosts a positive logit: 2.0 > 1.5
    ([-1.0, -0.8, -3.0], [0], 0.5, 0),  # ... and a negative one: -0.5 > -0.8
    ([2.0, 1.9, -0.5], [1, 2], 1.5, 0),  # penalising other tokens keeps the argmax
]


@pytest.mark.parametrize("logits,context,penalty,expected", PENALTY_CASES)
def test_repetition_penalty_changes_argmax(logits, context, penalty, expected):
    x = torch.tensor(logits, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    p = params(temperature=0, repetition_penalty=penalty)
    assert mc.sampling.sample_next(x, p, g, context) == expected
    assert int(torch.argmax(oracle(x, temperature=0, repetition_penalty=penalty, context=context))) == expected


def test_repetition_penalty_when_sampling():
    """The penalty is applied before softmax and filters: top_k=2 keeps {1, 5} once token 0
    is penalised (2.0 / 3 = 0.67 < 1.0), and frequencies follow the penalised softmax."""
    logits = torch.tensor([2.0, 1.2, 0.5, -0.3, -0.5, 1.0], dtype=torch.float32)
    kw = dict(repetition_penalty=3.0, top_k=2)
    q = oracle(logits, context=[0, 3], **kw)
    assert {i for i, v in enumerate(q.tolist()) if v > 0} == {1, 5}
    check_draws(draw(logits, params(**kw), seed=5, context=[0, 3]), q, "penalty+top_k")

    kw = dict(repetition_penalty=1.5, temperature=0.7)
    q = oracle(logits, context=[0, 0, 3, 4], **kw)
    check_draws(draw(logits, params(**kw), seed=6, context=[0, 0, 3, 4]), q, "penalty+temperature")


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------


def test_same_generator_seed_same_draws():
    logits = logits_of(PROBS_A)
    p = params(temperature=1.0)
    a = draw(logits, p, seed=42, n=200)
    b = draw(logits, p, seed=42, n=200)
    c = draw(logits, p, seed=43, n=200)
    assert a == b
    assert a != c, "different generator seeds gave the same 200 draws"


# --------------------------------------------------------------------------------------
# SamplingParams
# --------------------------------------------------------------------------------------


def test_sampling_params_defaults():
    p = mc.SamplingParams()
    assert p.max_tokens == 64
    assert p.temperature == 1.0
    assert p.top_k == 0
    assert p.top_p == 1.0
    assert p.min_p == 0.0
    assert p.repetition_penalty == 1.0
    assert p.seed is None
    assert not p.stop  # None (or an empty list)
    assert not p.stop_token_ids
    assert p.logprobs is None
    assert p.ignore_eos is False


VALID = [
    dict(max_tokens=1),
    dict(max_tokens=100000),
    dict(temperature=0),
    dict(temperature=0.0),
    dict(temperature=1),
    dict(temperature=5.5),
    dict(top_k=-1),
    dict(top_k=0),
    dict(top_k=1),
    dict(top_p=1.0),
    dict(top_p=1),
    dict(top_p=1e-6),
    dict(min_p=0.0),
    dict(min_p=1.0),
    dict(min_p=0.5),
    dict(repetition_penalty=0.5),
    dict(repetition_penalty=2.0),
    dict(seed=0),
    dict(seed=2**31),
    dict(stop="###"),
    dict(stop=["a", "bc"]),
    dict(stop=[]),
    dict(stop_token_ids=[]),
    dict(stop_token_ids=[0, 2, 31999]),
    dict(logprobs=0),
    dict(logprobs=5),
    dict(logprobs=20),
    dict(ignore_eos=True),
]


@pytest.mark.parametrize("kw", VALID, ids=[repr(v) for v in VALID])
def test_sampling_params_valid_values(kw):
    p = mc.SamplingParams(**kw)
    for k, v in kw.items():
        if k not in ("stop",):
            assert getattr(p, k) == v


INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 1.5),
    ("max_tokens", 8.0),
    ("max_tokens", "8"),
    ("max_tokens", True),
    ("max_tokens", None),
    ("temperature", -0.1),
    ("temperature", -1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", float("-inf")),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", 2.0),
    ("top_k", "3"),
    ("top_k", True),
    ("top_k", None),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", float("nan")),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", float("nan")),
    ("repetition_penalty", 0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")),
    ("repetition_penalty", float("inf")),
    ("seed", 1.5),
    ("seed", "1"),
    ("seed", True),
    ("stop", 5),
    ("stop", [""]),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", ["ok", None]),
    ("stop_token_ids", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", ["2"]),
    ("stop_token_ids", [2, -5]),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.5),
    ("logprobs", True),
    ("logprobs", "3"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_sampling_params_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        mc.SamplingParams(**{field: value})
