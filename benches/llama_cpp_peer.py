"""llama.cpp as the peer of the CPU benchmarks: convert a Hugging Face checkpoint to GGUF with
llama.cpp's own converter, quantize it with llama-quantize, and time batch-1 decode with
llama-bench, returning plain numbers.

llama.cpp is built by `bash benches/setup_llama_cpp.sh` into benches/.llama_cpp (or
$LLAMA_CPP_HOME); every function here raises LlamaCppNotReady, saying so, when it is not.

    import llama_cpp_peer as lcp            # with benches/ on sys.path
    ok, why = lcp.available()
    gguf = lcp.gguf_for(checkpoint_dir, "q4_0")          # converted / quantized once, then cached
    r = lcp.decode_benchmark(gguf, n_tokens=32, threads=2)
    r["tok_s"], r["peak_rss_bytes"]

Weight types: "f32", "f16", "bf16" (written by the converter from the checkpoint) and "q8_0",
"q4_0" (llama-quantize from the f32 GGUF, so a bf16 or f32 checkpoint is quantized without an
intermediate rounding to f16). llama-quantize's default recipe is kept, as a user would get it:
for Q4_0 it stores output.weight (the lm_head) as Q6_K; `pure=True` makes every matrix the
named type.

Resident memory: the peak RSS of the llama-bench process (os.wait4 on the child) and the RSS
sampled from /proc while the timed tokens are generated, split into private and file-backed
pages. Weights are loaded with `-lm none` by default (read into llama.cpp's own buffers)
rather than llama.cpp's default mmap: on this CPU llama.cpp repacks Q4_0 matrices into an
interleaved copy at load, and under mmap the original file pages stay mapped too, so the RSS
of the 1B Q4_0 model reads 1130 MiB with mmap (535 private + 595 file) against 634 MiB with
`-lm none`, while the decode path is the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

CONVERTER_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
WEIGHT_TYPES = CONVERTER_TYPES + tuple(QUANT_TYPES)


class LlamaCppNotReady(RuntimeError):
    """llama.cpp's tools are not built here."""


class LlamaCppError(RuntimeError):
    """A llama.cpp tool failed; the message holds the end of its output."""


def llama_cpp_home() -> Path:
    return Path(os.environ.get("LLAMA_CPP_HOME", Path(__file__).resolve().parent / ".llama_cpp"))


def _paths() -> dict:
    home = llama_cpp_home()
    return {
        "converter": home / "src" / "convert_hf_to_gguf.py",
        "llama-bench": home / "build" / "bin" / "llama-bench",
        "llama-quantize": home / "build" / "bin" / "llama-quantize",
        "ready": home / "READY",
    }


def available() -> tuple[bool, str]:
    """(usable, reason): the setup script has finished and its tools are in place."""
    paths = _paths()
    missing = [name for name, p in paths.items() if not p.exists()]
    if missing:
        return False, (
            f"llama.cpp is not set up in {llama_cpp_home()} (missing: {', '.join(missing)}); "
            "run `bash benches/setup_llama_cpp.sh` (downloads the llama-cpp-python sdist from PyPI, "
            "builds llama-bench, llama-quantize and llama-server: ~20 min on 2 cores)"
        )
    return True, ""


def version() -> str:
    """The llama-cpp-python sdist version llama.cpp was taken from, and llama.cpp's build number."""
    _require()
    sdist = _paths()["ready"].read_text().strip()
    out = subprocess.run([str(_paths()["llama-bench"]), "--version"], capture_output=True, text=True)
    build = (out.stdout + out.stderr).strip().splitlines()
    return f"llama-cpp-python {sdist} sdist, {build[0] if build else 'unknown build'}"


def server_binary() -> Path:
    """llama.cpp's llama-server (its OpenAI-compatible HTTP server, the serving benchmark's peer),
    built by the setup script beside llama-bench."""
    _require()
    binary = llama_cpp_home() / "build" / "bin" / "llama-server"
    if not binary.is_file():
        raise LlamaCppNotReady(f"{binary} is missing: rerun `bash benches/setup_llama_cpp.sh` (it builds llama-server)")
    return binary


def _require() -> dict:
    ok, why = available()
    if not ok:
        raise LlamaCppNotReady(why)
    return _paths()


def _run(cmd: list, what: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise LlamaCppError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc


def convert_to_gguf(checkpoint_dir: Path, outtype: str, out_path: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a HF checkpoint directory (config.json,
    *.safetensors, tokenizer.model); outtype "f32", "f16" or "bf16". Written to a temporary
    name and renamed, so a failed conversion leaves no file at out_path."""
    paths = _require()
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"outtype must be one of {CONVERTER_TYPES}, got {outtype!r}")
    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no config.json: not a Hugging Face checkpoint")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    # The converter imports gguf from src/gguf-py (its own version), never a pip-installed one.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    cmd = [sys.executable, paths["converter"], checkpoint_dir, "--outfile", partial, "--outtype", outtype]
    try:
        _run(cmd, "convert_hf_to_gguf.py", env)
        partial.rename(out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


def quantize_gguf(src_gguf: Path, qtype: str, out_path: Path, threads: int = 2, pure: bool = False) -> Path:
    """llama-quantize src_gguf (an f32/f16/bf16 GGUF) to qtype "q8_0" or "q4_0"."""
    paths = _require()
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype must be one of {tuple(QUANT_TYPES)}, got {qtype!r}")
    src_gguf, out_path = Path(src_gguf), Path(out_path)
    if not src_gguf.is_file():
        raise FileNotFoundError(f"no GGUF at {src_gguf}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    cmd = [paths["llama-quantize"], *(["--pure"] if pure else []), src_gguf, partial, QUANT_TYPES[qtype], threads]
    try:
        _run(cmd, "llama-quantize")
        partial.rename(out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


def _source_stamp(checkpoint_dir: Path) -> dict:
    """What a cached GGUF was made from: the checkpoint files' sizes and mtimes."""
    files = sorted(p for p in checkpoint_dir.iterdir() if p.suffix in (".safetensors", ".json", ".model"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def gguf_for(checkpoint_dir: Path, weight_type: str, cache_dir: Optional[Path] = None, pure: bool = False) -> Path:
    """The GGUF of checkpoint_dir in weight_type ("f32", "f16", "bf16", "q8_0", "q4_0"), made on
    first use and reused while the checkpoint's files are unchanged. Kept in cache_dir (default:
    a sibling directory `<checkpoint>.gguf/`), never inside the checkpoint itself."""
    _require()
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    checkpoint_dir = Path(checkpoint_dir).resolve()
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no config.json: not a Hugging Face checkpoint")
    cache_dir = Path(cache_dir) if cache_dir is not None else checkpoint_dir.with_name(checkpoint_dir.name + ".gguf")
    suffix = "-pure" if pure and weight_type in QUANT_TYPES else ""
    out = cache_dir / f"model-{weight_type}{suffix}.gguf"
    stamp_file = out.with_name(out.name + ".source.json")
    stamp = _source_stamp(checkpoint_dir)
    if out.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    if weight_type in CONVERTER_TYPES:
        convert_to_gguf(checkpoint_dir, weight_type, out)
    else:
        quantize_gguf(gguf_for(checkpoint_dir, "f32", cache_dir), weight_type, out, pure=pure)
    stamp_file.write_text(json.dumps(stamp))
    return out


def _rss_now(pid: int) -> Optional[dict]:
    """VmRSS / RssAnon / RssFile of a live process in bytes (None once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile") and value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields if len(fields) == 3 else None


GENERATION_MARK = "generation run 1/"  # llama-bench --progress, on stderr, as timed decoding starts


def _run_measured(cmd: list, what: str, poll_s: float = 0.05) -> tuple[str, int, Optional[dict]]:
    """Run llama-bench cmd (with --progress) to completion. Returns (stdout, the child's peak
    RSS in bytes, the largest /proc RSS sample taken while its timed generation runs, or None
    if they were too short to sample). os.wait4 gives the rusage of exactly this child."""
    decode_rss = None
    with tempfile.TemporaryFile("w+") as out, tempfile.NamedTemporaryFile("w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, text=True)
        decoding = False
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                decoding = decoding or GENERATION_MARK in Path(err.name).read_text(errors="replace")
                sample = _rss_now(proc.pid) if decoding else None
                if sample and (decode_rss is None or sample["VmRSS"] > decode_rss["VmRSS"]):
                    decode_rss = sample
                time.sleep(poll_s)
        except BaseException:  # Ctrl-C or an error here: never leave llama-bench running
            proc.kill()
            os.waitpid(proc.pid, 0)
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-25:])
        raise LlamaCppError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return stdout, usage.ru_maxrss * 1024, decode_rss  # ru_maxrss is in KiB on Linux


LOAD_MODES = ("mmap", "none")


def decode_benchmark(
    gguf_path: Path, n_tokens: int = 32, threads: int = 2, repetitions: int = 3, depth: int = 0, load_mode: str = "none"
) -> dict:
    """Batch-1 decode speed of llama.cpp: `llama-bench -p 0 -n n_tokens -t threads -r
    repetitions -d depth -lm load_mode` (one warmup token, then each repetition generates
    n_tokens one at a time after `depth` tokens of context). load_mode "none" reads weights
    into llama.cpp's own buffers (RSS = what it needs); "mmap", llama.cpp's default, maps the
    file (RSS then also counts file pages kept mapped beside repacked copies; see above).
    Returns plain numbers:

      tok_s                 mean tokens/s over the repetitions (llama-bench's avg_ts)
      tok_s_stddev          its standard deviation
      samples_tok_s         tokens/s of each repetition
      ms_per_token          1000 / tok_s
      peak_rss_bytes        peak resident memory of the llama-bench process (load included)
      decode_rss_bytes      resident memory while the timed tokens are generated (largest
                            /proc sample; None if the runs were too short to sample), and its
      decode_rss_anon_bytes   private part (buffers, KV cache, repacked weights) and
      decode_rss_file_bytes   file-backed part (mmapped GGUF pages)
      file_bytes            size of the GGUF file
      model_type            llama.cpp's description, e.g. "llama ?B Q4_0"
      n_params, threads, n_tokens, depth, load_mode, build
    """
    paths = _require()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF at {gguf_path}")
    if n_tokens < 1 or threads < 1 or repetitions < 1 or depth < 0:
        raise ValueError("n_tokens, threads and repetitions must be >= 1 and depth >= 0")
    if load_mode not in LOAD_MODES:
        raise ValueError(f"load_mode must be one of {LOAD_MODES}, got {load_mode!r}")
    cmd = [paths["llama-bench"], "-m", gguf_path, "-p", 0, "-n", n_tokens, "-t", threads,
           "-r", repetitions, "-d", depth, "-lm", load_mode, "-o", "json", "--progress"]
    stdout, peak_rss, decode_rss = _run_measured(cmd, "llama-bench")
    try:
        (result,) = json.loads(stdout)
    except ValueError as e:
        raise LlamaCppError(f"llama-bench printed no single JSON result: {stdout[-2000:]!r}") from e
    decode_rss = decode_rss or {}
    return {
        "tok_s": float(result["avg_ts"]),
        "tok_s_stddev": float(result["stddev_ts"]),
        "samples_tok_s": [float(x) for x in result["samples_ts"]],
        "ms_per_token": 1e3 / float(result["avg_ts"]),
        "peak_rss_bytes": peak_rss,
        "decode_rss_bytes": decode_rss.get("VmRSS"),
        "decode_rss_anon_bytes": decode_rss.get("RssAnon"),
        "decode_rss_file_bytes": decode_rss.get("RssFile"),
        "file_bytes": gguf_path.stat().st_size,
        "model_type": result.get("model_type", ""),
        "n_params": int(result.get("model_n_params", 0)),
        "threads": int(result.get("n_threads", threads)),
        "n_tokens": n_tokens,
        "depth": depth,
        "load_mode": load_mode,
        "build": f"{result.get('build_commit', '?')} ({result.get('build_number', '?')})",
    }


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="llama.cpp decode tok/s and peak RSS for a HF checkpoint")
    p.add_argument("checkpoint", type=Path, help="HF checkpoint directory (config.json, *.safetensors, tokenizer.model)")
    p.add_argument("--types", nargs="+", choices=WEIGHT_TYPES, default=["f32", "f16", "q8_0", "q4_0"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--depth", type=int, default=0, help="tokens of context before the timed decode")
    p.add_argument("--load-mode", choices=LOAD_MODES, default="none", help="weight loading: none (default; read into its own buffers) or mmap (llama.cpp's default)")
    args = p.parse_args()
    ok, why = available()
    if not ok:
        sys.exit(f"error: {why}")
    print(version())
    print(f"threads {args.threads}, {args.tokens} tokens after {args.depth} of context, load mode {args.load_mode}")
    print(f"{'type':6} {'file MiB':>9} {'tok/s':>8} {'ms/tok':>8} {'peak RSS':>9} {'decode RSS':>11} {'(anon':>7} {'file)':>7}  MiB")

    def mib(n):
        return "-" if n is None else f"{n / 2**20:.0f}"

    for weight_type in args.types:
        t0 = time.perf_counter()
        gguf = gguf_for(args.checkpoint, weight_type)
        made = time.perf_counter() - t0
        r = decode_benchmark(gguf, args.tokens, args.threads, args.repetitions, args.depth, args.load_mode)
        print(
            f"{weight_type:6} {r['file_bytes'] / 2**20:9.1f} {r['tok_s']:8.2f} {r['ms_per_token']:8.1f} "
            f"{mib(r['peak_rss_bytes']):>9} {mib(r['decode_rss_bytes']):>11} {mib(r['decode_rss_anon_bytes']):>7} "
            f"{mib(r['decode_rss_file_bytes']):>7}  ({r['model_type']}, +-{r['tok_s_stddev']:.2f} tok/s; GGUF ready in {made:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
