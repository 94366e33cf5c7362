"""`mistral-cuda serve`: a real uvicorn server on a free 127.0.0.1 port, talked to with the
official `openai` client and with raw HTTP (httpx).

Oracle: the offline mc.Engine on the same checkpoint (a tiny random model with the real v1
tokenizer from mistral_common). Sampling is keyed by (seed, stream, position), so a seeded
request must give exactly the offline text whatever the server's batch and preemptions.
Every server started here is shut down by its fixture; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mistral_common

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import chat_models as cm  # noqa: E402
import mistral_cuda as mc  # noqa: E402
from mistral_cuda.async_engine import AsyncEngine  # noqa: E402
from mistral_cuda.server import build_app  # noqa: E402

MODEL = "tiny-v1"
KEY = "test-key-123"


class ServerThread:
    """uvicorn serving `app` in a thread, on a socket bound to 127.0.0.1 port 0."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("v1", tmp_path_factory)


@pytest.fixture(scope="module")
def offline(v1):
    return cm.load_engine(v1)


@pytest.fixture(scope="module")
def server(v1):
    # A small pool (sliding window 16: at most 2 blocks of 16 per sequence) so the load test
    # preempts; max_num_seqs 24 so most requests wait.
    engine = AsyncEngine(cm.load_engine(v1, num_blocks=40, max_num_seqs=24, max_num_batched_tokens=256))
    s = ServerThread(build_app(engine, MODEL))
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed_server(v1):
    """API key required; one running sequence and one waiting at most (for 503)."""
    engine = AsyncEngine(cm.load_engine(v1, num_blocks=16, max_num_seqs=1), max_waiting_requests=1)
    s = ServerThread(build_app(engine, MODEL, api_key=KEY))
    s.engine = engine
    yield s
    s.close()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def metrics(url: str, headers=None) -> dict:
    r = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    values = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            values[key] = sample.value
    return values


def wait_idle(url: str, headers=None, timeout: float = 15) -> dict:
    """/metrics once nothing runs or waits and no KV block is held (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url, headers)
        busy = (m["mistral_cuda:num_requests_running"], m["mistral_cuda:num_requests_waiting"],
                m["mistral_cuda:kv_cache_usage_perc"])
        if busy == (0, 0, 0):
            return m
        assert time.monotonic() < deadline, f"still busy (running, waiting, kv usage) = {busy}"
        time.sleep(0.05)


def sse_events(text: str) -> list:
    """The events of an SSE body, checked to be exactly `data: ...\\n\\n` blocks."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), text[:500]
    assert blocks[-1] == "data: [DONE]" and "data: [DONE]" not in blocks[:-1]
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


# ---- basics -----------------------------------------------------------------------------

def test_default_bind_is_loopback():
    from mistral_cuda.cli import build_parser

    args = build_parser().parse_args(["serve", "some_dir"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None


def test_health_models_and_metric_names(server, client):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]
    m = metrics(server.url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total"):
        assert "mistral_cuda:" + name in m, sorted(m)


def test_completions_match_offline_engine(server, client, offline):
    prompt = "The weather today is sunny and warm."
    p = mc.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, presence_penalty=0.5,
                          frequency_penalty=0.25)
    ref = offline.generate(prompt, p)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
                                  presence_penalty=0.5, frequency_penalty=0.25)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, top_p=0.9,
                                            seed=1234, presence_penalty=0.5, frequency_penalty=0.25, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    # vLLM's extra fields through extra_body
    p = mc.SamplingParams(max_tokens=9, temperature=0.8, top_k=20, min_p=0.05, repetition_penalty=1.3, min_tokens=9,
                          seed=7)
    ref = offline.generate(prompt, p)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0.8, seed=7,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 9})
    assert r.choices[0].text == ref.text


def test_token_counters_follow_usage(server, client):
    """prompt_tokens_total and generation_tokens_total grow by exactly a request's usage."""
    before = wait_idle(server.url)
    r = client.completions.create(model=MODEL, prompt="Counting tokens", max_tokens=7, seed=3, n=2,
                                  extra_body={"ignore_eos": True})
    after = wait_idle(server.url)
    assert r.usage.completion_tokens == 14
    assert after["mistral_cuda:generation_tokens_total"] - before["mistral_cuda:generation_tokens_total"] == 14
    assert after["mistral_cuda:prompt_tokens_total"] - before["mistral_cuda:prompt_tokens_total"] == r.usage.prompt_tokens


def test_chat_matches_offline_engine(server, client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a French cheese."}]
    p = mc.SamplingParams(max_tokens=10, temperature=1.0, seed=99, stop=["e"])
    ref = offline.chat(messages, p)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, seed=99, stop=["e"],
                                       user="someone")
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=99, stop=["e"],
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == ref.finish_reason and all(f is None for f in finishes[:-1])


def test_raw_sse_and_n_with_logprobs(server, offline):
    """n=2 chat with top_logprobs, as raw SSE: role deltas first, one finish per choice, usage
    last; texts and logprobs equal the offline engine's two samples."""
    messages = [{"role": "user", "content": "Count to five."}]
    ids = offline.tokenizer.encode_chat(messages)
    ref = offline.generate([ids], mc.SamplingParams(n=2, max_tokens=8, seed=5, logprobs=3))[0]
    body = {"model": MODEL, "messages": messages, "n": 2, "max_tokens": 8, "seed": 5, "logprobs": True,
            "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == sum(len(o.token_ids) for o in ref)
    assert all(e["usage"] is None for e in events[:-1])
    for i, o in enumerate(ref):
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content") or "" for c in mine) == o.text
        assert [c["finish_reason"] for c in mine].count(None) == len(mine) - 1 and mine[-1]["finish_reason"]
        content = [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert [t["logprob"] for t in content] == pytest.approx([e.logprob for e in o.logprobs], abs=1e-6)
        for t, e in zip(content, o.logprobs):
            assert len(t["top_logprobs"]) == 3
            best = sorted(e.top_logprobs.values(), reverse=True)[:3]
            assert [x["logprob"] for x in t["top_logprobs"]] == pytest.approx(best, abs=1e-6)
            assert t["bytes"] == list(t["token"].encode())
    # The same request not streamed: same texts and logprobs.
    body["stream"] = False
    del body["stream_options"]
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert [c["message"]["content"] for c in r["choices"]] == [o.text for o in ref]
    assert [t["logprob"] for t in r["choices"][1]["logprobs"]["content"]] == pytest.approx(
        [e.logprob for e in ref[1].logprobs], abs=1e-6)


def test_completion_logprobs_shape(server, offline):
    prompt = "1, 2, 3,"
    ref = offline.generate(prompt, mc.SamplingParams(max_tokens=5, seed=3, logprobs=2))[0]
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 5, "seed": 3, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-6)
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_chat_with_tools_on_v3(tmp_path_factory):
    """tools reach the template; a completion forced to start with [TOOL_CALLS] (logit_bias)
    ends as Engine.chat ends it (its calls, or its text when they do not parse), streamed or not."""
    v3 = cm.get_chat_model("v3", tmp_path_factory)
    offline = cm.load_engine(v3)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    call = offline.tokenizer.tool_call_token
    p = mc.SamplingParams(max_tokens=12, seed=4, logit_bias={call: 30.0})
    ref = offline.chat(messages, p, tools=TOOLS)
    assert ref.token_ids[0] == call
    s = ServerThread(build_app(mc.AsyncEngine(cm.load_engine(v3)), MODEL))
    try:
        body = {"model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 12, "seed": 4,
                "logit_bias": {str(call): 30.0}}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()
        choice = r["choices"][0]
        assert r["usage"]["prompt_tokens"] == len(offline.tokenizer.encode_chat(messages, tools=TOOLS))
        assert choice["finish_reason"] == ref.finish_reason
        assert choice["message"]["content"] == (ref.text if not ref.tool_calls else None)
        assert [c["function"] for c in choice["message"].get("tool_calls") or []] == [
            c["function"] for c in ref.tool_calls or []]
        events = sse_events(httpx.post(s.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=60).text)
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d.get("content") or "" for d in deltas) == (ref.text if not ref.tool_calls else "")
        assert events[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    finally:
        s.close()


# ---- load: 256 concurrent streams, a quarter cancelled --------------------------------------

def test_parsed_tool_calls_through_the_openai_client():
    """A reply that is a valid [TOOL_CALLS] payload reaches the client as OpenAI's tool_calls
    (content None, finish_reason "tool_calls"), streamed and not. The model is scripted (see
    tests/scripted_model.py) so that it emits exactly that payload; the response shapes are
    checked by the official openai client's own types."""
    from scripted_model import ScriptedModel, engine_on

    tok = mc.Tokenizer.from_file(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    payload = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    script = [tok.tool_call_token, *tok.encode(payload, bos=False)]
    model = ScriptedModel(tok.vocab_size, tok.eos_id, {tuple(tok.encode_chat(messages, tools=TOOLS)): script})
    s = ServerThread(build_app(mc.AsyncEngine(engine_on(model, tok)), MODEL))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=64)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert reply.usage.completion_tokens == len(script) + 1  # + EOS

        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=64,
                                                     stream=True))
        calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
        assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            (0, "get_weather", {"city": "Paris"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    finally:
        s.close()


def test_256_concurrent_streams_with_cancellations(server, offline):
    rng = random.Random(13)
    words = "the of and a to in is you that it he was for on are as with his they at be this".split()
    jobs = []
    for i in range(256):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
        chat = i % 3 == 0
        jobs.append(dict(
            i=i, prompt=prompt, chat=chat, max_tokens=rng.randint(4, 20), seed=rng.randrange(2**63),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            cancel_after=rng.randint(0, 4) if i % 4 == 3 else None,  # chunks read before the client leaves
        ))

    async def one(http: httpx.AsyncClient, job: dict) -> dict:
        if job["chat"]:
            path = "/v1/chat/completions"
            body = {"messages": [{"role": "user", "content": job["prompt"]}]}
        else:
            path, body = "/v1/completions", {"prompt": job["prompt"]}
        body.update(model=MODEL, max_tokens=job["max_tokens"], seed=job["seed"], temperature=job["temperature"],
                    stream=True)
        texts, finish, events = [], None, 0
        async with http.stream("POST", path, json=body) as r:
            status = r.status_code
            if status != 200:
                return dict(status=status, body=(await r.aread()).decode())
            async for line in r.aiter_lines():
                if job["cancel_after"] is not None and events >= job["cancel_after"]:
                    return dict(status=status, cancelled=True)  # leaving the block closes the connection
                if not line:
                    continue
                assert line.startswith("data: "), line
                if line == "data: [DONE]":
                    break
                events += 1
                choice = json.loads(line[6:])["choices"][0]
                texts.append(choice["delta"].get("content") or "" if job["chat"] else choice["text"])
                finish = choice["finish_reason"] or finish
        return dict(status=status, text="".join(texts), finish=finish)

    async def run_all():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, j) for j in jobs)), 180)

    start = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - start
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:3]

    done = [(j, r) for j, r in zip(jobs, results) if not r.get("cancelled")]
    assert len(done) >= 192
    prompts = [offline.tokenizer.encode_chat([{"role": "user", "content": j["prompt"]}]) if j["chat"] else j["prompt"]
               for j, _ in done]
    params = [mc.SamplingParams(max_tokens=j["max_tokens"], seed=j["seed"], temperature=j["temperature"])
              for j, _ in done]
    refs = offline.generate(prompts, params)
    for (j, r), ref in zip(done, refs):
        assert r["text"] == ref.text and r["finish"] == ref.finish_reason, (j, r, ref.text)
    m = wait_idle(server.url)
    assert m["mistral_cuda:e2e_request_latency_seconds_count"] >= len(done)
    assert m["mistral_cuda:num_preemptions_total"] > 0  # the pool (40 blocks) was too small for the batch
    print(f"256 streams ({256 - len(done)} cancelled) in {elapsed:.1f}s")


GENERATED = "mistral_cuda:generation_tokens_total"


def test_disconnect_mid_stream_frees_blocks_at_once(server):
    """The request ends with its client: its blocks are freed and it never reaches its 900 tokens."""
    before = wait_idle(server.url)[GENERATED]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line]
            assert got and got[0].startswith("data: ")
            assert metrics(server.url)["mistral_cuda:kv_cache_usage_perc"] > 0
    assert wait_idle(server.url, timeout=60)[GENERATED] - before < 900


def test_disconnect_before_a_non_streamed_answer_aborts(server):
    before = wait_idle(server.url)[GENERATED]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    assert wait_idle(server.url, timeout=60)[GENERATED] - before < 900


# ---- errors -----------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}

BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", dict(CHAT, messages=[]), 400, "messages"),
    ("/v1/chat/completions", dict(CHAT, temperature="hot"), 400, "temperature"),
    ("/v1/chat/completions", dict(CHAT, n="2"), 400, "n"),
    ("/v1/chat/completions", dict(CHAT, n=0), 400, "n"),
    ("/v1/chat/completions", dict(CHAT, max_tokens=1.5), 400, "max_tokens"),
    ("/v1/chat/completions", dict(CHAT, top_p=0), 400, "top_p"),
    ("/v1/chat/completions", dict(CHAT, seed=-1), 400, "seed"),
    ("/v1/chat/completions", dict(CHAT, stop=[""]), 400, "stop"),
    ("/v1/chat/completions", dict(CHAT, logit_bias={"abc": 1}), 400, "logit_bias"),
    ("/v1/chat/completions", dict(CHAT, logit_bias={"5": 1000}), 400, "logit_bias"),
    ("/v1/chat/completions", dict(CHAT, top_logprobs=50, logprobs=True), 400, "top_logprobs"),
    ("/v1/chat/completions", dict(CHAT, temprature=0.5), 400, "temprature"),
    ("/v1/chat/completions", dict(CHAT, stream_options={"include_usage": True, "x": 1}), 400, "stream_options.x"),
    ("/v1/chat/completions", dict(CHAT, messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("/v1/chat/completions", dict(CHAT, messages=["hi"]), 400, "messages.0"),
    ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": "word " * 1100}]), 400, "messages"),
    ("/v1/chat/completions", dict(CHAT, max_tokens=5000), 400, "max_tokens"),
    ("/v1/chat/completions", dict(CHAT, model="gpt-4"), 404, "model"),
    ("/v1/completions", dict(COMPLETION, prompt=""), 400, "prompt"),
    ("/v1/completions", dict(COMPLETION, prompt=[1, 99999999]), 400, "prompt"),
    ("/v1/completions", dict(COMPLETION, prompt=list(range(1, 1200))), 400, "prompt"),
    ("/v1/completions", dict(COMPLETION, prompt="word " * 1100), 400, "prompt"),
    ("/v1/completions", dict(COMPLETION, prompt={"text": "hi"}), 400, "prompt"),
    ("/v1/completions", dict(COMPLETION, echo=True), 400, "echo"),
    ("/v1/completions", dict(COMPLETION, stop_token_ids=[-3]), 400, "stop_token_ids"),
    ("/v1/completions", dict(COMPLETION, frequency_penalty=3), 400, "frequency_penalty"),
    ("/v1/completions", dict(COMPLETION, min_tokens=30, max_tokens=10), 400, "min_tokens"),
    ("/v1/completions", dict(COMPLETION, model=None), 400, "model"),
    ("/v1/completions", b'{"model": "tiny-v1", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-v1", "prompt": "hi", "logit_bias": {"5": Infinity}}', 400, "logit_bias.5"),
    ("/v1/completions", dict(COMPLETION, logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("/v1/completions", dict(COMPLETION, stop_token_ids=[99999999]), 400, "stop_token_ids"),
    ("/v1/completions", b'{"model": "tiny-v1", "prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-v1", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ("/v1/nothing", COMPLETION, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error


def test_oversized_bodies_get_413_before_parsing(server):
    """A body past MAX_REQUEST_BYTES is refused by its Content-Length, or while it streams in
    (chunked, no length), with OpenAI's error JSON."""
    from mistral_cuda.server import MAX_REQUEST_BYTES

    big = json.dumps(dict(COMPLETION, prompt="x" * (MAX_REQUEST_BYTES + 10))).encode()
    r = httpx.post(server.url + "/v1/completions", content=big, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text[:300]

    def chunks():
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:300]


FUZZ_VALUES = [None, True, 0, 1, -1, 3.5, 1e308, 2**64, "", "x", "1", [], [1], ["a"], [""], {}, {"a": 1}, {"1": 1},
               [[1]], [None], [{"role": "user", "content": "hi"}], {"include_usage": True}, "auto", {"type": "text"}]
CHAT_FIELDS = ["messages", "model", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens",
               "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "user",
               "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "logprobs",
               "top_logprobs", "tools", "tool_choice", "response_format", "unknown_field"]
COMPLETION_FIELDS = ["prompt", "model", "n", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed",
                     "stop", "logit_bias", "top_k", "min_p", "min_tokens", "stop_token_ids", "logprobs", "echo",
                     "best_of", "suffix", "unknown_field"]


def test_random_bodies_never_get_a_5xx(server):
    """Valid bodies with 1..3 fields set to random JSON values: 200 (a complete answer or
    stream) or a 4xx with OpenAI's error JSON, never a 5xx."""
    rng = random.Random(2024)
    statuses = {}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(150):
            chat = rng.random() < 0.5
            body = dict(CHAT if chat else COMPLETION, max_tokens=3)
            for _ in range(rng.randint(1, 3)):
                body[rng.choice(CHAT_FIELDS if chat else COMPLETION_FIELDS)] = rng.choice(FUZZ_VALUES)
            for field, cap in (("max_tokens", 3), ("max_completion_tokens", 3), ("n", 3)):
                if type(body.get(field)) is int and body[field] > cap:
                    body[field] = cap
            r = http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, (body, r.text)
            elif r.headers["content-type"].startswith("text/event-stream"):
                sse_events(r.text)
            else:
                assert r.json()["choices"], (body, r.text)
    assert statuses.get(200) and statuses.get(400), statuses


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_api_key_and_queue_full(keyed_server, monkeypatch):
    url = keyed_server.url
    engine = keyed_server.engine
    step = engine._step

    def slow_step(*args):  # 10 ms a step, so the first request is still running when the third comes
        time.sleep(0.01)
        step(*args)

    monkeypatch.setattr(engine, "_step", slow_step)
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
            r = httpx.request(method, url + path, headers=headers, json=COMPLETION, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path, r.text)
    auth = {"Authorization": f"Bearer {KEY}"}
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    long = dict(COMPLETION, max_tokens=900, ignore_eos=True, stream=True)
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: closing the iterator would close the connection
            next(line for line in lines if line)  # it runs (max_num_seqs 1)
            with http.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200
                deadline = time.monotonic() + 10
                while metrics(url, auth)["mistral_cuda:num_requests_waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                r = http.post("/v1/completions", json=COMPLETION)
                assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
    wait_idle(url, auth)
    assert httpx.post(url + "/v1/completions", json=COMPLETION, headers=auth, timeout=30).status_code == 200


# ---- the command line -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(v1, offline):
    """`python -m mistral_cuda serve MODEL_DIR`: starts on loopback, answers, stops on SIGINT."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="2", MISTRAL_CUDA_API_KEY=KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral_cuda", "serve", str(v1.path), "--port", str(port), "--device", "cpu",
         "--num-blocks", "64", "--served-model-name", MODEL, "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0) as c:
            r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=6, seed=1)
        assert r.choices[0].text == offline.generate("Hello", mc.SamplingParams(max_tokens=6, seed=1))[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert "Traceback" not in err, err


@pytest.mark.parametrize("flags,pattern", [
    (["--port", "70000"], "--port"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-waiting-requests", "-1"], "--max-waiting-requests"),
    (["--api-key", " "], "--api-key"),
    (["--dtype", "int3"], "--dtype"),
    (["--host"], "--host"),
])
def test_serve_flags_checked_before_loading(v1, flags, pattern, capsys, monkeypatch):
    from mistral_cuda import cli, server

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server, "run_server", no_load)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", str(v1.path), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and pattern in err and "usage" in err, err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "/no/such/dir"])
    assert exit_.value.code == 2 and "MODEL_DIR" in capsys.readouterr().err


def test_readme_serving_section_matches_parser():
    from mistral_cuda.cli import build_parser

    parser = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["serve"]
    known = {a.option_strings[0]: str(a.default) for a in parser._actions if a.option_strings and a.dest != "help"}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Serving", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `([^`]*)` \|", section, re.M))
    assert table == known
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "time_to_first_token_seconds",
                 "inter_token_latency_seconds", "e2e_request_latency_seconds", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total"):
        assert f"mistral_cuda:{name}" in section
