"""Generation on the core's scheduler (csrc/runtime/scheduler.h).

The C++ scheduler batches requests continuously (decodes every running request each step,
fills the rest of a token budget with prompt chunks, preempts and recomputes when the KV cache
runs out), samples on the backend and decides token-level finishes (EOS, stop token ids,
max_tokens, max_seq_len). Python keeps what needs text: detokenization, stop strings (a hit
aborts the request in the core), streaming deltas and the outputs.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Union

from mistral_cuda import _C
from mistral_cuda.sampling import SamplingParams, TokenLogprob


@dataclass
class CompletionOutput:
    """One completion. finish_reason: "stop" (EOS, a stop token or a stop string), "length"
    (max_tokens, or the model's max_seq_len), "abort" (cancelled, e.g. Stream.close()),
    "tool_calls" (chat: the completion is the calls in `tool_calls`) or "content_filter" (a
    guard blocked the output; `text` ends where the blocked content started). stop_reason: the
    stop string or stop token id that ended it (None for EOS or length)."""

    text: str
    token_ids: List[int]
    finish_reason: str
    prompt_token_ids: List[int]
    logprobs: Optional[List[TokenLogprob]] = None
    # Seconds from the request's start to its first token (prefill), and from there to the end.
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: Union[None, int, str] = None
    cumulative_logprob: Optional[float] = None
    index: int = 0
    # Chat: OpenAI-shaped calls [{"id", "type": "function", "function": {"name", "arguments"}}]
    # when the completion is a tool call; else None. tool_call_error: why output that started
    # with the tool-call token did not parse (it is then returned as `text`).
    tool_calls: Optional[List[dict]] = None
    tool_call_error: Optional[str] = None


@dataclass
class RequestOutput:
    """vLLM's shape: a prompt and its n completions."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool


@dataclass
class Request:
    """One completion in flight: its core request, sampled tokens, text and stream position."""

    index: int
    prompt_ids: List[int]
    params: SamplingParams
    eos_id: Optional[int]
    decoder: Optional[object]  # tokenizer.StreamDecoder; None without a tokenizer
    seed: int = 0
    sample_index: int = 0  # which of the prompt's n samples
    vocab_limit: int = 0   # ids the tokenizer can decode (0: all the model's)
    core_id: Optional[int] = None
    generated: List[int] = field(default_factory=list)
    logprobs: Optional[List[TokenLogprob]] = None
    cumulative_logprob: float = 0.0
    text: str = ""
    emitted: int = 0
    finish_reason: Optional[str] = None
    stop_reason: Union[None, int, str] = None
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    guards: tuple = ()  # guards.Guard objects checking the output text (see guards.py)

    def __post_init__(self) -> None:
        if self.params.logprobs is not None:
            self.logprobs = []
        self._hold = max((len(s) for s in self.params.stop_strings), default=1) - 1
        # Guards with a hold check the growing text; the others (hold None) judge the whole
        # output, and then no text is streamed before the end.
        holds = [getattr(g, "hold", 0) for g in self.guards]
        self._streaming_guards = [g for g, h in zip(self.guards, holds) if h is not None]
        self._final_guards = [g for g, h in zip(self.guards, holds) if h is None]
        self._hold = max([self._hold, *(h for h in holds if h is not None)])

    def core_params(self) -> "_C.RequestParams":
        p, c = self.params, _C.RequestParams()
        c.temperature = p.temperature
        c.top_k = max(p.top_k, 0)
        c.top_p = p.top_p
        c.min_p = p.min_p
        c.repetition_penalty = p.repetition_penalty
        c.presence_penalty = p.presence_penalty
        c.frequency_penalty = p.frequency_penalty
        c.vocab_limit = self.vocab_limit
        c.seed = self.seed
        c.stream = self.sample_index
        c.logprobs = -1 if p.logprobs is None else p.logprobs
        c.logit_bias = sorted((p.logit_bias or {}).items())
        c.max_tokens = p.max_tokens
        c.min_tokens = p.min_tokens
        c.stop_token_ids = list(p.stop_token_ids or [])
        c.eos_id = -1 if self.eos_id is None else self.eos_id
        c.ignore_eos = p.ignore_eos
        return c

    def on_token(self, token: int, logprob: float, rank: int, top, finish: str, stop_token: int) -> None:
        """Takes one sampled token and the core's finish decision for it."""
        if not self.generated:
            self.first_token = time.perf_counter()
        self.generated.append(token)
        if self.logprobs is not None:
            top_logprobs = {int(i): float(v) for i, v in top}
            top_logprobs[token] = float(logprob)
            self.logprobs.append(TokenLogprob(token_id=token, logprob=float(logprob), top_logprobs=top_logprobs, rank=rank))
            self.cumulative_logprob += float(logprob)
        is_stop_id = finish == "stop"
        if self.decoder is not None and not is_stop_id:
            self._append_text(self.decoder.push(token))
        if finish and self.finish_reason is None:
            if is_stop_id and token != self.eos_id:
                self.stop_reason = token
            self._finish(finish)

    def _append_text(self, new: str) -> None:
        if not new or self.finish_reason is not None:
            return
        # A stop string may straddle the old text and the new: search from where one could start.
        search_from = max(0, len(self.text) - self._hold)
        self.text += new
        # The stop string completed earliest in the text wins (vLLM's rule).
        stop = None
        hits = [(i + len(s), i, s) for s in self.params.stop_strings for i in [self.text.find(s, search_from)] if i >= 0]
        if hits and len(self.generated) >= self.params.min_tokens:
            end, start, stop = min(hits)
            self.text = self.text[: end if self.params.include_stop_str_in_output else start]
        self._check_guards(self._streaming_guards)
        if stop is not None and self.finish_reason is None:
            self.stop_reason = stop
            self._end("stop")

    def _finish(self, reason: str) -> None:
        if self.decoder is not None and reason != "abort":
            self._append_text(self.decoder.flush())
        if self.finish_reason is None:
            self._end(reason)

    def abort(self) -> None:
        """Ends a request stopped from outside: its text so far is final."""
        if self.finish_reason is None:
            if not self.started:
                self.started = time.perf_counter()
            self._finish("abort")

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self.finished = time.perf_counter()
        if reason != "abort":
            self._check_guards(self._final_guards)

    def _check_guards(self, guards) -> None:
        for guard in guards:
            if self.finish_reason == "content_filter":
                return
            start = guard.check_output(self.text)
            if start is not None:
                self.text = self.text[: max(0, int(start))]
                self.finish_reason = "content_filter"
                self.finished = time.perf_counter()

    def take_delta(self) -> str:
        """Text that is final: all of it once finished, else all but what could still turn out
        to be the start of a stop string or of content a guard blocks (nothing, while a guard
        that judges only complete outputs is on)."""
        if self.finish_reason:
            end = len(self.text)
        elif self._final_guards:
            end = self.emitted
        else:
            end = max(self.emitted, len(self.text) - self._hold)
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
            stop_reason=self.stop_reason,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            index=self.sample_index,
        )


def new_seed() -> int:
    """A seed for a request that gave none (its n samples share it, on distinct streams)."""
    return secrets.randbits(63)


def run(scheduler: "_C.Scheduler", groups: List[List[Request]]) -> Iterator[Request]:
    """Advances the requests to completion on the scheduler (each group: the n samples of one
    prompt, sharing its prefill); yields a request whenever it has a new token or ends.
    Requests still unfinished when the caller stops early, or when anything raises (Ctrl-C
    included), are aborted in the core, which frees their blocks."""
    by_core_id: Dict[int, Request] = {}
    try:
        for group in groups:
            for request in group:
                request.started = time.perf_counter()
            params = [request.core_params() for request in group]
            # Recorded before the call: an interruption right after it returns loses none of them
            # (ids count up; aborting one never added does nothing).
            first = scheduler.next_request_id
            for i, request in enumerate(group):
                request.core_id = first + i
                by_core_id[first + i] = request
            core_ids = scheduler.add_group(group[0].prompt_ids, params)
            if list(core_ids) != [r.core_id for r in group]:
                raise RuntimeError("the scheduler assigned unexpected request ids")
        while by_core_id:
            updates = scheduler.step()
            if not updates and scheduler.stats["last_batch_tokens"] == 0:
                raise _C.CacheFullError(
                    "no request could be scheduled: the KV cache is held by sequences outside the scheduler"
                )
            for core_id, token, logprob, rank, top, finish, stop_token in updates:
                request = by_core_id.get(core_id)
                if request is None:
                    continue
                request.on_token(token, logprob, rank, top, finish, stop_token)
                if request.finish_reason is not None:
                    if not finish:  # a stop string: the core still runs it
                        scheduler.abort(core_id)
                    del by_core_id[core_id]
                yield request
    finally:
        # Every unfinished request is aborted (abort ignores ids already gone), whatever one of
        # the aborts raises; an exception in flight wins over any raised here.
        in_flight = sys.exc_info()[1]
        failure = None
        for core_id, request in list(by_core_id.items()):
            try:
                scheduler.abort(core_id)
            except BaseException as e:  # noqa: B036 - the others must be aborted too
                failure = failure or e
            request.abort()
        if failure is not None and (in_flight is None or isinstance(in_flight, GeneratorExit)):
            raise failure


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
