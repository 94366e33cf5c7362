#!/usr/bin/env python3
"""Serving load test, in the manner of vLLM's benchmark_serving.py.

Starts `mistral-cuda serve MODEL_DIR` on a free 127.0.0.1 port (or uses --base-url, loopback
only), then sends --num-prompts streaming /v1/completions requests from --max-concurrency
concurrent clients (or at a Poisson --request-rate), with prompts of mixed length (random
words, --input-len MIN:MAX tokens) and outputs of --output-len MIN:MAX tokens (ignore_eos, so
every request generates exactly its max_tokens), seeded. Reports requests/s, output tokens/s,
and mean / p50 / p99 of time to first token (TTFT), inter-token latency (ITL, the gaps between
streamed chunks) and end-to-end latency.

Peer, same run, same machine, same OpenMP wait policy (passive, as `serve` sets it on the CPU),
while the server idles: the offline mc.Engine generating the
same requests in one call (continuous batching without HTTP); server load and offline run
alternate --repeats times and the best of each is reported. The ratio server / offline is the
cost of the HTTP path and of the clients (on the same cores); the seeded texts must be identical.

Second peer, when llama.cpp is built (`bash benches/setup_llama_cpp.sh`; --llama-server auto):
llama.cpp's own OpenAI-compatible llama-server on the same weights (converted to GGUF: f32 for
an f32 checkpoint, else f16), one slot per client, the same threads, the same requests and
clients, measured in the same alternation. Its sampler differs, so only speed is compared. The
GGUF conversion drops Mistral's sliding window (llama.cpp's llama architecture has none): with
prompts longer than the window, llama-server attends over more keys than we do.

Usage: python benches/bench_serve.py [MODEL_DIR] [--quick]   (default MODEL_DIR: the demo model)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List
from urllib.parse import urlparse

import httpx

import mistral_cuda as mc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp_peer as lcp  # noqa: E402

MAX_PROMPTS = 5000  # the load is bounded
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact the of and a to in is you that it he was for on are").split()


@dataclass
class Result:
    ok: bool
    text: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    itl: List[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def span(text: str) -> tuple:
    low, _, high = text.partition(":")
    low, high = int(low), int(high or low)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def loopback_url(text: str) -> str:
    host = urlparse(text).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise argparse.ArgumentTypeError(f"--base-url must be a loopback address, got {text!r}")
    return text.rstrip("/")


def make_requests(tokenizer, n: int, input_len: tuple, output_len: tuple, seed: int) -> list:
    """(prompt text, its token count, max_tokens, seed) per request."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        target = rng.randint(*input_len)
        words = []
        while len(tokenizer.encode(" ".join(words), bos=True)) < target:
            words.append(rng.choice(WORDS))
        prompt = " ".join(words)
        requests.append((prompt, len(tokenizer.encode(prompt, bos=True)), rng.randint(*output_len), 1000 + i))
    return requests


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "temperature": 0.8,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last, pieces, result = start, [], Result(ok=False)
    chunks = 0  # streamed choice events: one token each, for a server that sends no usage
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(ok=False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if not event["choices"]:
                    result.output_tokens = event["usage"]["completion_tokens"]
                    continue
                chunks += 1
                text = event["choices"][0]["text"]
                if not text:
                    continue
                now = time.perf_counter()
                if not pieces:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                pieces.append(text)
    except httpx.HTTPError as e:
        return Result(ok=False, error=f"{type(e).__name__}: {e}")
    result.ok, result.text, result.latency = True, "".join(pieces), time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    return result


async def run_load(base_url: str, model: str, requests: list, concurrency: int, rate: float, seed: int):
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600) as http:
        await one_request(http, model, "warm up", 2, 0)

        async def limited(prompt, max_tokens, request_seed):
            async with gate:
                return await one_request(http, model, prompt, max_tokens, request_seed)

        tasks = []
        start = time.perf_counter()
        for prompt, _, max_tokens, request_seed in requests:
            tasks.append(asyncio.ensure_future(limited(prompt, max_tokens, request_seed)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(command: list) -> subprocess.Popen:
    """A server process whose output goes to a temporary file (a pipe nobody reads would fill
    and block it: llama-server logs every request), kept as proc.log."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, what: str, timeout: float = 300) -> None:
    """Until GET /health answers 200 (both servers answer 503 while they load), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise SystemExit(f"{what} exited: {proc.log.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{what} did not start within {timeout:.0f} s")
        time.sleep(0.2)


def start_server(args) -> tuple:
    port = free_port()
    command = [sys.executable, "-m", "mistral_cuda", "serve", args.model_dir, "--port", str(port),
               "--device", args.device, "--served-model-name", "bench", "--log-level", "warning",
               "--max-num-seqs", str(args.max_num_seqs)]
    if args.num_blocks:
        command += ["--num-blocks", str(args.num_blocks)]
    proc = spawn(command)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "mistral-cuda serve")
    return proc, url


def kv_capacity(args) -> tuple:
    """(sequences, tokens each) of KV cache both servers get: one sequence per client, each with
    room for the longest request."""
    return min(args.max_concurrency, args.max_num_seqs), args.input_len[1] + args.output_len[1] + 16


def start_llama_server(args, gguf, threads: int) -> tuple:
    """llama-server on 127.0.0.1 with kv_capacity(args): one slot per sequence."""
    port = free_port()
    slots, slot_context = kv_capacity(args)
    command = [str(lcp.server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(slots * slot_context), "-t", str(threads), "-tb", str(threads),
               "--no-webui"]
    proc = spawn(command)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "llama-server")
    return proc, url


def checkpoint_gguf_type(model_dir: str) -> str:
    """The GGUF weight type matching what our engine runs the checkpoint in on the CPU."""
    with open(os.path.join(model_dir, "config.json")) as f:
        dtype = json.load(f).get("torch_dtype", "float32")
    return "f32" if dtype == "float32" else "f16"


def summarize(results: List[Result], elapsed: float, requests: list) -> dict:
    good = [r for r in results if r.ok]
    return {
        "ok": len(good), "failed": len(results) - len(good), "elapsed": elapsed,
        "output_tokens": sum(r.output_tokens for r in good),
        "input_tokens": sum(req[1] for req, r in zip(requests, results) if r.ok),
        "TTFT": [r.ttft for r in good], "ITL": [gap for r in good for gap in r.itl],
        "E2E latency": [r.latency for r in good],
    }


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=None, help="model directory (None: the demo model)")
    parser.add_argument("--num-prompts", type=int, default=128, help=f"requests sent (1..{MAX_PROMPTS})")
    parser.add_argument("--max-concurrency", type=int, default=32, help="clients with a request in flight")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s (Poisson arrivals); inf sends them all at once")
    parser.add_argument("--input-len", type=span, default=(16, 512), help="prompt tokens, MIN:MAX")
    parser.add_argument("--output-len", type=span, default=(32, 128), help="generated tokens, MIN:MAX")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the server's --max-num-seqs")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="the server's --num-blocks (None: room for every client's longest request, "
                             "as llama-server gets)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--base-url", type=loopback_url, default=None,
                        help="a server already running on loopback (serving MODEL_DIR as 'bench')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, choices=range(1, 6), metavar="R",
                        help="server and offline runs, alternated; the best of each is reported (1..5)")
    parser.add_argument("--quick", action="store_true", help="32 prompts, inputs 16..256, outputs 16..64")
    parser.add_argument("--llama-server", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp's llama-server as a second peer (auto: when benches/setup_llama_cpp.sh has built it)")
    args = parser.parse_args()
    if "OMP_WAIT_POLICY" not in os.environ:
        # The same OpenMP policy as `mistral-cuda serve` on the CPU (passive), so that the
        # ratio measures the HTTP path, not the policy; libgomp reads it when it is loaded.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.quick:
        args.num_prompts, args.input_len, args.output_len = 32, (16, 256), (16, 64)
    if not 1 <= args.num_prompts <= MAX_PROMPTS or args.max_concurrency < 1:
        parser.error(f"--num-prompts must be in 1..{MAX_PROMPTS} and --max-concurrency >= 1")
    if args.model_dir is None:
        from mistral_cuda.demo import default_cache_dir, demo_checkpoint

        args.model_dir = str(demo_checkpoint(default_cache_dir())[0])

    if args.num_blocks is None:
        sequences, tokens = kv_capacity(args)
        args.num_blocks = sequences * -(-tokens // 16)  # blocks of 16 tokens (serve's block size)
    tokenizer = mc.Tokenizer.from_file(mc.tokenizer.find_tokenizer_file(args.model_dir))
    requests = make_requests(tokenizer, args.num_prompts, args.input_len, args.output_len, args.seed)

    # The peer: the offline engine on the same requests, in this process, while the server idles.
    engine = mc.Engine.from_pretrained(args.model_dir, device=args.device, max_num_seqs=args.max_num_seqs,
                                       num_blocks=args.num_blocks, progress=False)
    params = [mc.SamplingParams(max_tokens=m, seed=s, temperature=0.8, ignore_eos=True) for _, _, m, s in requests]
    engine.generate(["warm up"], mc.SamplingParams(max_tokens=2, seed=0))

    llama = None
    if args.llama_server != "off" and args.device != "cuda":
        try:
            gguf = lcp.gguf_for(args.model_dir, checkpoint_gguf_type(args.model_dir))
            llama = start_llama_server(args, gguf, os.cpu_count() or 2)
        except lcp.LlamaCppNotReady as e:
            if args.llama_server == "on":
                raise SystemExit(str(e))
            print(f"llama-server peer skipped: {e}", file=sys.stderr)

    proc = None
    if args.base_url is None:
        proc, base_url = start_server(args)
    else:
        base_url = args.base_url
    # Server load, offline run and llama-server load alternate --repeats times; the best of each
    # is reported (the machine may be shared: a burst of other work then hits all alike).
    runs, offline_runs, llama_runs = [], [], []
    try:
        for repeat in range(args.repeats):
            runs.append(asyncio.run(run_load(base_url, "bench", requests, args.max_concurrency, args.request_rate,
                                             args.seed)))
            print(f"[{repeat + 1}/{args.repeats}] mistral_cuda serve: {runs[-1][1]:.1f} s", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            offline = engine.generate([req[0] for req in requests], params)
            offline_runs.append((offline, time.perf_counter() - t0))
            print(f"[{repeat + 1}/{args.repeats}] offline Engine: {offline_runs[-1][1]:.1f} s", file=sys.stderr, flush=True)
            if llama is not None:
                llama_runs.append(asyncio.run(run_load(llama[1], "bench", requests, args.max_concurrency,
                                                       args.request_rate, args.seed)))
                print(f"[{repeat + 1}/{args.repeats}] llama-server: {llama_runs[-1][1]:.1f} s", file=sys.stderr,
                      flush=True)
    finally:
        for server in (proc, llama[0] if llama else None):
            if server is not None:
                server.terminate()
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(30)
    results, elapsed = min(runs, key=lambda run: run[1])
    offline, offline_s = min(offline_runs, key=lambda run: run[1])
    ours = summarize(results, elapsed, requests)
    columns = [("mistral_cuda serve", ours)]
    if llama_runs:
        columns.append(("llama-server", summarize(*min(llama_runs, key=lambda run: run[1]), requests)))

    failed = [r for run, _ in runs + llama_runs for r in run if not r.ok]
    offline_tokens = sum(len(o.token_ids) for o in offline)
    same = all(r.text == o.text for run, _ in runs for r, o in zip(run, offline) if r.ok)

    ms = 1000.0
    print(f"mistral_cuda bench_serve: {args.num_prompts} requests, concurrency {args.max_concurrency}, rate "
          f"{args.request_rate}, prompts {args.input_len[0]}..{args.input_len[1]} tokens, outputs "
          f"{args.output_len[0]}..{args.output_len[1]}, model {os.path.basename(args.model_dir.rstrip('/'))} on "
          f"{engine.device}, server --max-num-seqs {args.max_num_seqs} --num-blocks {args.num_blocks}, best of "
          f"{args.repeats}"
          + (f", llama-server {lcp.version()}" if llama_runs else ""))
    print()
    print("| measure | " + " | ".join(name for name, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))

    def row(label: str, cell) -> None:
        print(f"| {label} | " + " | ".join(cell(c) for _, c in columns) + " |")

    row("successful / failed requests", lambda c: f"{c['ok']} / {c['failed']}")
    row("duration (s)", lambda c: f"{c['elapsed']:.2f}")
    row("requests/s", lambda c: f"{c['ok'] / c['elapsed']:.2f}")
    row("input tokens/s", lambda c: f"{c['input_tokens'] / c['elapsed']:.1f}")
    row("output tokens/s", lambda c: f"{c['output_tokens'] / c['elapsed']:.1f}")
    for name in ("TTFT", "ITL", "E2E latency"):
        def cell(c, name=name):
            values = c[name]
            mean = statistics.fmean(values) if values else float("nan")
            return f"{mean * ms:.1f} / {percentile(values, 50) * ms:.1f} / {percentile(values, 99) * ms:.1f}"
        row(f"{name} mean / p50 / p99 (ms)", cell)
    our_rate = ours["output_tokens"] / ours["elapsed"]
    print()
    print(f"offline Engine (peer): {offline_tokens / offline_s:.1f} output tokens/s ({offline_s:.2f} s); "
          f"ratio server / offline {our_rate / (offline_tokens / offline_s):.2f}x")
    if llama_runs:
        theirs = columns[1][1]
        print(f"ratio mistral_cuda serve / llama-server (output tokens/s): "
              f"{our_rate / (theirs['output_tokens'] / theirs['elapsed']):.2f}x")
    print(f"seeded texts identical to offline: {same}")
    if failed:
        print(f"first failure: {failed[0].error}", file=sys.stderr)
        raise SystemExit(1)
    if not same:
        raise SystemExit("server texts differ from the offline engine's")

if __name__ == "__main__":
    main()
