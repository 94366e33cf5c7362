"""mc.AsyncEngine: many coroutines share one Engine; one thread owns its scheduler.

The thread is the only code that touches the core scheduler and the model: it takes "add" and
"abort" commands from a thread-safe queue between steps, runs `Scheduler.step()` (which releases
the GIL, so the event loop keeps running during the forward pass) and hands each request's new
tokens and text to that request's asyncio.Queue with `loop.call_soon_threadsafe`. The event loop
never waits on the scheduler: an `await` on a request waits only on its own queue.

    engine = mc.AsyncEngine.from_pretrained(model_dir, device="cpu")
    async for output in engine.generate("Once upon a time", mc.SamplingParams(max_tokens=32)):
        print(output.outputs[0].text)       # cumulative text, as vLLM's RequestOutput
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple, Union

from mistral_cuda import _C
from mistral_cuda.engine import Engine
from mistral_cuda.generation import CompletionOutput, Request, RequestOutput
from mistral_cuda.sampling import SamplingParams, TokenLogprob

Prompt = Union[str, Sequence[int]]

DEFAULT_MAX_WAITING_REQUESTS = 1024


class QueueFullError(_C.Error):
    """The waiting queue already holds max_waiting_requests sequences (HTTP 503)."""


@dataclass
class EngineStats:
    """What the scheduler thread last saw (read by metrics without touching the scheduler)."""

    num_running: int = 0     # sequences in the scheduler's running batch
    num_blocks: int = 0
    free_blocks: int = 0
    steps: int = 0
    preemptions: int = 0
    generation_tokens: int = 0  # tokens sampled for requests, counted as each step makes them

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV pool held by sequences (0..1, vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.free_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass
class RequestMetrics:
    """perf_counter() times of one request as its coroutine saw them."""

    arrival_time: float
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    inter_token_latencies: List[float] = field(default_factory=list)  # seconds between steps with tokens


@dataclass
class _SampleDelta:
    """What one step added to one sample (built by the scheduler thread)."""

    index: int
    token_ids: List[int]
    text: str
    logprobs: Optional[List[TokenLogprob]]
    finish_reason: Optional[str]
    stop_reason: Union[None, int, str]


class _Tracked:
    """One request (its n samples) as both threads know it. The scheduler thread owns
    `requests` (mistral_cuda.generation.Request objects); the coroutine side only reads the
    deltas it is sent."""

    def __init__(self, request_id: str, prompt: Optional[str], requests: List[Request], loop, out: asyncio.Queue):
        self.request_id = request_id
        self.prompt = prompt
        self.requests = requests
        self.loop = loop
        self.out = out
        self.core_ids: List[int] = []
        self.sent_tokens = [0] * len(requests)   # scheduler thread: tokens already sent per sample
        self.aborted = False                     # set by the coroutine side

    def post(self, event) -> None:
        _post_all(self.loop, [(self, event)])


def _deliver(items: List[Tuple["_Tracked", object]]) -> None:
    for tracked, event in items:
        tracked.out.put_nowait(event)


def _post_all(loop, items: List[Tuple["_Tracked", object]]) -> None:
    """Hands events to their requests' queues on `loop`: one wake-up of the loop for them all
    (each call_soon_threadsafe writes to the loop's self-pipe)."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


_WAKE_UP = object()  # put in a request's queue by abort(): no tokens, look at `finished`


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative RequestOutputs (every
    token arrived so far; several steps are merged when the consumer is slower than the
    engine). `metrics` holds its timings; `finished` once the last output was taken."""

    def __init__(self, engine: "AsyncEngine", tracked: _Tracked):
        self._engine = engine
        self._tracked = tracked
        self.request_id = tracked.request_id
        self.n = len(tracked.requests)  # completions (SamplingParams.n)
        self.prompt_token_ids = list(tracked.requests[0].prompt_ids)
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        n = len(tracked.requests)
        self._text = [""] * n
        self._tokens: List[List[int]] = [[] for _ in range(n)]
        self._logprobs: List[Optional[List[TokenLogprob]]] = [
            [] if r.params.logprobs is not None else None for r in tracked.requests
        ]
        self._finish: List[Optional[str]] = [None] * n
        self._stop: List[Union[None, int, str]] = [None] * n
        self.finished = False
        self._last_taken = False  # the finished output was returned: the iterator is exhausted

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._last_taken:
            raise StopAsyncIteration
        if not self.finished:
            events = [await self._tracked.out.get()]
            while not self._tracked.out.empty():
                events.append(self._tracked.out.get_nowait())
            for event in events:
                self._apply(event)
        self._last_taken = self.finished
        return self._snapshot()

    def _apply(self, event) -> None:
        if event is _WAKE_UP:
            return
        if isinstance(event, BaseException):
            self._last_taken = True
            self._end()
            raise event
        now, deltas = event
        got_tokens = False
        for d in deltas:
            self._tokens[d.index] += d.token_ids
            self._text[d.index] += d.text
            if d.logprobs is not None and self._logprobs[d.index] is not None:
                self._logprobs[d.index] += d.logprobs
            got_tokens = got_tokens or bool(d.token_ids)
            if d.finish_reason is not None:
                self._finish[d.index] = d.finish_reason
                self._stop[d.index] = d.stop_reason
        if got_tokens:
            m = self.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            else:
                m.inter_token_latencies.append(now - m.last_token_time)
            m.last_token_time = now
        if all(f is not None for f in self._finish):
            self._end()

    def _end(self) -> None:
        if not self.finished:
            self.finished = True
            self.metrics.finished_time = time.perf_counter()
            self._engine._release(self._tracked)

    def _snapshot(self) -> RequestOutput:
        outputs = [
            CompletionOutput(
                text=self._text[i],
                token_ids=list(self._tokens[i]),
                finish_reason=self._finish[i],
                prompt_token_ids=self.prompt_token_ids,
                logprobs=None if self._logprobs[i] is None else list(self._logprobs[i]),
                stop_reason=self._stop[i],
                cumulative_logprob=None if self._logprobs[i] is None else sum(e.logprob for e in self._logprobs[i]),
                index=i,
            )
            for i in range(len(self._tokens))
        ]
        return RequestOutput(self.request_id, self._tracked.prompt, self.prompt_token_ids, outputs, self.finished)

    def abort(self) -> None:
        """Stops the request now (its blocks are freed before the scheduler's next step); the
        iterator then gives one last output (finished, unfinished samples with "abort") and ends."""
        if self.finished:
            return
        for i, reason in enumerate(self._finish):
            if reason is None:
                self._finish[i] = "abort"
        self._engine._abort_tracked(self._tracked)
        self._end()
        self._tracked.out.put_nowait(_WAKE_UP)  # a consumer waiting for tokens gets the final output


class AsyncEngine:
    """An Engine for asyncio: `generate()` is an async iterator of RequestOutputs as tokens
    arrive; `abort(request_id)` stops one request; any number of coroutines share the engine.

    max_waiting_requests bounds the sequences admitted but not yet running (queued here or
    waiting in the scheduler): past it, a new request raises QueueFullError at once."""

    def __init__(self, engine: Engine, max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS):
        if not isinstance(engine, Engine):
            raise TypeError(f"AsyncEngine() takes an mc.Engine, got {type(engine).__name__}")
        if isinstance(max_waiting_requests, bool) or not isinstance(max_waiting_requests, int) or max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be an int >= 1, got {max_waiting_requests!r}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._commands: "queue.SimpleQueue[Tuple[str, Optional[_Tracked]]]" = queue.SimpleQueue()
        self._streams: Dict[str, RequestStream] = {}
        self._unfinished = 0            # sequences added and not yet finished (coroutine side)
        self._thread: Optional[threading.Thread] = None
        self._thread_lock = threading.Lock()
        self._failure: Optional[BaseException] = None
        self._generation_tokens = 0     # scheduler thread
        model = engine.model
        self.stats = EngineStats(num_blocks=model.num_blocks(), free_blocks=model.free_blocks())

    @classmethod
    def from_pretrained(cls, model_dir, *args, max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
                        **kwargs) -> "AsyncEngine":
        """Engine.from_pretrained(model_dir, *args, **kwargs), wrapped."""
        return cls(Engine.from_pretrained(model_dir, *args, **kwargs), max_waiting_requests)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def num_unfinished(self) -> int:
        """Sequences admitted and not finished."""
        return self._unfinished

    @property
    def num_waiting(self) -> int:
        """Sequences admitted but not (yet, or after a preemption, again) running."""
        return max(0, self._unfinished - self.stats.num_running)

    # -- the coroutine side ------------------------------------------------------------------

    async def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                          request_id: Optional[str] = None) -> RequestStream:
        """Admits one request and returns its stream once the scheduler has queued it. Raises
        (before anything runs) InvalidRequestError / ValueError / TypeError for a bad prompt or
        params, or one that could not fit the KV pool alone, and QueueFullError when the
        waiting queue is full."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [list(prompt)]
        else:
            raise _C.InvalidRequestError("prompt must be a str or a list of int token ids")
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = f"req-{uuid.uuid4().hex}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        if self._failure is not None:
            raise RuntimeError(f"the engine's scheduler thread failed: {self._failure}") from self._failure
        (requests,) = self.engine._requests(prompts, params)
        if self.num_waiting + len(requests) > self.max_waiting_requests:
            raise QueueFullError(
                f"the waiting queue is full ({self.num_waiting} sequences waiting, max_waiting_requests "
                f"{self.max_waiting_requests}); retry later"
            )
        out: asyncio.Queue = asyncio.Queue()
        tracked = _Tracked(request_id, prompt if isinstance(prompt, str) else None, requests,
                           asyncio.get_running_loop(), out)
        stream = RequestStream(self, tracked)
        self._streams[request_id] = stream
        self._unfinished += len(requests)
        self._ensure_thread()
        self._commands.put(("add", tracked))
        try:
            admitted = await out.get()
        except BaseException:
            stream.abort()
            raise
        if isinstance(admitted, BaseException):
            stream._end()
            raise admitted
        return stream

    async def generate(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """The RequestOutputs of one prompt (a str, encoded with BOS and no template as
        Engine.generate does, or token ids) as its tokens arrive, cumulative; the last has
        finished=True. Leaving the loop early (break, cancellation, an exception) aborts it."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> bool:
        """Stops a request: its blocks are freed before the next step, its iterator ends with
        finish_reason "abort". Returns whether it was still running."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        stream.abort()
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Aborts everything and stops the scheduler thread."""
        with self._thread_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._commands.put(("stop", None))
            thread.join(timeout)

    def _abort_tracked(self, tracked: _Tracked) -> None:
        if not tracked.aborted:
            tracked.aborted = True
            self._commands.put(("abort", tracked))

    def _release(self, tracked: _Tracked) -> None:
        if self._streams.get(tracked.request_id) is not None and self._streams[tracked.request_id]._tracked is tracked:
            del self._streams[tracked.request_id]
            self._unfinished -= len(tracked.requests)

    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mistral_cuda-scheduler", daemon=True)
                self._thread.start()

    # -- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        scheduler = self.engine.scheduler
        live: Dict[int, Tuple[_Tracked, int]] = {}   # core id -> (request, sample index)
        try:
            while True:
                commands = [self._commands.get()] if not live else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for kind, tracked in commands:
                    if kind == "stop":
                        self._abort_all(scheduler, live)
                        return
                    if kind == "add":
                        self._add(scheduler, tracked, live)
                    elif kind == "abort":
                        for core_id in tracked.core_ids:
                            scheduler.abort(core_id)
                            live.pop(core_id, None)
                self._record_stats(scheduler)
                if live:
                    self._step(scheduler, live)
                    self._record_stats(scheduler)
        except BaseException as e:  # noqa: B036 - every waiting coroutine must hear of it
            self._failure = e
            failed = {id(t): t for t, _ in live.values()}
            for tracked in failed.values():
                tracked.post(RuntimeError(f"the scheduler thread failed: {e}"))
            self._abort_all(scheduler, live)
            raise

    def _add(self, scheduler: _C.Scheduler, tracked: _Tracked, live: Dict[int, Tuple[_Tracked, int]]) -> None:
        if tracked.aborted:
            return
        for request in tracked.requests:
            request.started = time.perf_counter()
        try:
            ids = scheduler.add_group(tracked.requests[0].prompt_ids, [r.core_params() for r in tracked.requests])
        except Exception as e:  # noqa: BLE001 - a refused request goes back to its caller
            tracked.post(e)
            return
        tracked.core_ids = list(ids)
        for sample, core_id in enumerate(ids):
            tracked.requests[sample].core_id = core_id
            live[core_id] = (tracked, sample)
        tracked.post(None)

    def _step(self, scheduler: _C.Scheduler, live: Dict[int, Tuple[_Tracked, int]]) -> None:
        updates = scheduler.step()
        self._generation_tokens += sum(1 for update in updates if update[0] in live)
        # Before any token is posted: a client that has seen this step's tokens (and sends its
        # next request) finds the counts (running, free blocks) of this step, not the last one's.
        self._record_stats(scheduler)
        if not updates and scheduler.stats["last_batch_tokens"] == 0:
            raise _C.CacheFullError(
                "no request could be scheduled: the KV cache is held by sequences outside the scheduler"
            )
        now = time.perf_counter()
        touched: Dict[int, Tuple[_Tracked, Dict[int, _SampleDelta]]] = {}
        for core_id, token, logprob, rank, top, finish, stop_token in updates:
            entry = live.get(core_id)
            if entry is None:
                continue
            tracked, sample = entry
            request = tracked.requests[sample]
            request.on_token(token, logprob, rank, top, finish, stop_token)
            if request.finish_reason is not None:
                if not finish:  # a stop string or a guard: the core still runs it
                    scheduler.abort(core_id)
                del live[core_id]
            touched.setdefault(id(tracked), (tracked, {}))[1][sample] = None
        by_loop: Dict[int, Tuple[object, list]] = {}
        for tracked, samples in touched.values():
            if tracked.aborted:
                continue
            deltas = []
            for sample in samples:
                request = tracked.requests[sample]
                start, tracked.sent_tokens[sample] = tracked.sent_tokens[sample], len(request.generated)
                deltas.append(_SampleDelta(
                    index=sample,
                    token_ids=request.generated[start:],
                    text=request.take_delta(),
                    logprobs=None if request.logprobs is None else request.logprobs[start:],
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                ))
            by_loop.setdefault(id(tracked.loop), (tracked.loop, []))[1].append((tracked, (now, deltas)))
        for loop, items in by_loop.values():
            _post_all(loop, items)

    def _abort_all(self, scheduler: _C.Scheduler, live: Dict[int, Tuple[_Tracked, int]]) -> None:
        for core_id, (tracked, _) in list(live.items()):
            scheduler.abort(core_id)
            if not tracked.aborted:
                tracked.post(_C.Error("the engine was shut down"))
                tracked.aborted = True
        live.clear()
        self._record_stats(scheduler)

    def _record_stats(self, scheduler: _C.Scheduler) -> None:
        model = self.engine.model
        core = scheduler.stats
        self.stats = dataclasses.replace(
            self.stats, num_running=scheduler.num_running, free_blocks=model.free_blocks(),
            steps=core["steps"], preemptions=core["preemptions"], generation_tokens=self._generation_tokens,
        )
