"""Batched generation: requests advance together through shared forward steps.

Each step feeds every active request either its next prompt chunk (prefill) or its last
sampled token (decode), so prompts of any length and decoding sequences share one
`model.step` call. A request samples with its own torch.Generator, so on the CPU backend its
tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from mistral_cuda import _C
from mistral_cuda.sampling import SamplingParams, TokenLogprob, sample_next, token_logprob


@dataclass
class CompletionOutput:
    """One finished completion. finish_reason: "stop" (EOS, a stop token or a stop string) or
    "length" (max_tokens, or the model's max_seq_len)."""

    text: str
    token_ids: List[int]
    finish_reason: str
    prompt_token_ids: List[int]
    logprobs: Optional[List[TokenLogprob]] = None
    # Seconds from the request's start to its first token (prefill), and from there to the end.
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class Request:
    """A prompt in flight: its cache sequence, sampled tokens, text and stream position."""

    index: int
    prompt_ids: List[int]
    params: SamplingParams
    eos_id: Optional[int]
    decoder: Optional[object]  # tokenizer.StreamDecoder; None without a tokenizer
    # Ids that may be sampled: [0, sample_vocab). The tokenizer's vocab_size, so that a model
    # whose vocabulary is larger than its tokenizer's never emits an id it cannot decode.
    sample_vocab: Optional[int] = None
    generator: torch.Generator = field(init=False)
    seq: Optional[int] = None
    prefilled: int = 0
    generated: List[int] = field(default_factory=list)
    seen: set = field(default_factory=set)
    logprobs: Optional[List[TokenLogprob]] = None
    text: str = ""
    emitted: int = 0
    finish_reason: Optional[str] = None
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = set(self.prompt_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        self._hold = max((len(s) for s in self.params.stop_strings), default=1) - 1

    def next_tokens(self, prefill_chunk: int) -> List[int]:
        if self.prefilled < len(self.prompt_ids):
            return self.prompt_ids[self.prefilled : self.prefilled + prefill_chunk]
        return [self.generated[-1]]

    def on_logits(self, fed: int, logits: torch.Tensor, max_seq_len: Optional[int]) -> None:
        """Takes the logits of the step that consumed `fed` tokens; samples once the prompt is in."""
        if self.prefilled < len(self.prompt_ids):
            self.prefilled += fed
            if self.prefilled < len(self.prompt_ids):
                return
        if self.sample_vocab is not None and self.sample_vocab < logits.numel():
            logits = logits.clone()
            logits[self.sample_vocab :] = float("-inf")
        token = sample_next(logits, self.params, self.generator, self.seen)
        if not self.generated:
            self.first_token = time.perf_counter()
        self.generated.append(token)
        self.seen.add(token)
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.params.logprobs))
        if token == self.eos_id and not self.params.ignore_eos:
            self._finish("stop")
        elif self.params.stop_token_ids and token in self.params.stop_token_ids:
            self._finish("stop")
        else:
            if self.decoder is not None:
                self._append_text(self.decoder.push(token))
            if self.finish_reason is None and len(self.generated) >= self.params.max_tokens:
                self._finish("length")
            elif self.finish_reason is None and max_seq_len is not None and self.next_position() >= max_seq_len:
                self._finish("length")

    def next_position(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    def _append_text(self, new: str) -> None:
        if not new:
            return
        # A stop string may straddle the old text and the new: search from where one could start.
        search_from = max(0, len(self.text) - self._hold)
        self.text += new
        cut = min((i for i in (self.text.find(s, search_from) for s in self.params.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
            self.finished = time.perf_counter()

    def _finish(self, reason: str) -> None:
        if self.decoder is not None:
            self._append_text(self.decoder.flush())
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finished = time.perf_counter()

    def take_delta(self) -> str:
        """Text that is final: all of it once finished, else all but what could still turn out
        to be the start of a stop string."""
        end = len(self.text) if self.finish_reason else max(self.emitted, len(self.text) - self._hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def output(self) -> CompletionOutput:
        first = self.first_token or self.finished
        return CompletionOutput(
            text=self.text,
            token_ids=list(self.generated),
            finish_reason=self.finish_reason or "length",
            prompt_token_ids=list(self.prompt_ids),
            logprobs=self.logprobs,
            prefill_seconds=first - self.started,
            decode_seconds=self.finished - first,
        )


def run(model, requests: List[Request], max_batch_size: int, prefill_chunk: int) -> Iterator[Request]:
    """Advances all requests to completion; yields a request whenever it has new text or ends.

    Sequences are freed when their request ends, and all of them if the caller stops early
    or anything is raised (KeyboardInterrupt included): each exactly once, and the exception
    that stopped the run is the one the caller sees.
    """
    config = model.config
    max_seq_len = None if config.sliding_window is not None else config.max_seq_len
    waiting = deque(requests)
    active: List[Request] = []
    try:
        while waiting or active:
            while waiting and len(active) < max_batch_size:
                request = waiting.popleft()
                # In `active` before it holds a sequence, so the cleanup below always sees it.
                active.append(request)
                request.started = time.perf_counter()
                request.seq = model.add_sequence()
            fed = [request.next_tokens(prefill_chunk) for request in active]
            logits = model.step([(r.seq, tokens) for r, tokens in zip(active, fed)])
            for request, tokens, row in zip(active, fed, logits):
                before = len(request.generated)
                request.on_logits(len(tokens), row, max_seq_len)
                if len(request.generated) != before:
                    yield request
            for request in [r for r in active if r.finish_reason]:
                model.free_sequence(request.seq)
                request.seq = None
                active.remove(request)
    except BaseException:
        _free_all(model, active)
        raise


def _free_all(model, requests: List[Request]) -> None:
    """Frees the sequences of `requests` while an exception is in flight, so nothing raised here
    may replace it: each free is attempted whatever the others raise.

    An exception landing after free_sequence() returned but before `request.seq = None` leaves
    a freed id behind; freeing it again is refused with InvalidRequestError (the model never
    reuses sequence ids), so that refusal is the one error expected here."""
    for request in requests:
        seq, request.seq = request.seq, None
        if seq is None:
            continue
        try:
            model.free_sequence(seq)
        except BaseException:  # noqa: B036 - the error in flight wins; see the docstring
            pass


def check_prompt(prompt_ids: List[int], config, index: int) -> None:
    """Rejects a prompt before any step runs, so one bad prompt never leaves others half-done."""
    if not prompt_ids:
        raise _C.InvalidRequestError(f"prompt {index} is empty")
    for position, token in enumerate(prompt_ids):
        if not 0 <= token < config.vocab_size:
            raise _C.InvalidRequestError(
                f"prompt {index}: token id {token} at index {position} is out of range [0, {config.vocab_size})"
            )
    if config.sliding_window is None and len(prompt_ids) >= config.max_seq_len:
        raise _C.InvalidRequestError(
            f"prompt {index} has {len(prompt_ids)} tokens; max_seq_len {config.max_seq_len} leaves no room to generate"
        )
