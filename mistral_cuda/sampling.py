"""Sampling controls (the names vLLM and the OpenAI API use) and the per-token sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import torch

MAX_LOGPROBS = 20
MAX_SEED = 2**64 - 1  # torch.Generator seeds are 64-bit


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick each new token and when to stop.

    temperature 0 is greedy. top_k 0 or -1, top_p 1 and min_p 0 disable their filter. stop
    strings are cut from the text; stop_token_ids and EOS end the completion too (unless
    ignore_eos). logprobs=k returns the chosen token's log-probability and the k most likely
    tokens at each step (raw model distribution). seed (0 .. 2**64 - 1) makes sampling
    reproducible.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Union[None, str, List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    logprobs: Optional[int] = None
    ignore_eos: bool = False
    stop_strings: List[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an int >= -1 (0 or -1 disable it)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if (
            not _is_number(self.repetition_penalty)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            raise bad("repetition_penalty", "a finite number > 0")
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
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")


@dataclass
class TokenLogprob:
    """One generated token: its log-probability and the most likely tokens at that step."""

    token_id: int
    logprob: float
    top_logprobs: Dict[int, float]


def apply_repetition_penalty(logits: torch.Tensor, context_ids: Iterable[int], penalty: float) -> torch.Tensor:
    """Makes tokens already seen less likely: positive logits are divided by the penalty,
    negative ones multiplied (the CTRL / transformers / vLLM rule)."""
    ids = sorted(set(context_ids))
    if penalty == 1.0 or not ids:
        return logits
    index = torch.tensor(ids, dtype=torch.long)
    seen = logits[index]
    logits = logits.clone()
    logits[index] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def allowed_tokens(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Bool mask [vocab] of the tokens top-k, top-p and min-p all keep, each judged on `probs`."""
    allowed = torch.ones_like(probs, dtype=torch.bool)
    if 0 < params.top_k < probs.numel():
        kth_largest = torch.topk(probs, params.top_k).values[-1]
        allowed &= probs >= kth_largest
    if params.top_p < 1.0:
        allowed &= _nucleus(probs, params.top_p)
    if params.min_p > 0.0:
        allowed &= probs >= params.min_p * probs.max()
    return allowed


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps a token while the mass ranked strictly above it (by probability, ties to the lower
    id) is below top_p, so the most likely token always stays.

    Ranks only the top candidates, growing them until they hold top_p of the mass: a full
    sort of a 32k vocabulary costs milliseconds per token."""
    vocab = probs.numel()
    values, ids = probs, torch.arange(vocab)  # fallback: rank everything (already in id order)
    k = 64
    while k <= vocab // 8:
        top_values, top_ids = torch.topk(probs, k)
        # Enough mass, and no tie straddling the cut-off that could leave out a lower id.
        if top_values.sum() >= top_p and int((probs == top_values[-1]).sum()) == int(
            (top_values == top_values[-1]).sum()
        ):
            by_id = torch.argsort(top_ids)
            values, ids = top_values[by_id], top_ids[by_id]
            break
        k *= 4
    order = torch.argsort(values, descending=True, stable=True)
    values, ids = values[order], ids[order]
    mass_above = torch.cat([values.new_zeros(1), torch.cumsum(values, 0)[:-1]])
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[ids[mass_above < top_p]] = True
    return keep


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator],
    context_ids: Iterable[int] = (),
) -> int:
    """Picks the next token from raw logits [vocab] (prompt + generated ids in context_ids)."""
    logits = apply_repetition_penalty(logits.float(), context_ids, params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))  # the first maximum: ties go to the lower id
    probs = torch.softmax(logits / params.temperature, dim=-1)
    allowed = allowed_tokens(probs, params)
    probs = torch.where(allowed, probs, torch.zeros_like(probs))
    # Inverse-CDF draw: the first token whose cumulative mass exceeds u. A zero-probability
    # token never is that first one; rounding past the end falls back to the last allowed.
    cdf = torch.cumsum(probs.double(), 0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))
    if index >= probs.numel() or not allowed[index]:
        index = int(allowed.nonzero()[-1])
    return index


def token_logprob(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """Log-probability of `token_id` and the top k under the raw model distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, k) if k > 0 else None
    top_logprobs = {} if top is None else {int(i): float(v) for v, i in zip(top.values, top.indices)}
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top_logprobs=top_logprobs)
