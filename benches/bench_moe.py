#!/usr/bin/env python
"""MoE benchmark on the GPU: Mixtral's sparse FFN layer, and Mixtral-shaped decode.

    python benches/bench_moe.py [--tokens 1,8,64,512] [--layers 8] [--batches 1,16] [--repeats R]

Shapes (Mixtral-8x7B): D = 4096, F = 14336, E = 8 experts, top-2, bf16. T = tokens,
K = experts per token, P = T x K (token, expert) pairs.

  * layer: mc.testing.moe_ffn(x [T, D], router [E, D], w13 [E, 2F, D], w2 [E, D, F], 2) -> y f32
    [T, D], the whole layer (router GEMM, routing, gate/up, SiLU, down, weighted sum) at each
    token count. Bytes = the expert weights the routing touches (distinct experts hit x 3 x D x
    F x 2 B; 2 experts at T = 1, ~7.2 at T = 8, all 8 from T = 64) + the router (E x D x 2 B),
    counted per input set from the routing itself; reported as GB/s and as a fraction of the
    device-to-device copy bandwidth measured in the same run, and as TFLOP/s
    (2 x P x 3 x D x F + 2 x T x E x D). Each timed sample runs all --sets input sets once (the
    weights, 2.8 GB, never fit the 50 MB L2; the sets make the routing vary between calls).
    Peer in the same run: plain torch on the same GPU and weights: f32 router logits, softmax,
    top-2, renormalize; then per expert hit (sizes read on the host, like transformers' loop):
    gather its tokens, three matmuls (w1, w3, w2), silu * up, scale, index_add into f32 y.
  * decode: mc.Engine.from_config(preset "mixtral-8x7b" with --layers layers (all 32 need
    93 GB), bf16, random weights on the GPU); each sequence prefills --prompt-len tokens
    (untimed), then one token per sequence per engine.model.step. tokens/s, and the fraction of
    the bandwidth roofline: bytes per step = per layer (attention weights + norms + router +
    the expected distinct experts of the batch x 3 x D x F) + final norm + LM head + one
    embedding row per sequence, 2 B each, + each sequence's K/V cache; expected distinct experts
    = E (1 - (1 - K/E)^batch) for uniform routing (2 at batch 1, 7.92 at batch 16); roofline
    tokens/s = batch x copy bandwidth / bytes. No transformers peer on this line.

Timing: CUDA events with a device-wide synchronize, warmup, median of repeats (common.py).
Ends with a `SUMMARY {json}` line for benches/gpu_check.sh.
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

D, FF, E, K = 4096, 14336, 8, 2  # Mixtral-8x7B: dim, expert FFN width, experts, experts per token
AGREE_TOL = 0.05  # mc.testing.moe_ffn vs the torch loop (both bf16; ~1e-2 expected): larger = wrong


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tokens", default="1,8,64,512", help="MoE layer token counts, comma-separated")
    p.add_argument("--sets", type=int, default=4, help="input sets rotated through per timed sample")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per layer case (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=8, help="n_layers of the Mixtral decode model (0 = skip decode)")
    p.add_argument("--batches", default="1,16", help="decode batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=64, help="prefill tokens per sequence before decode")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed sample")
    p.add_argument("--decode-repeats", type=int, default=5, help="timed decode samples (median reported)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the plain-torch peer of the layer")
    args = p.parse_args(argv)
    try:
        args.tokens = [int(x) for x in args.tokens.split(",") if x]
        args.batches = [int(x) for x in args.batches.split(",") if x]
    except ValueError:
        p.error("--tokens and --batches take comma-separated integers")
    if min(args.tokens + args.batches, default=0) < 1:
        p.error("--tokens and --batches need positive integers")
    if min(args.sets, args.repeats, args.prompt_len, args.steps, args.decode_repeats) < 1:
        p.error("--sets, --repeats, --prompt-len, --steps, --decode-repeats must be >= 1")
    if args.warmup < 0 or args.layers < 0:
        p.error("--warmup and --layers must be >= 0")
    return args


# --------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------


def routing_f32(x, router):
    """(expert ids [T, K], weights [T, K]) from f32 logits: the op's routing (ties aside)."""
    logits = torch.nn.functional.linear(x.float(), router.float())  # [T, E]
    top, ids = logits.topk(K, dim=-1)  # [T, K]
    return ids, torch.softmax(top, dim=-1)


def torch_layer(x, router, w13, w2):
    """The plain-torch MoE layer: per expert hit, gather, three matmuls, index_add."""
    T = x.shape[0]
    ids, weights = routing_f32(x, router)  # [T, K]
    flat = ids.reshape(-1)  # [P] expert of pair t * K + k
    order = flat.argsort()  # [P] pairs grouped by expert
    counts = torch.bincount(flat, minlength=E).tolist()  # host sync, as transformers' expert loop
    flat_w = weights.reshape(-1)  # [P]
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start : start + n]  # [n] pair ids of expert e
        start += n
        tok = sel // K  # [n]
        xs = x[tok]  # [n, D]
        gate = torch.nn.functional.linear(xs, w13[e, :FF])  # [n, F]  w1
        up = torch.nn.functional.linear(xs, w13[e, FF:])  # [n, F]  w3
        out = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])  # [n, D]  w2
        y.index_add_(0, tok, out.float() * flat_w[sel, None])
    return y


def layer_weights(seed: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    router = torch.randn(E, D, generator=g, device="cuda", dtype=dtype).mul_(D**-0.5)  # [E, D]
    w13 = torch.randn(E, 2 * FF, D, generator=g, device="cuda", dtype=dtype).mul_(D**-0.5)  # [E, 2F, D]
    w2 = torch.randn(E, D, FF, generator=g, device="cuda", dtype=dtype).mul_(FF**-0.5)  # [E, D, F]
    return router, w13, w2


def bench_layer(mc, T: int, weights, args, dtype, copy_bw: float) -> dict:
    router, w13, w2 = weights
    g = torch.Generator(device="cuda").manual_seed(args.seed + 1000 + T)
    xs = [torch.randn(T, D, generator=g, device="cuda", dtype=dtype) for _ in range(args.sets)]  # [T, D] each
    hit = [int(torch.unique(routing_f32(x, router)[0]).numel()) for x in xs]  # distinct experts per set
    expert_bytes = 3 * D * FF * w13.element_size()
    bytes_moved = sum(hit) / len(hit) * expert_bytes + E * D * router.element_size()
    flops = 2 * T * K * 3 * D * FF + 2 * T * E * D

    out = mc.testing.moe_ffn(xs[0], router, w13, w2, K)
    ref = torch_layer(xs[0], router, w13, w2)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    agree = float((out.float() - ref).norm() / ref.norm()) if finite else float("nan")

    n = args.sets
    t = common.time_cuda(lambda i: mc.testing.moe_ffn(xs[i % n], router, w13, w2, K), warmup=args.warmup,
                         repeats=args.repeats, inner=n)
    row = {
        "name": f"moe layer T{T}",
        "tokens": T,
        "experts_hit": sum(hit) / len(hit),
        "us": t * 1e6,
        "gbps": bytes_moved / t / 1e9,
        "frac_copy": bytes_moved / t / copy_bw,
        "tflops": flops / t / 1e12,
        "bytes": bytes_moved,
        "finite": finite,
        "rel_err_vs_torch": agree,
        "torch_us": None,
        "torch_gbps": None,
        "x_torch": None,
    }
    if not args.no_torch:
        with torch.no_grad():
            tt = common.time_cuda(lambda i: torch_layer(xs[i % n], router, w13, w2), warmup=args.warmup,
                                  repeats=args.repeats, inner=n)
        row.update(torch_us=tt * 1e6, torch_gbps=bytes_moved / tt / 1e9, x_torch=tt / t)
    return row  # the inputs (a few MB) go with this frame


def run_layer(mc, args, dtype, copy_bw: float, failed: list) -> list:
    rows = []
    try:
        weights = layer_weights(args.seed, dtype)
    except Exception as e:
        print(f"MoE layer weights: FAILED: {type(e).__name__}: {e}")
        failed.append(f"layer weights: {type(e).__name__}: {e}")
        return rows
    print(f"MoE layer: D {D}, F {FF}, {E} experts, top-{K}, {dtype}; expert weights {sum(w.numel() for w in weights[1:]) * 2 / 1e9:.2f} GB")
    hdr = (f"{'tokens':>6} {'experts':>7} {'time':>10} {'GB/s':>7} {'of copy':>8} {'TFLOP/s':>8} | "
           f"{'torch time':>10} {'torch GB/s':>10} {'x torch':>7} {'err vs torch':>12}")
    print(hdr)
    print("-" * len(hdr))
    for T in args.tokens:
        try:
            row = bench_layer(mc, T, weights, args, dtype, copy_bw)
        except Exception as e:
            print(f"{T:>6}: FAILED: {type(e).__name__}: {e}")
            failed.append(f"moe layer T{T}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
            continue
        if not row["finite"]:
            failed.append(f"{row['name']} (non-finite output)")
        elif not row["rel_err_vs_torch"] <= AGREE_TOL:
            failed.append(f"{row['name']} (differs from the torch loop by {row['rel_err_vs_torch']:.3g})")
        rows.append(row)
        print(
            f"{T:>6} {row['experts_hit']:>7.2f} {row['us']:8.1f}us {row['gbps']:7.0f} {common.pct(row['frac_copy']):>8} "
            f"{row['tflops']:8.1f} | {common.num(row['torch_us']) + 'us':>10} {common.num(row['torch_gbps'], '.0f'):>10} "
            f"{common.num(row['x_torch'], '.2f'):>7} {row['rel_err_vs_torch']:12.3g}"
        )
    del weights
    gc.collect()
    torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------
# Mixtral decode
# --------------------------------------------------------------------------------------


def expected_experts(batch: int, n_experts: int = E, top_k: int = K) -> float:
    """Expected distinct experts hit by `batch` tokens each routed to top_k of n_experts
    uniformly: n_experts x (1 - (1 - top_k / n_experts)^batch)."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** batch)


def decode_step_bytes(cfg, batch: int, avg_context: float, elem: int = 2) -> float:
    d, hd, f = cfg.dim, cfg.head_dim, cfg.hidden_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attention = d * q + 2 * d * kv + q * d  # wq wk wv wo
    experts = expected_experts(batch, cfg.n_experts, cfg.n_experts_per_tok) * 3 * d * f
    per_layer = attention + 2 * d + cfg.n_experts * d + experts  # + 2 norms + router
    weights = (cfg.n_layers * per_layer + d + cfg.vocab_size * d + batch * d) * elem  # + final norm, LM head, rows
    ctx = min(avg_context, cfg.sliding_window) if cfg.sliding_window else avg_context
    kv_cache = batch * cfg.n_layers * ctx * 2 * kv * elem
    return weights + kv_cache


def layer_bytes(cfg) -> int:
    """All weights of one Mixtral layer in bf16 (what the engine allocates per layer)."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return 2 * (d * q + 2 * d * kv + q * d + 2 * d + cfg.n_experts * (d + 3 * d * cfg.hidden_dim))


def run_decode(mc, args, copy_bw: float, failed: list):
    cfg = mc.ModelConfig.preset("mixtral-8x7b")
    free, _ = torch.cuda.mem_get_info()
    per_layer = layer_bytes(cfg)
    fixed = 2 * 2 * cfg.vocab_size * cfg.dim + (4 << 30)  # embedding + LM head, + 4 GiB for the cache and activations
    fit = max(0, int((free - fixed) // per_layer))
    n_layers = min(args.layers, fit)
    if n_layers < args.layers:
        print(f"decode: {args.layers} layers need {(args.layers * per_layer + fixed) / 2**30:.1f} GiB, "
              f"{free / 2**30:.1f} GiB free: using {n_layers}")
    if n_layers < 1:
        failed.append("decode: not enough GPU memory for one Mixtral layer")
        return None, []
    cfg.n_layers = n_layers
    per_seq = args.prompt_len + args.warmup + 2 + args.decode_repeats * args.steps
    num_blocks = max(args.batches) * math.ceil(per_seq / args.block_size) + 16
    rows = []
    try:
        engine = mc.Engine.from_config(cfg, device="cuda", dtype="bfloat16", seed=args.seed,
                                       block_size=args.block_size, num_blocks=num_blocks,
                                       max_num_seqs=max(args.batches), max_num_batched_tokens=max(2048, max(args.batches)))
    except Exception as e:
        print(f"decode: Engine.from_config FAILED: {type(e).__name__}: {e}")
        failed.append(f"decode engine: {type(e).__name__}: {e}")
        gc.collect()
        torch.cuda.empty_cache()
        return cfg, rows
    try:
        free, total = torch.cuda.mem_get_info()
        print(f"\nMixtral decode: mixtral-8x7b x {n_layers} layers ({n_layers * per_layer / 1e9:.1f} GB of layer weights), "
              f"{num_blocks} KV blocks; GPU memory free {free / 2**30:.1f} / {total / 2**30:.1f} GiB")
        print(f"{'batch':>5} {'tok/s':>9} {'ms/step':>8} {'experts/layer':>13} {'GB/step':>8} {'roofline tok/s':>15} {'of roofline':>12}")
        for b in args.batches:
            try:
                r = common.engine_decode(engine, b, args.prompt_len, args.seed, args.warmup, args.steps, args.decode_repeats)
            except Exception as e:
                print(f"{b:>5}: FAILED: {type(e).__name__}: {e}")
                failed.append(f"decode batch {b}: {type(e).__name__}: {e}")
                continue
            nbytes = decode_step_bytes(cfg, b, r["avg_context"])
            roof = b * copy_bw / nbytes
            row = {
                "batch": b,
                "tok_s": r["tok_s"],
                "step_ms": r["step_ms"],
                "experts_per_layer": expected_experts(b, cfg.n_experts, cfg.n_experts_per_tok),
                "bytes_per_step": nbytes,
                "roofline_tok_s": roof,
                "frac_roofline": common.fmt_ratio(r["tok_s"], roof),
                "finite": r["finite"],
            }
            if not r["finite"]:
                failed.append(f"decode batch {b}: non-finite logits")
            rows.append(row)
            print(f"{b:>5} {row['tok_s']:>9.1f} {row['step_ms']:>8.2f} {row['experts_per_layer']:>13.2f} "
                  f"{nbytes / 1e9:>8.2f} {roof:>15.1f} {common.pct(row['frac_roofline']):>12}")
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return cfg, rows


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    common.require_cuda_or_exit()
    import mistral_cuda as mc
    import mistral_cuda.testing  # noqa: F401  (mc.testing: the op harness)

    dtype = torch.bfloat16
    print(f"device: {common.device_line()}")
    copy_bw = common.copy_bandwidth()
    print(f"device-to-device copy bandwidth (1 GiB, read + write): {copy_bw / 1e9:.1f} GB/s")
    print(f"timing: CUDA events, {args.warmup} warmup, median of {args.repeats} samples x {args.sets} input sets\n")

    failed = []
    layer_rows = run_layer(mc, args, dtype, copy_bw, failed) if args.tokens else []
    cfg, decode_rows = (None, [])
    if args.layers and args.batches:
        try:
            cfg, decode_rows = run_decode(mc, args, copy_bw, failed)
        except Exception as e:
            print(f"decode: FAILED: {type(e).__name__}: {e}")
            failed.append(f"decode: {type(e).__name__}: {e}")

    print("\nlayer GB/s counts the expert weights the routing touches (experts hit x 3 x D x F x 2 B) + the router;")
    print("'of copy' = GB/s / copy bandwidth; x torch = torch loop time / mistral_cuda time (> 1: mistral_cuda faster).")
    print("decode roofline = batch x copy bandwidth / bytes per step (expected distinct experts per layer, see the docstring).")
    for f in failed:
        print(f"error: {f}")
    common.print_summary(
        {
            "bench": "moe",
            "device": torch.cuda.get_device_name(0),
            "copy_gbps": copy_bw / 1e9,
            "layer": layer_rows,
            "preset": "mixtral-8x7b",
            "n_layers": cfg.n_layers if cfg is not None else None,
            "decode": decode_rows,
            "failed": failed,
        }
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
