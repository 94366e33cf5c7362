"""Helpers shared by the GPU benchmarks (bench_attention.py, bench_e2e.py, bench_moe.py), and the
summary table of benches/gpu_check.sh (`python3 benches/common.py summary OUT_DIR`).

Timing follows one rule everywhere: CUDA events around the timed calls, a device-wide
synchronize before the end event (mistral_cuda's ops and engine may run on their own stream,
which an event on torch's stream would not wait for), warmup first, median of repeats.

Each benchmark ends with one machine-readable line, ``SUMMARY {json}``, that
benches/gpu_check.sh collects into its table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import xml.etree.ElementTree as ET
from typing import Callable, Optional, Tuple

try:
    import torch
except Exception:  # the summary below must still print when torch is broken
    torch = None


def cuda_status() -> Tuple[bool, str]:
    """(usable, reason): torch sees a GPU, and mistral_cuda was built with CUDA and sees one."""
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    try:
        import mistral_cuda as mc
    except Exception as e:  # a broken build is a failure, not "no device"
        return False, f"import mistral_cuda failed: {type(e).__name__}: {e}"
    if not mc.cuda_compiled():
        return False, "mistral_cuda was built without the CUDA backend (nvcc not found at build time?)"
    if mc.cuda_device_count() < 1:
        return False, "mistral_cuda sees no CUDA device"
    return True, ""


def require_cuda_or_exit() -> None:
    """No GPU at all: print "no CUDA device" and exit 0 (the benches are GPU-only). A GPU that
    mistral_cuda cannot use: exit 1, since that is a broken build on a GPU machine."""
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); nothing to benchmark")
        sys.exit(0)
    ok, why = cuda_status()
    if not ok:
        print(f"error: a CUDA device is present but mistral_cuda cannot use it: {why}")
        print("SUMMARY " + json.dumps({"error": why}))
        sys.exit(1)


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    return (
        f"{p.name}, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}, "
        f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); torch {torch.__version__}, CUDA {torch.version.cuda}"
    )


def time_cuda(fn: Callable[[int], object], *, warmup: int = 3, repeats: int = 10, inner: int = 1) -> float:
    """Median seconds per call of fn(i): `repeats` samples, each timing `inner` calls back to
    back (i counts every call, so fn can rotate through inputs to defeat the L2 cache)."""
    i = 0
    for _ in range(warmup):
        fn(i)
        i += 1
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn(i)
            i += 1
        torch.cuda.synchronize()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(samples)


def engine_decode(engine, batch: int, prompt_len: int, seed: int, warmup: int, steps: int, repeats: int) -> dict:
    """mistral_cuda decode speed: `batch` sequences after a random `prompt_len`-token prefill,
    one greedy token each per model.step; the time of a step is the median over `repeats` runs
    of `steps` steps. Returns tok/s, ms per step, the mean context length and whether the
    logits were finite."""
    m = engine.model
    g = torch.Generator().manual_seed(seed + batch)
    prompts = torch.randint(0, engine.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    seqs = [m.add_sequence() for _ in range(batch)]
    try:
        toks = []
        for first in range(0, batch, 8):  # prefill 8 sequences per step: bounded activations
            outs = m.step([(seqs[i], prompts[i]) for i in range(first, min(batch, first + 8))])
            toks += torch.stack(outs).argmax(-1).tolist()
        state = {"toks": toks}

        def run(n):
            for _ in range(n):
                outs = m.step([(s, [t]) for s, t in zip(seqs, state["toks"])])
                state["toks"] = torch.stack(outs).argmax(-1).tolist()

        run(warmup)
        outs = m.step([(s, [t]) for s, t in zip(seqs, state["toks"])])
        finite = bool(torch.isfinite(torch.stack(outs)).all())
        state["toks"] = torch.stack(outs).argmax(-1).tolist()
        t = time_cuda(lambda i: run(steps), warmup=0, repeats=repeats) / steps
    finally:
        for s in seqs:
            m.free_sequence(s)
    avg_ctx = prompt_len + warmup + 1 + repeats * steps / 2
    return {"batch": batch, "step_ms": t * 1e3, "tok_s": batch / t, "avg_context": avg_ctx, "finite": finite}


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s: (bytes read + bytes written) / time of
    dst.copy_(src) on a `nbytes` tensor, median of repeats. The peer every number is held to."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = time_cuda(lambda i: dst.copy_(src), warmup=3, repeats=repeats)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / t


def fmt_ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: Optional[float], spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def times(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def print_summary(summary: dict) -> None:
    """The last line of every benchmark's output; gpu_check.sh parses it."""
    print("SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)


# --------------------------------------------------------------------------------------
# gpu_check.sh summary: steps.tsv (name, exit code, seconds, log), pytest.xml, SUMMARY lines
# --------------------------------------------------------------------------------------


def _last_summary(log_path: str) -> Optional[dict]:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln for ln in f if ln.startswith("SUMMARY ")]
        return json.loads(lines[-1][len("SUMMARY "):]) if lines else None
    except (OSError, ValueError):
        return None


def _pytest_counts(xml_path: str) -> Optional[dict]:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    c["failed_names"] = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return c


def _pytest_rows(label: str, step: str, xml_path: str, rows: list, bad: list, notes: list) -> None:
    """The table row, failures and failed test names of one pytest step's junit xml."""
    c = _pytest_counts(xml_path)
    if c is None:
        rows.append((label, "no " + os.path.basename(xml_path) + ": pytest did not finish", ""))
        bad.append(f"{step}: no result file")
        return
    rows.append((
        label,
        f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped (of {c['tests']})",
        "",
    ))
    notes += [f"FAILED {name}" for name in c["failed_names"][:40]]
    if c["failures"] or c["errors"]:
        bad.append(f"{step}: {c['failures']} failed, {c['errors']} errors")
    if c["skipped"]:
        bad.append(f"{step}: {c['skipped']} skipped on a GPU machine")
    if c["tests"] == 0:
        bad.append(f"{step}: none ran")


def summarize(out_dir: str) -> int:
    """Prints (and writes to OUT_DIR/summary.md) one table of everything gpu_check.sh ran.
    Returns 1 if any step failed, a test failed, errored or was skipped, or a benchmark
    reported a failure."""
    steps = []
    try:
        with open(os.path.join(out_dir, "steps.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    steps.append({"name": parts[0], "rc": parts[1], "seconds": parts[2], "log": parts[3]})
    except OSError:
        pass
    bad, notes = [], []
    rows = []  # (what, result, against the peer)
    for s in steps:
        ok = s["rc"] == "0"
        rows.append((f"step: {s['name']}", f"{'ok' if ok else 'FAILED, exit ' + s['rc']} ({s['seconds']} s)", ""))
        if not ok:
            bad.append(f"step {s['name']} exited {s['rc']} (log: {os.path.basename(s['log'])})")
    by_name = {s["name"]: s for s in steps}

    if "tests" in by_name:
        c = _pytest_counts(os.path.join(out_dir, "pytest.xml"))
        if c is None:
            rows.append(("tests (-m cuda)", "no pytest.xml: pytest did not finish", ""))
            bad.append("tests: no result file")
        else:
            rows.append((
                "tests (-m cuda)",
                f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped (of {c['tests']})",
                "",
            ))
            notes += [f"FAILED {name}" for name in c["failed_names"][:40]]
            if c["failures"] or c["errors"]:
                bad.append(f"tests: {c['failures']} failed, {c['errors']} errors")
            if c["skipped"]:
                bad.append(f"tests: {c['skipped']} skipped on a GPU machine")
            if c["tests"] == 0:
                bad.append("tests: none ran")

    if "tests_moe" in by_name:
        _pytest_rows("tests MoE (-m cuda, test_cuda_moe.py)", "tests_moe", os.path.join(out_dir, "pytest_moe.xml"),
                     rows, bad, notes)

    if "bench_attention" in by_name:
        a = _last_summary(by_name["bench_attention"]["log"])
        if not a or "decode" not in a:
            rows.append(("attention", "no SUMMARY line" + (f": {a.get('error')}" if a else ""), ""))
            bad.append("bench_attention: no result")
        else:
            rows.append(("copy bandwidth (attention run)", f"{a['copy_gbps']:.0f} GB/s", ""))
            for r in a["decode"]:
                rows.append((
                    f"attention {r['name']} ({r.get('timed', '?')})",
                    f"{r['us']:.1f} us, {r['gbps']:.0f} GB/s",
                    f"{pct(r['frac_copy'])} of copy bw; {times(r.get('x_sdpa'))} SDPA",
                ))
            p = a.get("prefill")
            if p:
                rows.append((
                    f"attention {p['name']} ({p.get('timed', '?')})",
                    f"{p['ms']:.3f} ms, {p['tflops']:.1f} TFLOP/s",
                    f"{times(p.get('x_sdpa'))} SDPA",
                ))
            bad += [f"bench_attention: {f}" for f in a.get("failed", [])]

    if "bench_e2e" in by_name:
        e = _last_summary(by_name["bench_e2e"]["log"])
        if not e or "decode" not in e:
            rows.append(("end to end", "no SUMMARY line" + (f": {e.get('error')}" if e else ""), ""))
            bad.append("bench_e2e: no result")
        else:
            model = f"{e['preset']} x{e['n_layers']} layers"
            rows.append(("copy bandwidth (e2e run)", f"{e['copy_gbps']:.0f} GB/s", ""))
            for r in e["decode"]:
                rows.append((
                    f"decode batch {r['batch']} ({model})",
                    f"{num(r['tok_s'])} tok/s",
                    f"{pct(r['frac_roofline'])} of roofline ({r['roofline_tok_s']:.0f} tok/s); "
                    f"{times(r['x_hf'])} transformers ({num(r['hf_tok_s'])} tok/s)",
                ))
            if e.get("ttft_len"):
                rows.append((
                    f"TTFT {e['ttft_len']}-token prompt",
                    f"{num(e['ttft_ms'])} ms",
                    f"{times(e['x_hf_ttft'])} transformers ({num(e['hf_ttft_ms'])} ms)",
                ))
            bad += [f"bench_e2e: {f}" for f in e.get("failed", [])]

    if "bench_moe" in by_name:
        m = _last_summary(by_name["bench_moe"]["log"])
        if not m or "layer" not in m:
            rows.append(("MoE", "no SUMMARY line" + (f": {m.get('error')}" if m else ""), ""))
            bad.append("bench_moe: no result")
        else:
            rows.append(("copy bandwidth (MoE run)", f"{m['copy_gbps']:.0f} GB/s", ""))
            for r in m["layer"]:
                rows.append((
                    f"MoE layer {r['tokens']} tokens ({r['experts_hit']:.1f} experts hit)",
                    f"{r['us']:.1f} us, {r['gbps']:.0f} GB/s",
                    f"{pct(r['frac_copy'])} of copy bw; {times(r.get('x_torch'))} torch loop "
                    f"({num(r.get('torch_gbps'), '.0f')} GB/s)",
                ))
            model = f"{m.get('preset')} x{m.get('n_layers')} layers"
            for r in m.get("decode") or []:
                rows.append((
                    f"Mixtral decode batch {r['batch']} ({model})",
                    f"{num(r['tok_s'])} tok/s",
                    f"{pct(r['frac_roofline'])} of roofline ({r['roofline_tok_s']:.0f} tok/s, "
                    f"{r['experts_per_layer']:.2f} experts/layer)",
                ))
            bad += [f"bench_moe: {f}" for f in m.get("failed", [])]

    rows.append(("overall", "FAIL" if bad else "PASS", ""))
    out = ["# gpu_check summary", "", "| what | result | against the peer |", "|---|---|---|"]
    out += [f"| {w} | {r} | {p} |" for w, r, p in rows]
    if bad or notes:
        out.append("")
    out += [f"- {b}" for b in bad]
    out += [f"- {n}" for n in notes]
    text = "\n".join(out)
    print(text)
    try:
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(text + "\n")
    except OSError:
        pass
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        sys.exit(summarize(sys.argv[2]))
    sys.exit("usage: python3 benches/common.py summary OUT_DIR")
