#!/usr/bin/env python
"""CPU batch-1 greedy decode: mistral_cuda (f32 and bf16 weights) beside transformers and
llama.cpp (f32 and f16 GGUF), on random Mistral-shaped models, in one run.

    python benches/bench_cpu.py [--quick] [--tokens N] [--prompt-len P] [--threads T] [--shapes 57m,1b]

Models (benches/models.py, cached under ~/.cache/mistral_cuda/bench): the ~57M model (hidden
512, 8 layers, 8/2 heads, intermediate 1536, vocab 32000) and a ~1.07B one (hidden 2048, 20
layers, 16/8 heads, intermediate 5632), each written as a real Hugging Face checkpoint in
float32 and in bfloat16 holding the same (bf16-rounded) values. For each model:

  * mistral_cuda, f32 and bf16 checkpoints (weights kept as stored; float32 compute): prompt in
    one step, then one token per step, argmax of the logits;
  * transformers: the same loop with past_key_values, on the f32 checkpoint;
  * llama.cpp (llama-bench, tg N, same thread count): f32 and f16 GGUF converted from the f32
    checkpoint with llama.cpp's own converter (`bash benches/setup_llama_cpp.sh` builds it;
    without it that column says so).

Every engine runs in its own process (resident memory is its own): decode tokens/s, weight
bandwidth, and resident memory after load and a first short step, beside checkpoint bytes +
the KV pool (goal: within 10%). Ratios: mistral_cuda bf16 / llama.cpp f16 (goal >= 1),
mistral_cuda / transformers. Greedy tokens of mistral_cuda and transformers are compared.
--quick: the 57M model only, 16 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the 57M model only, 16 tokens")
    p.add_argument("--tokens", type=int, default=None, help="new tokens to decode (default 32; 16 with --quick)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine")
    p.add_argument("--shapes", default=None, help="comma-separated: 57m, 1b (default both; 57m with --quick)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prompt_ids(n: int, vocab: int) -> list:
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def worker_mistral_cuda(ckpt: str, n: int, prompt_len: int) -> dict:
    import torch

    import mistral_cuda as mc

    base = rss_bytes()
    engine = mc.Engine.from_pretrained(ckpt, device="cpu", progress=False, num_blocks=64)
    m = engine.model
    prompt = prompt_ids(prompt_len, engine.config.vocab_size)
    s = m.add_sequence()
    (logits,) = m.step([(s, prompt)])
    resident = rss_bytes() - base  # after load and a first (short) step, workspaces included
    tok = int(torch.argmax(logits))
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        (logits,) = m.step([(s, [tok])])
        tok = int(torch.argmax(logits))
        out.append(tok)
    decode = time.perf_counter() - t0
    c = engine.config
    kv = m.num_blocks() * c.n_layers * 2 * m.block_size * c.n_kv_heads * c.head_dim * 4
    return {"tok_s": (n - 1) / decode, "rss": resident, "kv_bytes": kv, "tokens": out, "dtype": m.dtype}


def worker_transformers(ckpt: str, n: int, prompt_len: int) -> dict:
    import torch
    from transformers import MistralForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = rss_bytes()
    model = MistralForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompt = prompt_ids(prompt_len, model.config.vocab_size)
    with torch.inference_mode():
        res = model(torch.tensor([prompt]), use_cache=True)
        resident = rss_bytes() - base
        past, tok = res.past_key_values, int(torch.argmax(res.logits[0, -1]))
        out = [tok]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = res.past_key_values, int(torch.argmax(res.logits[0, -1]))
            out.append(tok)
        decode = time.perf_counter() - t0
    return {"tok_s": (n - 1) / decode, "rss": resident, "tokens": out}


def run_worker(kind: str, ckpt: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--ckpt", str(ckpt), "--tokens", str(args.tokens),
           "--prompt-len", str(args.prompt_len), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> int:
    args = parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        fn = worker_mistral_cuda if args.worker == "mistral_cuda" else worker_transformers
        print(json.dumps(fn(args.ckpt, args.tokens, args.prompt_len)))
        return 0
    args.tokens = args.tokens or (16 if args.quick else 32)
    shapes = (args.shapes or ("57m" if args.quick else "57m,1b")).split(",")

    import llama_cpp_peer as lcp
    import models

    have_llama, why = lcp.available()
    print(f"bench_cpu: batch-1 greedy decode, {args.tokens} tokens after a {args.prompt_len}-token prompt, "
          f"{args.threads} threads; llama.cpp: {lcp.version() if have_llama else why}")
    failed = False
    for shape_name in shapes:
        shape = models.SHAPES[shape_name]
        params = models.param_count(shape)
        f32 = models.random_mistral_checkpoint(shape, dtype="float32")
        bf16 = models.random_mistral_checkpoint(shape, dtype="bfloat16")
        # A decode step reads every weight once except the embedding table (one row).
        read_params = params - shape["vocab_size"] * shape["dim"]
        rows = []
        results = {}
        for label, kind, ckpt, wbytes in [
            ("mistral_cuda f32", "mistral_cuda", f32, 4),
            ("mistral_cuda bf16", "mistral_cuda", bf16, 2),
            ("transformers f32", "transformers", f32, 4),
        ]:
            r = run_worker(kind, ckpt, args)
            results[label] = r
            rows.append((label, r, wbytes, checkpoint_bytes(ckpt)))
        for weight_type, wbytes in (("f32", 4), ("f16", 2)):
            label = f"llama.cpp {weight_type}"
            if not have_llama:
                results[label] = {"error": why}
            else:
                try:
                    gguf = lcp.gguf_for(f32, weight_type)
                    b = lcp.decode_benchmark(gguf, n_tokens=args.tokens, threads=args.threads)
                    results[label] = {"tok_s": b["tok_s"], "rss": b.get("peak_rss_bytes")}
                except Exception as e:  # noqa: BLE001 - reported in the table
                    results[label] = {"error": str(e).splitlines()[0]}
            rows.append((label, results[label], wbytes, None))

        print(f"\nmodel {shape_name}: {params / 1e6:.0f}M parameters (dim {shape['dim']}, {shape['n_layers']} layers, "
              f"{shape['n_heads']}/{shape['n_kv_heads']} heads, ffn {shape['hidden_dim']}, vocab {shape['vocab_size']})")
        print(f"  {'engine':<20} {'decode tok/s':>12} {'GB/s':>7} {'resident MiB':>13} {'ckpt+KV MiB':>12}")
        for label, r, wbytes, ckpt_bytes in rows:
            if "error" in r:
                print(f"  {label:<20} {'-':>12} {'-':>7} {'-':>13} {'-':>12}   ({r['error']})")
                continue
            gbs = r["tok_s"] * read_params * wbytes / 1e9
            target = ""
            if ckpt_bytes is not None and "kv_bytes" in r:
                target = f"{(ckpt_bytes + r['kv_bytes']) / 2**20:12.0f}"
            rss = f"{r['rss'] / 2**20:13.0f}" if r.get("rss") else f"{'-':>13}"
            print(f"  {label:<20} {r['tok_s']:12.1f} {gbs:7.1f} {rss} {target:>12}")
        ours, theirs = results["mistral_cuda bf16"], results.get("llama.cpp f16", {})
        if "tok_s" in ours and "tok_s" in theirs:
            print(f"  ratio mistral_cuda bf16 / llama.cpp f16: {ours['tok_s'] / theirs['tok_s']:.2f}x (goal >= 1)")
        if "tok_s" in results["mistral_cuda f32"] and "tok_s" in results.get("llama.cpp f32", {}):
            print(f"  ratio mistral_cuda f32 / llama.cpp f32: "
                  f"{results['mistral_cuda f32']['tok_s'] / results['llama.cpp f32']['tok_s']:.2f}x")
        hf = results["transformers f32"]
        for label in ("mistral_cuda f32", "mistral_cuda bf16"):
            if "tok_s" in results[label] and "tok_s" in hf:
                print(f"  ratio {label} / transformers f32: {results[label]['tok_s'] / hf['tok_s']:.2f}x")
        if "rss" in ours:
            budget = checkpoint_bytes(bf16) + ours["kv_bytes"]
            print(f"  mistral_cuda bf16 resident / (checkpoint + KV pool): {ours['rss'] / budget:.3f} (goal <= 1.10)")
        if "tokens" in results["mistral_cuda f32"] and "tokens" in hf:
            same = results["mistral_cuda f32"]["tokens"] == hf["tokens"]
            same_bf16 = results["mistral_cuda bf16"].get("tokens") == results["mistral_cuda f32"]["tokens"]
            print(f"  greedy tokens: mistral_cuda f32 == transformers: {'yes' if same else 'NO'}; "
                  f"bf16 == f32 (same values): {'yes' if same_bf16 else 'NO'}")
            failed |= not (same and same_bf16)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
