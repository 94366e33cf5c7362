"""CPU batch-1 GEMV alone: mistral_cuda's linear (csrc/cpu/dense_ops.cpp) at one token on
Mistral-7B's matrix shapes, for f32, bf16 and f16 weights, in GB/s of weights read, beside the
machine's read and copy bandwidth measured in the same run (torch, same thread count).

    python benches/bench_linear.py [--threads 2] [--repeats 7] [--shapes 14336x4096,4096x14336]

Each shape gets enough copies of its weight to exceed the last-level cache (decode reads every
matrix from memory once per token), and the calls cycle through them. The time of a shape is
the 20th percentile of the single-call times over --repeats rounds of one call per copy (the
machine may be shared: the slow calls are the ones another process interrupted). Ratios printed: bf16 (f16) GB/s over
f32 GB/s, and each over the read bandwidth (torch.sum over a float32 buffer of 512 MiB).
"""

from __future__ import annotations

import argparse
import os
import time

# 7B: wq|wk|wv fused (4096 + 2 * 1024), wo, w1|w3 fused (2 * 14336), w2, one of w1 / w3.
DEFAULT_SHAPES = "6144x4096,4096x4096,28672x4096,4096x14336,14336x4096"
CACHE_BYTES = 256 << 20  # enough copies that no weight is still in cache when it comes around


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxK (N output rows, K inputs)")
    return p.parse_args()


def fast_seconds(calls, repeats: int) -> float:
    """The 20th percentile of the single-call times of `calls` (a list of functions, each called
    once per round): on a shared machine the slow calls are the ones another process interrupted."""
    for call in calls:  # warm-up
        call()
    times = []
    for _ in range(repeats):
        for call in calls:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 5]


def memory_bandwidth(torch, repeats: int) -> tuple:
    """(read GB/s, copy GB/s counting bytes read + written) over 512 MiB float32 buffers."""
    src = torch.rand(128 << 20)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    read = fast_seconds([lambda: src.sum()], repeats)
    copy = fast_seconds([lambda: dst.copy_(src)], repeats)
    return nbytes / read / 1e9, 2 * nbytes / copy / 1e9


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import mistral_cuda.testing as mt

    read_gbs, copy_gbs = memory_bandwidth(torch, args.repeats)
    print(f"threads {args.threads}; memory: read {read_gbs:.1f} GB/s, copy (read+write) {copy_gbs:.1f} GB/s")
    print(f"{'shape (N x K)':>14} {'dtype':>8} {'us':>8} {'GB/s':>7} {'/f32':>6} {'/read':>6}")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        x = torch.randn(1, K)
        f32_gbs = None
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            nbytes = N * K * torch.tensor([], dtype=dtype).element_size()
            copies = [torch.randn(N, K).to(dtype) for _ in range(max(1, -(-CACHE_BYTES // nbytes)))]

            seconds = fast_seconds([lambda w=w: mt.linear(x, w) for w in copies], args.repeats)
            gbs = nbytes / seconds / 1e9
            if dtype == torch.float32:
                f32_gbs = gbs
            name = str(dtype).replace("torch.", "")
            print(f"{shape:>14} {name:>8} {seconds * 1e6:8.0f} {gbs:7.1f} {gbs / f32_gbs:6.2f} {gbs / read_gbs:6.2f}")
            del copies


if __name__ == "__main__":
    main()
