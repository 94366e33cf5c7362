#!/usr/bin/env python
"""Paged-attention benchmark on the GPU: mc.testing.paged_attention with Mistral-7B shapes.

    python benches/bench_attention.py [--batches 1,64] [--contexts 512,4096,32768] [--repeats R]

Shapes: 32 query heads, 8 KV heads, head_dim 128, KV block size 16, full attention, bf16.

  * decode: one new token per entry, each entry with `context` keys (context-1 cached in the
    pools + its own new key). Bytes = K+V actually read (batch x context x 8 x 128 x 2 B x 2)
    + q and out; reported as GB/s and as a fraction of the device-to-device copy bandwidth
    measured in the same run. Small cases rotate through several copies of the pools (>= 512 MB
    in all) so the 50 MB L2 does not serve repeats.
  * prefill: one 2048-token chunk on an empty cache (causal), reported in ms and TFLOP/s.

Two timings per case: the kernel alone (the low-level binding mistral_cuda._C.ops with the
launch parameters built once, as the engine calls it; this is the headline number) and the
mc.testing.paged_attention call (argument checks that read cu_seqlens / start_pos / block tables on
the host, i.e. device syncs, + launch). If the low-level binding is not usable, only the op
call is timed and the table says so.

Peer in the same run: torch's scaled_dot_product_attention (what transformers' "sdpa"
attention calls) on contiguous [batch, heads, context, 128] K/V with enable_gqa=True, timed the
same way. Ends with a `SUMMARY {json}` line for benches/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

H, KVH, DH, BLOCK = 32, 8, 128, 16  # Mistral-7B: query heads, KV heads, head_dim; KV block size
L2_DEFEAT_BYTES = 512 << 20  # distinct K/V bytes each timing rotates through


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--batches", default="1,64", help="decode batch sizes, comma-separated (default 1,64)")
    p.add_argument("--contexts", default="512,4096,32768", help="keys per entry, comma-separated")
    p.add_argument("--prefill-len", type=int, default=2048, help="prefill chunk length (0 = skip)")
    p.add_argument("--repeats", type=int, default=20, help="timed samples per case (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA peer")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args(argv)
    try:
        args.batches = [int(x) for x in args.batches.split(",") if x]
        args.contexts = [int(x) for x in args.contexts.split(",") if x]
    except ValueError:
        p.error("--batches and --contexts take comma-separated integers")
    if not args.batches or not args.contexts or min(args.batches + args.contexts) < 1:
        p.error("--batches and --contexts need positive integers")
    if args.repeats < 1 or args.warmup < 0 or args.prefill_len < 0:
        p.error("--repeats must be >= 1, --warmup and --prefill-len >= 0")
    return args


def decode_inputs(batch: int, context: int, copies: int, dtype):
    """Pools holding `copies` independent sets of `batch` sequences of context-1 cached tokens,
    block tables per copy, and one new token per entry."""
    blocks_per_seq = math.ceil(context / BLOCK)
    n_blocks = copies * batch * blocks_per_seq
    dev = "cuda"
    k_pool = torch.randn(n_blocks, BLOCK, KVH, DH, dtype=dtype, device=dev)
    v_pool = torch.randn(n_blocks, BLOCK, KVH, DH, dtype=dtype, device=dev)
    # copy c, entry b owns blocks [(c * batch + b) * blocks_per_seq, ... + blocks_per_seq)
    base = torch.arange(copies * batch, dtype=torch.int32, device=dev).view(copies, batch, 1) * blocks_per_seq
    tables = (base + torch.arange(blocks_per_seq, dtype=torch.int32, device=dev)).contiguous()  # [copies, batch, MB]
    q = torch.randn(batch, H, DH, dtype=dtype, device=dev)
    k_new = torch.randn(batch, KVH, DH, dtype=dtype, device=dev)
    v_new = torch.randn(batch, KVH, DH, dtype=dtype, device=dev)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    start = torch.full((batch,), context - 1, dtype=torch.int64, device=dev)
    return k_pool, v_pool, [tables[c] for c in range(copies)], q, k_new, v_new, cu, start


def kernel_runner(mc, q, k_new, v_new, k_pool, v_pool, table, cu, start, window, max_query_len, max_context):
    """A no-argument function running the CUDA backend's attention op directly (what
    mc.testing.paged_attention does after its host-side checks), and the output it writes. The
    backend runs on its own stream, so each launch ends with its synchronize (timed with it)."""
    o = mc._C.ops
    out = torch.empty_like(q)
    backend = o.Backend("cuda")
    kv = o.PagedKv(table, cu, start, BLOCK, window, cu.cpu().tolist(), start.cpu().tolist())

    def launch():
        backend.attention(q, k_new, v_new, k_pool, v_pool, kv, out)
        backend.synchronize()

    launch.keep_alive = (backend, kv)
    return launch, out


def make_runners(mc, q, k_new, v_new, k_pool, v_pool, tables, cu, start, max_query_len, max_context):
    """(op_call(i), kernel(i) or None, finite, note): rotating over the block tables in
    `tables`. The kernel path is used only if its output matches mc.testing.paged_attention's."""

    def op_call(i):
        return mc.testing.paged_attention(q, k_new, v_new, k_pool, v_pool, tables[i % len(tables)], cu, start, BLOCK, 0)

    ref = op_call(0)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(ref.float()).all())
    try:
        launches, outs = [], []
        for table in tables:
            launch, out = kernel_runner(mc, q, k_new, v_new, k_pool, v_pool, table, cu, start, 0, max_query_len, max_context)
            launches.append(launch)
            outs.append(out)
        launches[0]()
        torch.cuda.synchronize()
        if not torch.allclose(outs[0].float(), ref.float(), rtol=1e-2, atol=1e-2):
            diff = (outs[0].float() - ref.float()).abs().max().item()
            return op_call, None, finite, f"direct kernel output differs from mc.testing (max diff {diff:.3g}); timing the op call"
        return op_call, (lambda i: launches[i % len(launches)]()), finite, ""
    except Exception as e:
        return op_call, None, finite, f"direct kernel launch unavailable ({type(e).__name__}: {e}); timing the op call"


def bench_decode(mc, batch: int, context: int, args, dtype, copy_bw: float) -> dict:
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = batch * context * KVH * DH * elem * 2
    bytes_moved = kv_bytes + 2 * batch * H * DH * elem  # + q and out
    copies = max(1, min(256, math.ceil(L2_DEFEAT_BYTES / kv_bytes)))
    k_pool, v_pool, tables, q, k_new, v_new, cu, start = decode_inputs(batch, context, copies, dtype)
    op_call, kernel, finite, note = make_runners(mc, q, k_new, v_new, k_pool, v_pool, tables, cu, start, 1, context)
    if note:
        print(f"  note (decode b{batch} ctx{context}): {note}")
    t_op = common.time_cuda(op_call, warmup=args.warmup, repeats=args.repeats)
    t = common.time_cuda(kernel, warmup=args.warmup, repeats=args.repeats) if kernel else t_op
    timed = "kernel" if kernel else "op call"
    del k_pool, v_pool, tables, op_call, kernel
    torch.cuda.empty_cache()
    row = {
        "name": f"decode b{batch} ctx{context}",
        "batch": batch,
        "context": context,
        "timed": timed,
        "us": t * 1e6,
        "op_call_us": t_op * 1e6,
        "gbps": bytes_moved / t / 1e9,
        "frac_copy": bytes_moved / t / copy_bw,
        "finite": finite,
        "sdpa_us": None,
        "sdpa_gbps": None,
        "x_sdpa": None,
    }
    if not args.no_sdpa:
        row.update(sdpa_decode(batch, context, args, dtype, bytes_moved))
    return row


def sdpa_decode(batch: int, context: int, args, dtype, bytes_moved: int) -> dict:
    """torch SDPA on contiguous K/V [batch, KVH, context, DH] (GQA via enable_gqa)."""
    F = torch.nn.functional
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = batch * context * KVH * DH * elem * 2
    copies = max(1, min(256, math.ceil(L2_DEFEAT_BYTES / kv_bytes)))
    try:
        q = torch.randn(batch, H, 1, DH, dtype=dtype, device="cuda")
        ks = [torch.randn(batch, KVH, context, DH, dtype=dtype, device="cuda") for _ in range(copies)]
        vs = [torch.randn(batch, KVH, context, DH, dtype=dtype, device="cuda") for _ in range(copies)]

        def run(i):
            return F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], enable_gqa=True)

        with torch.no_grad():
            t = common.time_cuda(run, warmup=args.warmup, repeats=args.repeats)
        del q, ks, vs
        torch.cuda.empty_cache()
        return {"sdpa_us": t * 1e6, "sdpa_gbps": bytes_moved / t / 1e9}
    except Exception as e:  # an unsupported SDPA configuration leaves the peer empty
        print(f"  sdpa peer failed for b{batch} ctx{context}: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
        return {}


def bench_prefill(mc, n: int, args, dtype) -> dict:
    """One n-token chunk at start 0: the kernel reads only k_new/v_new (no cached prefix)."""
    dev = "cuda"
    blocks = math.ceil(n / BLOCK)
    k_pool = torch.randn(blocks, BLOCK, KVH, DH, dtype=dtype, device=dev)
    v_pool = torch.randn(blocks, BLOCK, KVH, DH, dtype=dtype, device=dev)
    table = torch.arange(blocks, dtype=torch.int32, device=dev).view(1, blocks)
    q = torch.randn(n, H, DH, dtype=dtype, device=dev)
    k_new = torch.randn(n, KVH, DH, dtype=dtype, device=dev)
    v_new = torch.randn(n, KVH, DH, dtype=dtype, device=dev)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    start = torch.zeros(1, dtype=torch.int64, device=dev)

    op_call, kernel, finite, note = make_runners(mc, q, k_new, v_new, k_pool, v_pool, [table], cu, start, n, n)
    if note:
        print(f"  note (prefill 1x{n}): {note}")
    t_op = common.time_cuda(op_call, warmup=args.warmup, repeats=args.repeats)
    t = common.time_cuda(kernel, warmup=args.warmup, repeats=args.repeats) if kernel else t_op
    flops = 4 * H * DH * (n * (n + 1) // 2)  # QK^T and PV over the causal triangle
    row = {"name": f"prefill 1x{n}", "tokens": n, "timed": "kernel" if kernel else "op call", "ms": t * 1e3,
           "op_call_ms": t_op * 1e3, "tflops": flops / t / 1e12, "finite": finite,
           "sdpa_ms": None, "sdpa_tflops": None, "x_sdpa": None}
    if not args.no_sdpa:
        try:
            F = torch.nn.functional
            qs, ks, vs = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k_new, v_new))  # [1, heads, n, DH]

            def run_sdpa(i):
                return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

            with torch.no_grad():
                ts = common.time_cuda(run_sdpa, warmup=args.warmup, repeats=args.repeats)
            row.update(sdpa_ms=ts * 1e3, sdpa_tflops=flops / ts / 1e12, x_sdpa=ts / t)
        except Exception as e:
            print(f"  sdpa peer failed for prefill: {type(e).__name__}: {e}")
    del k_pool, v_pool, q, k_new, v_new, op_call, kernel
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    common.require_cuda_or_exit()
    import mistral_cuda as mc
    import mistral_cuda.testing  # noqa: F401  (mc.testing: the op harness)

    dtype = getattr(torch, args.dtype)
    print(f"device: {common.device_line()}")
    copy_bw = common.copy_bandwidth()
    print(f"device-to-device copy bandwidth (1 GiB, read + write): {copy_bw / 1e9:.1f} GB/s")
    print(f"shapes: {H} q heads, {KVH} kv heads, head_dim {DH}, block {BLOCK}, full attention, {args.dtype}")
    print(f"timing: CUDA events, {args.warmup} warmup, median of {args.repeats}\n")

    failed = []
    decode_rows = []
    hdr = f"{'case':<22} {'time':>10} {'GB/s':>8} {'of copy':>8} | {'SDPA time':>10} {'SDPA GB/s':>9} {'x SDPA':>7}"
    print(hdr)
    print("-" * len(hdr))
    for batch in args.batches:
        for context in args.contexts:
            try:
                row = bench_decode(mc, batch, context, args, dtype, copy_bw)
            except Exception as e:
                print(f"decode b{batch} ctx{context}: FAILED: {type(e).__name__}: {e}")
                failed.append(f"decode b{batch} ctx{context}")
                torch.cuda.empty_cache()
                continue
            if row["sdpa_us"] is not None:
                row["x_sdpa"] = row["sdpa_us"] / row["us"]
            if not row["finite"]:
                failed.append(f"{row['name']} (non-finite output)")
            decode_rows.append(row)
            print(
                f"{row['name']:<22} {row['us']:8.1f}us {row['gbps']:8.1f} {common.pct(row['frac_copy']):>8} | "
                f"{common.num(row['sdpa_us'])+'us':>10} {common.num(row['sdpa_gbps']):>9} {common.num(row['x_sdpa'], '.2f'):>7}"
            )

    prefill = None
    if args.prefill_len:
        try:
            prefill = bench_prefill(mc, args.prefill_len, args, dtype)
            if not prefill["finite"]:
                failed.append(f"{prefill['name']} (non-finite output)")
            print(
                f"{prefill['name']:<22} {prefill['ms']:8.3f}ms {prefill['tflops']:6.1f} TFLOP/s | "
                f"SDPA {common.num(prefill['sdpa_ms'], '.3f')} ms {common.num(prefill['sdpa_tflops'])} TFLOP/s, "
                f"x SDPA {common.num(prefill['x_sdpa'], '.2f')}"
            )
        except Exception as e:
            print(f"prefill 1x{args.prefill_len}: FAILED: {type(e).__name__}: {e}")
            failed.append(f"prefill 1x{args.prefill_len}")

    print("\nGB/s counts K+V bytes read (batch x context x 8 x 128 x 2 B x 2) + q + out; 'of copy' = GB/s / copy bandwidth;")
    print("x SDPA = SDPA time / mistral_cuda time (> 1: mistral_cuda faster).")
    common.print_summary(
        {
            "bench": "attention",
            "device": torch.cuda.get_device_name(0),
            "copy_gbps": copy_bw / 1e9,
            "decode": decode_rows,
            "prefill": prefill,
            "failed": failed,
        }
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
