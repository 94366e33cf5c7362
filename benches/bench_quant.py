"""CPU batch-1 decode with quantized weights: mistral_cuda bf16 / int8 / int4 beside llama.cpp
f16 / Q8_0 / Q4_0 converted from the same checkpoint, in one run: tokens/s and peak resident
memory of each (every configuration runs in a process of its own, so its peak RSS is its own).

    python benches/bench_quant.py                      # the ~1B random Mistral (benches/models.py)
    python benches/bench_quant.py --checkpoint DIR     # any bf16 Hugging Face checkpoint
    python benches/bench_quant.py --threads 2 --tokens 32 --json out.json

Ours: Engine.from_pretrained(DIR, quantization=None | "int8" | "int4"), and the int8 / int4 rows
again with quantize_activations=True ("+qa": int8 activations, integer dot products, as
llama.cpp computes its Q8_0 / Q4_0 rows), an 8-token prompt, two
warm-up tokens, then --tokens greedy decode steps of one token, timed. llama.cpp (when
`bash benches/setup_llama_cpp.sh` has built it; benches/llama_cpp_peer.py): llama-bench -p 0
-n --tokens on GGUFs from its converter and llama-quantize. Both use --threads threads.
Without benches/models.py the model is Engine.from_config's random model of the same shape
(and no llama.cpp row, which needs a checkpoint).

    python benches/bench_quant.py --gpu                # GPU: the quantized GEMV kernels alone

--gpu times the CUDA quantized linear (csrc/cuda/quant_linear.cu) at 1 and 16 tokens on
Mistral-7B's matrix shapes and prints GB/s of packed weights read over the measured
device-to-device copy bandwidth (the roofline of a kernel that reads each byte once). Calls
go through mistral_cuda.testing, which synchronizes around each op, so the times include a
few microseconds of synchronization: a lower bound on the kernels' GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (row name, quantization, quantize_activations): the fast mode is reported on rows of its own.
OURS = [("bf16", None, False), ("int8", "int8", False), ("int4", "int4", False), ("int8+qa", "int8", True),
        ("int4+qa", "int4", True)]
PEERS = ["f16", "q8_0", "q4_0"]
SHAPE_1B = dict(dim=2048, n_layers=20, n_heads=16, n_kv_heads=8, hidden_dim=5632, vocab_size=32000, sliding_window=4096)


def worker(args) -> None:
    """One of our configurations, in this process: prints one JSON line."""
    import torch

    import mistral_cuda as mc

    torch.set_num_threads(args.threads)
    quantization = None if args.quantization == "none" else args.quantization
    start = time.perf_counter()
    if args.checkpoint:
        engine = mc.Engine.from_pretrained(args.checkpoint, quantization=quantization,
                                           quantize_activations=args.quantize_activations, progress=False)
    else:
        config = mc.ModelConfig()
        for field, value in SHAPE_1B.items():
            setattr(config, field, value)
        config.head_dim = config.dim // config.n_heads
        config.max_seq_len = 4096
        engine = mc.Engine.from_config(config, dtype="bfloat16", quantization=quantization,
                                       quantize_activations=args.quantize_activations)
    load_s = time.perf_counter() - start
    m = engine.model
    seq = m.add_sequence()
    (logits,) = m.step([(seq, list(range(1, 9)))])
    for _ in range(2):
        (logits,) = m.step([(seq, [int(logits.argmax())])])
    start = time.perf_counter()
    for _ in range(args.tokens):
        (logits,) = m.step([(seq, [int(logits.argmax())])])
    elapsed = time.perf_counter() - start
    print(json.dumps({"tok_s": args.tokens / elapsed, "load_s": load_s, "quantization": engine.quantization,
                      "finite": bool(torch.isfinite(logits).all())}))


def run_ours(checkpoint, quantization, quantize_activations: bool, threads: int, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--quantization", quantization or "none", "--threads", str(threads),
           "--tokens", str(tokens)]
    if quantize_activations:
        cmd.append("--quantize-activations")
    if checkpoint:
        cmd += ["--checkpoint", str(checkpoint)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"worker {quantization} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    return result


def gpu_gemv() -> None:
    import torch

    from mistral_cuda import testing as ops

    def timed(fn, reps: int = 50) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / timed(lambda: dst.copy_(src), 20) / 1e9  # read + write
    print(f"device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    shapes = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
    for fmt in ("int8", "int4"):
        for name, (N, K) in shapes.items():
            qw = ops.quantize(torch.randn(N, K) * 0.02, fmt).to("cuda")
            nbytes = qw.data.numel() + qw.scales.numel() * 4 + (qw.zeros.numel() * 4 if qw.zeros is not None else 0)
            for T in (1, 16):
                x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
                seconds = timed(lambda: ops.quantized_linear(x, qw))
                gbs = nbytes / seconds / 1e9
                print(f"  {fmt} {name:5s} {N}x{K} T={T:2d}: {seconds * 1e6:7.1f} us  {gbs:6.0f} GB/s"
                      f"  ({gbs / copy_gbs:.0%} of copy)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="bf16 HF checkpoint (default: the ~1B random one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--gpu", action="store_true", help="time the CUDA quantized GEMV kernels instead")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quantization", default="none", help=argparse.SUPPRESS)
    p.add_argument("--quantize-activations", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.gpu:
        return gpu_gemv()

    checkpoint = args.checkpoint
    if checkpoint is None:
        try:
            import models

            checkpoint = models.random_mistral_checkpoint(models.SHAPE_1B, dtype="bfloat16")
        except ImportError:
            print("benches/models.py not found: our rows use Engine.from_config's random 1B model; no llama.cpp rows")
    print(f"model: {checkpoint or 'from_config 1B'}, threads {args.threads}, {args.tokens} decode tokens, batch 1")
    peer = None
    if checkpoint is not None:
        try:
            import llama_cpp_peer as peer

            ok, why = peer.available()
        except ImportError:
            ok, why = False, "benches/llama_cpp_peer.py not found"
        if not ok:
            print(f"  llama.cpp: skipped ({why})")
            peer = None
    # Each width's rows run back to back (ours, then llama.cpp's), so a change in machine load
    # over the run biases no engine.
    rows = []
    for (name, quantization, quantize_activations), weight_type in zip(OURS, PEERS + [None, None]):
        r = run_ours(checkpoint, quantization, quantize_activations, args.threads, args.tokens)
        rows.append({"engine": "mistral_cuda", "weights": name, **r})
        print(f"  mistral_cuda {name:7s} {r['tok_s']:7.2f} tok/s  peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB"
              f"  (load {r['load_s']:.1f} s)", flush=True)
        if peer is None or weight_type is None:
            continue
        r = peer.decode_benchmark(peer.gguf_for(checkpoint, weight_type), n_tokens=args.tokens, threads=args.threads)
        rows.append({"engine": "llama.cpp", "weights": weight_type, **r})
        print(f"  llama.cpp    {weight_type:7s} {r['tok_s']:7.2f} tok/s  peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB"
              f"  (± {r['tok_s_stddev']:.2f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
