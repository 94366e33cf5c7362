#!/usr/bin/env python
"""CPU greedy-decode benchmark: mistral_cuda vs transformers on a ~57M-parameter random Mistral.

    python benches/bench_cpu.py [--tokens N] [--prompt-len P] [--threads T] [--repeats R]

Builds a random float32 Mistral (hidden 512, 8 layers, 8 heads / 2 KV heads, intermediate
1536, vocab 32000, sliding window 4096) with transformers, saves it (cached under
~/.cache/mistral_cuda/bench), and decodes N greedy tokens after a P-token prompt with

  * mistral_cuda: one m.step for the prompt, then one token per step, argmax of the logits;
  * transformers: the same loop by hand with past_key_values (use_cache=True), and for
    reference model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N).

Both run in the same process with the same thread count, after a warmup. Reported: prefill
time, decode tokens/s (N-1 single-token steps after the prompt step), end-to-end tokens/s,
the mistral_cuda/transformers ratio, model size, achieved weight bandwidth (weight bytes
read per decoded token / time per token), and whether the greedy tokens match.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tokens", type=int, default=64, help="new tokens to decode (default 64)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16, help="mistral_cuda KV block size")
    p.add_argument(
        "--cache-dir",
        default=os.path.expanduser("~/.cache/mistral_cuda/bench"),
        help="where the random checkpoint is kept between runs",
    )
    p.add_argument("--no-cache", action="store_true", help="write the checkpoint to a temp dir instead")
    p.add_argument("--skip-generate", action="store_true", help="don't time transformers' generate()")
    return p.parse_args()


ARGS = parse_args()
# Thread counts must be fixed before torch / the engine start their thread pools.
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import mistral_cuda as mc  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

CONFIG = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=32000,
    sliding_window=4096,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    initializer_range=0.05,
    tie_word_embeddings=False,
)


def count_params(cfg: dict) -> dict:
    """Parameter counts by role, computed from the config (checked against the model)."""
    d, L, hd = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"]
    q, kv, ff, V = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"], cfg["vocab_size"]
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff + 2 * d
    return {"embedding": V * d, "layers": L * per_layer, "final_norm": d, "lm_head": V * d}


def build_checkpoint(path: Path, seed: int) -> MistralForCausalLM:
    """The float32 transformers model whose weights are saved at ``path`` (reused if present)."""
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        print(f"checkpoint: reusing {path}")
        model = MistralForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
        return model.eval()
    print(f"checkpoint: writing {path}")
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**CONFIG, attn_implementation="sdpa")).to(torch.float32).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def decode_mistral_cuda(engine, prompt: list[int], n: int):
    """Greedy: prompt in one step, then n-1 single-token steps. Returns (tokens, t_prefill, t_decode)."""
    m = engine.model
    s = m.add_sequence()
    try:
        t0 = time.perf_counter()
        (logits,) = m.step([(s, prompt)])
        tok = int(torch.argmax(logits))
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n - 1):
            (logits,) = m.step([(s, [tok])])
            tok = int(torch.argmax(logits))
            out.append(tok)
        t2 = time.perf_counter()
    finally:
        m.free_sequence(s)
    return out, t1 - t0, t2 - t1


@torch.inference_mode()
def decode_transformers(model, prompt: list[int], n: int):
    """The same greedy loop with transformers and its KV cache."""
    t0 = time.perf_counter()
    res = model(torch.tensor([prompt]), use_cache=True)
    past = res.past_key_values
    tok = int(torch.argmax(res.logits[0, -1]))
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(n - 1):
        res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = res.past_key_values
        tok = int(torch.argmax(res.logits[0, -1]))
        out.append(tok)
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


@torch.inference_mode()
def generate_transformers(model, prompt: list[int], n: int):
    t0 = time.perf_counter()
    ids = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        use_cache=True,
        pad_token_id=0,
    )
    t1 = time.perf_counter()
    return ids[0, len(prompt) :].tolist(), t1 - t0


def timed(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return runs


def main():
    args = ARGS
    n, P = args.tokens, args.prompt_len
    if n < 2:
        sys.exit("--tokens must be >= 2")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    counts = count_params(CONFIG)
    total = sum(counts.values())
    print(
        "model: hidden {hidden_size}, layers {num_hidden_layers}, heads {num_attention_heads}/{num_key_value_heads} kv, "
        "head_dim {head_dim}, intermediate {intermediate_size}, vocab {vocab_size}, sliding window {sliding_window}".format(**CONFIG)
    )
    print(
        f"parameters: {total / 1e6:.2f}M (embedding {counts['embedding'] / 1e6:.2f}M, layers {counts['layers'] / 1e6:.2f}M, "
        f"lm_head {counts['lm_head'] / 1e6:.2f}M)"
    )

    tmp = None
    if args.no_cache:
        tmp = tempfile.TemporaryDirectory(prefix="mc-bench-")
        ckpt = Path(tmp.name)
    else:
        ckpt = Path(args.cache_dir) / f"mistral-d512-l8-v32000-seed{args.seed}"
    model = build_checkpoint(ckpt, args.seed)
    actual = sum(p.numel() for p in model.parameters())
    assert actual == total, f"parameter count {actual} != computed {total}"

    bytes_per_param = 4  # float32
    size_bytes = total * bytes_per_param
    # A decode step reads every weight once, except the embedding table (one row).
    read_per_token = (total - counts["embedding"] + CONFIG["hidden_size"]) * bytes_per_param
    print(f"model size: {size_bytes / 2**20:.1f} MiB float32; weight bytes read per decoded token: {read_per_token / 2**20:.1f} MiB")

    engine = mc.Engine.from_pretrained(str(ckpt), device="cpu", block_size=args.block_size)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, CONFIG["vocab_size"], (P,), generator=g).tolist()
    print(f"prompt: {P} tokens, decoding {n} new tokens greedily, {args.repeats} timed runs each (median reported)\n")

    # warmup
    decode_mistral_cuda(engine, prompt, min(n, 8))
    decode_transformers(model, prompt, min(n, 8))

    mc_runs = timed(lambda: decode_mistral_cuda(engine, prompt, n), args.repeats)
    hf_runs = timed(lambda: decode_transformers(model, prompt, n), args.repeats)
    gen_runs = [] if args.skip_generate else timed(lambda: generate_transformers(model, prompt, n), args.repeats)

    def summarize(name, runs):
        prefill = statistics.median(r[1] for r in runs)
        decode = statistics.median(r[2] for r in runs)
        e2e = statistics.median(r[1] + r[2] for r in runs)
        per_tok = decode / (n - 1)
        print(
            f"{name:<26} prefill {prefill * 1e3:8.1f} ms | decode {(n - 1) / decode:8.1f} tok/s "
            f"({per_tok * 1e3:6.2f} ms/tok, {read_per_token / per_tok / 1e9:6.2f} GB/s) | end-to-end {n / e2e:8.1f} tok/s"
        )
        return (n - 1) / decode, n / e2e

    mc_dec, mc_e2e = summarize("mistral_cuda", mc_runs)
    hf_dec, hf_e2e = summarize("transformers (manual loop)", hf_runs)
    if gen_runs:
        gen_t = statistics.median(r[1] for r in gen_runs)
        print(f"{'transformers generate()':<26} end-to-end {n / gen_t:8.1f} tok/s")

    print(f"\nratio mistral_cuda / transformers: decode {mc_dec / hf_dec:.2f}x, end-to-end {mc_e2e / hf_e2e:.2f}x")

    mc_tokens, hf_tokens = mc_runs[0][0], hf_runs[0][0]
    consistent = all(r[0] == mc_tokens for r in mc_runs) and all(r[0] == hf_tokens for r in hf_runs)
    if mc_tokens == hf_tokens:
        print(f"greedy tokens match: yes ({n} tokens)")
    else:
        first = next(i for i, (a, b) in enumerate(zip(mc_tokens, hf_tokens)) if a != b)
        print(f"greedy tokens match: NO (first difference at new token {first}: mistral_cuda {mc_tokens[first]} vs transformers {hf_tokens[first]})")
    if gen_runs:
        print(f"transformers generate() tokens == manual loop: {'yes' if gen_runs[0][0] == hf_tokens else 'NO'}")
    if not consistent:
        print("warning: repeated runs produced different tokens")
    if tmp is not None:
        tmp.cleanup()
    return 0 if mc_tokens == hf_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
