#!/usr/bin/env python
"""End-to-end GPU benchmark: a Mistral-7B-shaped model with random bf16 weights.

    python benches/bench_e2e.py [--layers N] [--batches 1,64] [--steps S] [--repeats R]

mistral_cuda: mc.Engine.from_config(mc.ModelConfig.preset("mistral-7b-v0.1"), device="cuda",
dtype="bfloat16") (weights generated on the GPU, no checkpoint). Decode tokens/s at each batch
size: every sequence gets a --prompt-len prefill (untimed), then one token per sequence per
engine.model.step (greedy: each next token is the argmax of the returned logits); time to
first token (TTFT) for a --ttft-len prompt in one step.

Peers measured in the same run:
  * transformers on the same GPU: MistralForCausalLM from a MistralConfig of the same shape,
    random init, bf16, sdpa attention, torch.no_grad, the same greedy loop by hand with
    past_key_values (DynamicCache); TTFT = one forward over the prompt (logits_to_keep=1).
  * the bandwidth roofline: bytes a decode step must read (every weight matrix + the final
    norm + the LM head + one embedding row per sequence, 2 bytes each, + the K/V cache of each
    sequence at its average context during the timed steps) / measured device-to-device copy
    bandwidth. tokens/s / roofline tokens/s = the fraction reported.

Timing: CUDA events with a device-wide synchronize, warmup, median of repeats. The engine is
freed (del + torch.cuda.empty_cache()) before transformers is built. Ends with a
`SUMMARY {json}` line for benches/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--preset", default="mistral-7b-v0.1", help="mc.ModelConfig.preset name (dense models only)")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (e.g. 2 for a quick run)")
    p.add_argument("--batches", default="1,64", help="decode batch sizes, comma-separated (default 1,64)")
    p.add_argument("--prompt-len", type=int, default=128, help="prefill tokens per sequence before decode")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed sample")
    p.add_argument("--repeats", type=int, default=5, help="timed samples (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps / TTFT runs first")
    p.add_argument("--ttft-len", type=int, default=2048, help="prompt length for time to first token (0 = skip)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="don't run the transformers peer")
    args = p.parse_args(argv)
    try:
        args.batches = [int(x) for x in args.batches.split(",") if x]
    except ValueError:
        p.error("--batches takes comma-separated integers")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches needs positive integers")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    if min(args.prompt_len, args.steps, args.repeats) < 1 or args.warmup < 0 or args.ttft_len < 0:
        p.error("--prompt-len, --steps, --repeats must be >= 1; --warmup, --ttft-len >= 0")
    return args


# --------------------------------------------------------------------------------------
# Shapes and bytes
# --------------------------------------------------------------------------------------


def shape_of(cfg) -> dict:
    """The fields both engines need, from an mc.ModelConfig."""
    return dict(
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_dim=cfg.hidden_dim,
        vocab_size=cfg.vocab_size,
        norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        sliding_window=cfg.sliding_window,
        max_seq_len=cfg.max_seq_len,
    )


def param_counts(s: dict) -> dict:
    d, hd, f = s["dim"], s["head_dim"], s["hidden_dim"]
    q, kv = s["n_heads"] * hd, s["n_kv_heads"] * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d  # wq wk wv wo, w1 w2 w3, 2 norms
    return {"embedding": s["vocab_size"] * d, "layers": s["n_layers"] * per_layer, "final_norm": d, "lm_head": s["vocab_size"] * d}


def step_bytes(s: dict, batch: int, avg_context: float, elem: int = 2) -> float:
    """Bytes one decode step of `batch` sequences must read: all weights but the embedding
    table, one embedding row per sequence, and each sequence's cached K/V."""
    c = param_counts(s)
    weights = (c["layers"] + c["final_norm"] + c["lm_head"] + batch * s["dim"]) * elem
    ctx = min(avg_context, s["sliding_window"]) if s["sliding_window"] else avg_context
    kv = batch * s["n_layers"] * ctx * 2 * s["n_kv_heads"] * s["head_dim"] * elem
    return weights + kv


# --------------------------------------------------------------------------------------
# mistral_cuda
# --------------------------------------------------------------------------------------


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def engine_ttft(engine, args) -> float:
    m = engine.model
    prompt = random_prompts(1, args.ttft_len, engine.config.vocab_size, args.seed + 7)[0]

    def run(i):
        s = m.add_sequence()
        try:
            (logits,) = m.step([(s, prompt)])
            return int(logits.argmax())
        finally:
            m.free_sequence(s)

    return common.time_cuda(run, warmup=max(1, min(args.warmup, 2)), repeats=max(3, args.repeats // 2))


def run_engine(mc, cfg, args) -> dict:
    max_batch = max(args.batches)
    per_seq = args.prompt_len + args.warmup + 1 + args.repeats * args.steps + 1
    num_blocks = max_batch * math.ceil(per_seq / args.block_size) + math.ceil((args.ttft_len + 1) / args.block_size) + 64
    res = {"decode": {}, "ttft_ms": None, "errors": []}
    engine = mc.Engine.from_config(
        cfg, device="cuda", dtype="bfloat16", seed=args.seed, block_size=args.block_size, num_blocks=num_blocks,
        # One forward pass per timed step: the pass limits (workspaces) hold the largest step.
        max_num_seqs=max_batch, max_num_batched_tokens=max(2048, args.ttft_len + 1, max_batch),
    )
    try:
        free, total = torch.cuda.mem_get_info()
        print(f"mistral_cuda: engine built ({num_blocks} KV blocks); GPU memory free {free / 2**30:.1f} / {total / 2**30:.1f} GiB")
        if args.ttft_len:
            try:
                res["ttft_ms"] = engine_ttft(engine, args) * 1e3
                print(f"mistral_cuda: TTFT {args.ttft_len} tokens: {res['ttft_ms']:.1f} ms")
            except Exception as e:
                res["errors"].append(f"engine ttft: {type(e).__name__}: {e}")
                print(f"mistral_cuda: TTFT FAILED: {type(e).__name__}: {e}")
        for b in args.batches:
            try:
                r = common.engine_decode(engine, b, args.prompt_len, args.seed, args.warmup, args.steps, args.repeats)
                res["decode"][b] = r
                print(f"mistral_cuda: decode batch {b}: {r['tok_s']:.1f} tok/s ({r['step_ms']:.2f} ms/step), finite logits: {r['finite']}")
                if not r["finite"]:
                    res["errors"].append(f"engine decode batch {b}: non-finite logits")
            except Exception as e:
                res["errors"].append(f"engine decode batch {b}: {type(e).__name__}: {e}")
                print(f"mistral_cuda: decode batch {b} FAILED: {type(e).__name__}: {e}")
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------


def hf_model(s: dict, device: str = "cuda", dtype=torch.bfloat16):
    """MistralForCausalLM of the same shape, random init, built directly on `device` in `dtype`."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=s["dim"],
        intermediate_size=s["hidden_dim"],
        num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_kv_heads"],
        head_dim=s["head_dim"],
        vocab_size=s["vocab_size"],
        max_position_embeddings=s["max_seq_len"],
        sliding_window=s["sliding_window"],
        rms_norm_eps=s["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _hf_forward(model, ids, past=None):
    kw = {"input_ids": ids, "use_cache": True}
    if past is not None:
        kw["past_key_values"] = past
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:  # older transformers: no logits_to_keep
        return model(**kw)


@torch.no_grad()
def hf_decode(model, s: dict, batch: int, args, device: str = "cuda", timer=None) -> dict:
    timer = timer or common.time_cuda
    prompts = torch.tensor(random_prompts(batch, args.prompt_len, s["vocab_size"], args.seed + batch), device=device)
    out = _hf_forward(model, prompts)
    state = {"past": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}  # tok [batch, 1]

    def steps(n):
        for _ in range(n):
            o = _hf_forward(model, state["tok"], state["past"])
            state["past"] = o.past_key_values
            state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)

    if args.warmup:
        steps(args.warmup)
    t = timer(lambda i: steps(args.steps), warmup=0, repeats=args.repeats) / args.steps
    del state, out
    return {"batch": batch, "step_ms": t * 1e3, "tok_s": batch / t}


@torch.no_grad()
def hf_ttft(model, s: dict, args, device: str = "cuda", timer=None) -> float:
    timer = timer or common.time_cuda
    prompt = torch.tensor(random_prompts(1, args.ttft_len, s["vocab_size"], args.seed + 7), device=device)

    def run(i):
        o = _hf_forward(model, prompt)
        return o.logits[0, -1].argmax()

    return timer(run, warmup=max(1, min(args.warmup, 2)), repeats=max(3, args.repeats // 2))


def run_hf(s: dict, args) -> dict:
    res = {"decode": {}, "ttft_ms": None, "errors": []}
    model = hf_model(s)
    try:
        if args.ttft_len:
            try:
                res["ttft_ms"] = hf_ttft(model, s, args) * 1e3
                print(f"transformers: TTFT {args.ttft_len} tokens: {res['ttft_ms']:.1f} ms")
            except Exception as e:
                res["errors"].append(f"hf ttft: {type(e).__name__}: {e}")
                print(f"transformers: TTFT FAILED: {type(e).__name__}: {e}")
        for b in args.batches:
            try:
                r = hf_decode(model, s, b, args)
                res["decode"][b] = r
                print(f"transformers: decode batch {b}: {r['tok_s']:.1f} tok/s ({r['step_ms']:.2f} ms/step)")
            except Exception as e:
                res["errors"].append(f"hf decode batch {b}: {type(e).__name__}: {e}")
                print(f"transformers: decode batch {b} FAILED: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    common.require_cuda_or_exit()
    import mistral_cuda as mc
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)

    cfg = mc.ModelConfig.preset(args.preset)
    if cfg.n_experts:
        print(f"error: {args.preset} is a mixture of experts; this benchmark covers dense models")
        common.print_summary({"bench": "e2e", "error": "MoE preset"})
        return 1
    if args.layers is not None:
        cfg.n_layers = args.layers
    s = shape_of(cfg)
    counts = param_counts(s)
    print(f"device: {common.device_line()}")
    print(f"model: {args.preset}, {s}")
    print(f"parameters: {sum(counts.values()) / 1e9:.3f} B ({sum(counts.values()) * 2 / 1e9:.2f} GB bf16)")
    copy_bw = common.copy_bandwidth()
    print(f"device-to-device copy bandwidth (1 GiB, read + write): {copy_bw / 1e9:.1f} GB/s")
    print(f"decode: prompt {args.prompt_len} tokens/sequence, {args.warmup} warmup steps, median of {args.repeats} x {args.steps} steps\n")

    errors = []
    try:
        eng = run_engine(mc, cfg, args)
    except Exception as e:
        eng = {"decode": {}, "ttft_ms": None, "errors": [f"engine: {type(e).__name__}: {e}"]}
        print(f"mistral_cuda FAILED: {type(e).__name__}: {e}")
        gc.collect()
        torch.cuda.empty_cache()
    errors += eng["errors"]
    if args.skip_hf:
        hf = {"decode": {}, "ttft_ms": None, "errors": []}
    else:
        try:
            hf = run_hf(s, args)
        except Exception as e:
            hf = {"decode": {}, "ttft_ms": None, "errors": [f"transformers: {type(e).__name__}: {e}"]}
            print(f"transformers FAILED: {type(e).__name__}: {e}")
        errors += hf["errors"]

    rows = []
    print(f"\n{'batch':>5} {'mistral_cuda tok/s':>19} {'roofline tok/s':>15} {'of roofline':>12} {'transformers tok/s':>19} {'x transformers':>15}")
    for b in args.batches:
        e, h = eng["decode"].get(b), hf["decode"].get(b)
        ctx = e["avg_context"] if e else args.prompt_len + args.warmup + 1 + args.repeats * args.steps / 2
        nbytes = step_bytes(s, b, ctx)
        roof = b * copy_bw / nbytes
        row = {
            "batch": b,
            "tok_s": e["tok_s"] if e else None,
            "step_ms": e["step_ms"] if e else None,
            "roofline_tok_s": roof,
            "bytes_per_step": nbytes,
            "frac_roofline": common.fmt_ratio(e["tok_s"] if e else None, roof),
            "hf_tok_s": h["tok_s"] if h else None,
            "x_hf": common.fmt_ratio(e["tok_s"] if e else None, h["tok_s"] if h else None),
        }
        rows.append(row)
        print(
            f"{b:>5} {common.num(row['tok_s']):>19} {roof:>15.1f} {common.pct(row['frac_roofline']):>12} "
            f"{common.num(row['hf_tok_s']):>19} {common.num(row['x_hf'], '.2f'):>15}"
        )
    x_ttft = common.fmt_ratio(hf["ttft_ms"], eng["ttft_ms"])
    if args.ttft_len:
        print(
            f"TTFT {args.ttft_len} tokens: mistral_cuda {common.num(eng['ttft_ms'])} ms, transformers "
            f"{common.num(hf['ttft_ms'])} ms, x transformers {common.num(x_ttft, '.2f')}"
        )
    print(f"roofline: bytes per step (weights {step_bytes(s, 0, 0) / 1e9:.2f} GB + embedding rows + KV cache) / copy bandwidth;")
    print("x transformers = mistral_cuda tokens/s / transformers tokens/s (TTFT: transformers time / mistral_cuda time).")
    for err in errors:
        print(f"error: {err}")
    common.print_summary(
        {
            "bench": "e2e",
            "device": torch.cuda.get_device_name(0),
            "preset": args.preset,
            "n_layers": s["n_layers"],
            "copy_gbps": copy_bw / 1e9,
            "decode": rows,
            "ttft_len": args.ttft_len,
            "ttft_ms": eng["ttft_ms"],
            "hf_ttft_ms": hf["ttft_ms"],
            "x_hf_ttft": x_ttft,
            "failed": errors,
        }
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
