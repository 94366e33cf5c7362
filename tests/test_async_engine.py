"""mc.AsyncEngine: many coroutines on one engine, abort, and an event loop that keeps running.

Oracle: the offline mc.Engine on the same checkpoint (seeded sampling depends on neither the
batch nor preemptions, so every coroutine's text must equal the offline one)."""

from __future__ import annotations

import asyncio
import time

import pytest

import chat_models as cm
import mistral_cuda as mc


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("v1", tmp_path_factory)


@pytest.fixture(scope="module")
def offline(v1):
    return cm.load_engine(v1)


@pytest.fixture
def engine(v1):
    # 12 blocks (2 per sequence under the window of 16) for 16 coroutines: preemptions happen.
    e = mc.AsyncEngine(cm.load_engine(v1, num_blocks=12, max_num_seqs=8))
    yield e
    e.shutdown()


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def final(engine, prompt, params, request_id=None):
    outputs = [o async for o in engine.generate(prompt, params, request_id)]
    assert outputs and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    for before, after in zip(outputs, outputs[1:]):  # cumulative
        for a, b in zip(before.outputs, after.outputs):
            assert b.text.startswith(a.text) and b.token_ids[: len(a.token_ids)] == a.token_ids
    return outputs[-1]


def test_concurrent_coroutines_match_offline(engine, offline):
    prompts = [f"Story number {i}: once upon a time" + " there was" * (i % 5) for i in range(16)]
    params = [mc.SamplingParams(n=1 + (i % 3 == 0), max_tokens=6 + i, seed=100 + i, temperature=1.0,
                                logprobs=2 if i % 4 == 0 else None, stop=["e t"] if i % 5 == 0 else None)
              for i in range(16)]

    async def main():
        return await asyncio.gather(*(final(engine, p, q, f"r{i}") for i, (p, q) in enumerate(zip(prompts, params))))

    results = run(main())
    refs = offline.generate(prompts, params)
    for result, ref, p in zip(results, refs, params):
        ref = ref if isinstance(ref, list) else [ref]
        assert [o.text for o in result.outputs] == [o.text for o in ref]
        assert [o.token_ids for o in result.outputs] == [o.token_ids for o in ref]
        assert [o.finish_reason for o in result.outputs] == [o.finish_reason for o in ref]
        if p.logprobs is not None:
            assert [e.logprob for e in result.outputs[0].logprobs] == pytest.approx(
                [e.logprob for e in ref[0].logprobs], abs=1e-6)
    assert engine.num_unfinished == 0 and engine.stats.free_blocks == engine.stats.num_blocks
    assert engine.stats.preemptions > 0  # the pool was too small for all of them


def test_abort_frees_blocks_and_ends_the_iterator(engine):
    async def main():
        long = mc.SamplingParams(max_tokens=900, ignore_eos=True, seed=1)
        seen = []

        async def consume():
            async for out in engine.generate("Once upon a time", long, request_id="long"):
                seen.append(out)
            return seen[-1]

        task = asyncio.ensure_future(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.001)
        assert engine.stats.free_blocks < engine.stats.num_blocks
        assert engine.abort("long") and not engine.abort("long") and not engine.abort("unknown")
        last = await task
        assert last.finished and last.outputs[0].finish_reason == "abort" and len(last.outputs[0].token_ids) < 900
        deadline = time.monotonic() + 5
        while engine.stats.free_blocks != engine.stats.num_blocks:  # freed before the next step
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        # A consumer that stops early (break) aborts too.
        async for out in engine.generate("Once upon a time", long):
            break
        cancelled = asyncio.ensure_future(final(engine, "Hello", long))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        while engine.num_unfinished or engine.stats.free_blocks != engine.stats.num_blocks:
            assert time.monotonic() < deadline + 5
            await asyncio.sleep(0.005)

    run(main())


class TimedScheduler:
    """The engine's core scheduler with the (start, end) time of every step() recorded."""

    def __init__(self, scheduler):
        self._scheduler = scheduler
        self.steps = []

    def step(self):
        start = time.perf_counter()
        try:
            return self._scheduler.step()
        finally:
            self.steps.append((start, time.perf_counter()))

    def __getattr__(self, name):
        return getattr(self._scheduler, name)


def test_event_loop_is_not_blocked(v1):
    """The event loop runs while a forward pass runs: a ticker coroutine's ticks (each needs the
    GIL and the loop) land inside the scheduler thread's step() calls. (Structural, not a timing
    bound: a step that held the GIL or the loop would admit no tick inside it.)"""
    core = cm.load_engine(v1, num_blocks=64, max_num_seqs=8)
    timed = TimedScheduler(core.scheduler)
    core._scheduler = timed
    engine = mc.AsyncEngine(core)

    async def main():
        ticks, stop = [], asyncio.Event()

        async def ticker():
            while not stop.is_set():
                await asyncio.sleep(0.001)
                ticks.append(time.perf_counter())

        tick = asyncio.ensure_future(ticker())
        params = mc.SamplingParams(max_tokens=200, ignore_eos=True, seed=2)
        await asyncio.gather(*(final(engine, "word " * (50 * i + 1), params) for i in range(4)))
        stop.set()
        await tick
        return ticks

    try:
        ticks = run(main())
    finally:
        engine.shutdown()
    inside = sum(any(start < t < end for start, end in timed.steps) for t in ticks)
    assert len(timed.steps) >= 200 and inside >= 20, (len(timed.steps), len(ticks), inside)


def test_bad_requests_raise_before_running(engine):
    async def main():
        with pytest.raises(mc.InvalidRequestError):
            await engine.add_request([1, 10**9], mc.SamplingParams())
        with pytest.raises(mc.InvalidRequestError):
            await engine.add_request(3.5)
        with pytest.raises(TypeError):
            await engine.add_request("hi", {"max_tokens": 3})
        stream = await engine.add_request("hi", mc.SamplingParams(max_tokens=50, ignore_eos=True), "dup")
        with pytest.raises(ValueError, match="already running"):
            await engine.add_request("hi", None, "dup")
        stream.abort()
        assert engine.num_unfinished == 0

    run(main())


def test_waiting_queue_bound(v1):
    engine = mc.AsyncEngine(cm.load_engine(v1, max_num_seqs=1), max_waiting_requests=2)
    try:
        async def main():
            p = mc.SamplingParams(max_tokens=500, ignore_eos=True)
            streams = [await engine.add_request("hi", p) for _ in range(3)]  # one may run at once
            while engine.stats.num_running == 0:
                await asyncio.sleep(0.001)
            with pytest.raises(mc.QueueFullError):
                await engine.add_request("hi", p)
            for s in streams:
                s.abort()
            assert engine.num_waiting == 0
            await final(engine, "hi", mc.SamplingParams(max_tokens=3))

        run(main())
    finally:
        engine.shutdown()
    with pytest.raises(ValueError):
        mc.AsyncEngine(engine.engine, max_waiting_requests=0)


def test_request_larger_than_the_pool_is_refused(mistral_full, load_engine):
    """Full attention, 4 blocks of 16: a 100-token prompt cannot fit even alone; the core's
    refusal comes back to add_request, and the engine goes on."""
    engine = mc.AsyncEngine(load_engine(mistral_full, num_blocks=4, progress=False))
    try:
        async def main():
            with pytest.raises(mc.InvalidRequestError):
                await engine.add_request(list(range(1, 101)), mc.SamplingParams(max_tokens=4))
            assert engine.num_unfinished == 0
            out = await final(engine, [1, 2, 3], mc.SamplingParams(max_tokens=4, seed=0))
            assert len(out.outputs[0].token_ids) == 4

        run(main())
    finally:
        engine.shutdown()


requires_cuda = pytest.mark.skipif(
    not (mc._C.cuda_compiled() and mc._C.cuda_device_count() > 0), reason="needs an NVIDIA GPU and the CUDA backend"
)


@pytest.mark.cuda
@requires_cuda
def test_cuda_engine_stepped_from_the_scheduler_thread(v1):
    """On CUDA the scheduler thread, not the loading thread, runs every forward pass: seeded
    coroutines under preemption give exactly the offline CUDA engine's tokens."""
    offline = cm.load_engine(v1, device="cuda")
    engine = mc.AsyncEngine(cm.load_engine(v1, device="cuda", num_blocks=12, max_num_seqs=8))
    prompts = [f"Request {i} begins" + " and goes on" * (i % 4) for i in range(12)]
    params = [mc.SamplingParams(max_tokens=5 + i, seed=500 + i, temperature=0.9, top_k=50) for i in range(12)]
    try:
        async def main():
            return await asyncio.gather(*(final(engine, p, q) for p, q in zip(prompts, params)))

        results = run(main())
        assert engine.stats.preemptions > 0
    finally:
        engine.shutdown()
    for result, ref in zip(results, offline.generate(prompts, params)):
        assert result.outputs[0].token_ids == ref.token_ids
