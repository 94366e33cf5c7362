"""Sampling controls (the names vLLM and the OpenAI API use) and the per-token sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import torch

MAX_LOGPROBS = 20
MAX_SEED = 2**64 - 1  # seeds are 64-bit


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick each new token and when to stop, with vLLM's field names and semantics.

    Applied in vLLM V1's order: logit_bias and the min_tokens mask (EOS and stop_token_ids
    masked until min_tokens tokens exist), penalties (repetition_penalty on prompt and output
    tokens: positive logits divided, negative multiplied; presence_penalty once per token seen
    in the output; frequency_penalty times its count), then temperature (0 = greedy), then
    min_p, top_k and top_p in sequence, each on the distribution the previous left
    (renormalized). top_k 0 or -1, top_p 1 and min_p 0 disable their filter.

    n samples per prompt. stop strings end the completion where the one completed earliest in
    the text starts (kept in the text with include_stop_str_in_output); stop_token_ids and EOS
    end it too (unless ignore_eos). logprobs=k returns, per generated token, its log-probability
    and rank and the k most likely tokens (raw model distribution; the sampled token always
    included). seed (0..2**64-1) makes sampling reproducible: a seeded request's tokens depend
    on neither the batch nor preemptions.
    """

    n: int = 1
    best_of: Optional[int] = None
    max_tokens: int = 64
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None
    stop: Union[None, str, List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop_strings: List[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")

        def finite(name: str, low=None, low_open=False, high=None) -> None:
            v = getattr(self, name)
            ok = _is_number(v) and math.isfinite(v)
            ok = ok and (low is None or (v > low if low_open else v >= low)) and (high is None or v <= high)
            if not ok:
                bounds = []
                if low is not None:
                    bounds.append(f"{'>' if low_open else '>='} {low}")
                if high is not None:
                    bounds.append(f"<= {high}")
                raise bad(name, "a finite number" + (" " + " and ".join(bounds) if bounds else ""))

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an int >= 1")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of != self.n):
            raise bad("best_of", f"None or equal to n ({self.n})")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an int in [0, max_tokens={self.max_tokens}]")
        finite("temperature", 0)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an int >= -1 (0 or -1 disable it)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        finite("repetition_penalty", 0, low_open=True)
        finite("presence_penalty", -2, high=2)
        finite("frequency_penalty", -2, high=2)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                _is_int(k) and k >= 0 and _is_number(v) and math.isfinite(v) and -100 <= v <= 100
                for k, v in self.logit_bias.items()
            ):
                raise bad("logit_bias", "None or a dict {token id >= 0: bias in [-100, 100]}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise bad("seed", "None or an int in [0, 2**64 - 1]")
        if isinstance(self.stop, str):
            stops = [self.stop]
        elif self.stop is None:
            stops = []
        elif isinstance(self.stop, (list, tuple)):
            stops = list(self.stop)
        else:
            raise bad("stop", "None, a str or a list of str")
        if not all(isinstance(s, str) and s for s in stops):
            raise bad("stop", "None, a non-empty str or a list of non-empty str")
        self.stop_strings = stops
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, (list, tuple))
            or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise bad("stop_token_ids", "None or a list of ints >= 0")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")


@dataclass
class TokenLogprob:
    """One generated token: its log-probability and the most likely tokens at that step."""

    token_id: int
    logprob: float
    top_logprobs: Dict[int, float]  # the k most likely tokens, and the sampled one
    rank: int = 0                   # 1 + tokens more likely than the sampled one


# ---- the reference sampler (what the backend sampling op computes, written plainly) ----

_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (core/random.h mix64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sampling_noise(seed: int, stream: int, position: int, ids: np.ndarray) -> np.ndarray:
    """Gumbel noise float64 [len(ids)] of one draw (core/op_params.h sampling_noise)."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed ^ 0x5851F42D4C957F2D], dtype=np.uint64))
        key = _mix64(key + np.uint64(stream) * np.uint64(0x9E3779B97F4A7C15))
        bits = _mix64(_mix64(key + np.uint64(position & _MASK64)) ^ (ids.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)))
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    return -np.log(-np.log(u))


@dataclass
class SampleRow:
    """One row of the sampler's input besides its logits (core/op_params.h SamplingControls and
    the row's lists), in the fields the op binding takes."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    vocab_limit: int = 0
    seed: int = 0
    stream: int = 0
    position: int = 0
    logprobs: int = -1
    history_ids: List[int] = field(default_factory=list)
    output_counts: List[int] = field(default_factory=list)
    logit_bias: List[tuple] = field(default_factory=list)
    banned: List[int] = field(default_factory=list)


def reference_sample(logits: torch.Tensor, row: SampleRow):
    """(token, logprob, rank, [(id, logprob)] top n) for float32 logits [V], computed as the
    backend op does (same float32 steps, same noise): the readable reference the op is tested
    against."""
    f32 = np.float32
    raw = logits.detach().to(torch.float32).cpu().numpy()
    x = raw.copy()
    V = x.size
    if row.vocab_limit > 0:
        x[row.vocab_limit :] = -np.inf
    for i in row.banned:
        x[i] = -np.inf
    for i, b in row.logit_bias:
        x[i] = f32(x[i] + f32(b))
    rp, pp, fp = f32(row.repetition_penalty), f32(row.presence_penalty), f32(row.frequency_penalty)
    for i, count in zip(row.history_ids, row.output_counts):
        v = x[i]
        if rp != f32(1):
            v = f32(v / rp) if v > 0 else f32(v * rp)
        if count > 0:
            v = f32(v - f32(pp + f32(fp * f32(count))))
        x[i] = v
    if f32(row.temperature) == 0:
        token = int(np.argmax(x))
    else:
        x = (x / f32(row.temperature)).astype(np.float32)
        if f32(row.min_p) > 0:
            threshold = float(x.max()) + math.log(float(f32(row.min_p)))
            x[x.astype(np.float64) < threshold] = -np.inf
        if 0 < row.top_k < V:
            kth = np.sort(x)[::-1][row.top_k - 1]
            x[x < kth] = -np.inf
        if f32(row.top_p) < 1:
            top = float(x.max())
            kept = np.nonzero(x != -np.inf)[0]
            total = np.cumsum(np.exp(x[kept].astype(np.float64) - top))[-1]
            order = sorted(kept.tolist(), key=lambda i: (-float(x[i]), i))
            above = 0.0
            for i in order:
                if above >= float(f32(row.top_p)):
                    x[i] = -np.inf
                else:
                    above += math.exp(float(x[i]) - top) / total
        kept = np.nonzero(x != -np.inf)[0]
        if kept.size == 0:
            token = int(np.argmax(x))
        else:
            scores = x[kept].astype(np.float64) + sampling_noise(row.seed, row.stream, row.position, kept)
            token = int(kept[int(np.argmax(scores))])
    if row.logprobs < 0:
        return token, 0.0, 0, []
    if 0 < row.vocab_limit < V:  # the distribution over the ids that exist for the tokenizer
        raw, V = raw[: row.vocab_limit], row.vocab_limit
    top = float(raw.max())
    log_norm = top + math.log(float(np.cumsum(np.exp(raw.astype(np.float64) - top))[-1]))
    rank = 1 + int((raw > raw[token]).sum())
    order = sorted(range(V), key=lambda i: (-float(raw[i]), i))[: min(row.logprobs, MAX_LOGPROBS, V)]
    return token, float(f32(float(raw[token]) - log_norm)), rank, [(i, float(f32(float(raw[i]) - log_norm))) for i in order]


def row_for(params: SamplingParams, seed: int, stream: int, position: int, prompt_ids, output_ids,
            eos_id: Optional[int], vocab_limit: int = 0) -> SampleRow:
    """The sampler row of a request's next token (what the scheduler gives the op)."""
    counts: Dict[int, int] = {}
    for t in output_ids:
        counts[t] = counts.get(t, 0) + 1
    history = list(dict.fromkeys(list(prompt_ids) + list(output_ids)))
    banned: List[int] = []
    if len(output_ids) < params.min_tokens:
        if eos_id is not None and not params.ignore_eos:
            banned.append(eos_id)
        banned += list(params.stop_token_ids or [])
    return SampleRow(
        temperature=params.temperature, top_k=max(params.top_k, 0), top_p=params.top_p, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, vocab_limit=vocab_limit, seed=seed, stream=stream,
        position=position, logprobs=-1 if params.logprobs is None else params.logprobs, history_ids=history,
        output_counts=[counts.get(t, 0) for t in history], logit_bias=sorted((params.logit_bias or {}).items()),
        banned=banned)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator],
    context_ids: Iterable[int] = (),
) -> int:
    """Picks the next token from raw logits [vocab] with the reference sampler, the context ids
    counting as the prompt (repetition penalty); the draw's seed comes from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return reference_sample(logits, row_for(params, seed, 0, 0, list(context_ids), [], None))[0]


def token_logprob(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """Log-probability and rank of `token_id` and the top k under the raw model distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, k) if k > 0 else None
    top_logprobs = {} if top is None else {int(i): float(v) for v, i in zip(top.values, top.indices)}
    top_logprobs[token_id] = float(logprobs[token_id])
    rank = 1 + int((logits.float() > logits.float()[token_id]).sum())
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top_logprobs=top_logprobs, rank=rank)
