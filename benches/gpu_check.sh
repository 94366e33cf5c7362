#!/usr/bin/env bash
# One command for a fresh GPU machine: device info, build, import smoke test, the CUDA tests
# (dense, then MoE), the GPU benchmarks (attention, end to end, MoE), and one summary table.
#
#   bash benches/gpu_check.sh                 # all stages: info build test bench
#   bash benches/gpu_check.sh test bench      # some stages (always run in the order above);
#                                             # test/bench build first if mistral_cuda._C is missing
#
# Nothing is downloaded: the package is built with this machine's python3 and the build tools
# already installed (pip --no-build-isolation --no-deps --no-index). CMAKE_CUDA_ARCHITECTURES
# defaults to 90a (Hopper); override with MC_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=80".
#
# Outputs: each step's log, pytest.xml, steps.tsv and summary.md go to $OUT when it is set (the
# device tool returns what is written there), else to a fresh /tmp/gpu_check.* directory.
# Every step runs under a time limit and a failing step does not stop the others; the exit
# status is non-zero if anything failed (a step, a test, a skipped CUDA test, a benchmark).
# The build and test steps print only their last lines (their full logs are in the outputs).
#
# Environment knobs: PYTHON (default python3), BENCH_ATTENTION_ARGS, BENCH_E2E_ARGS (e.g.
# "--layers 4"), BENCH_MOE_ARGS (e.g. "--layers 4 --tokens 1,64"), and per-step limits in
# seconds: BUILD_LIMIT (480), TEST_LIMIT (420), TEST_MOE_LIMIT (300), ATTENTION_LIMIT (180),
# E2E_LIMIT (300), MOE_LIMIT (200). ONLY="NAME ..." runs just those test/bench steps of the chosen
# stages (names: tests tests_moe bench_attention bench_e2e bench_moe bench_quant). On an H100 the whole run
# was estimated at 6-8 minutes before the MoE steps, which add about 3-4 (estimates, not yet
# measured); where one command may run at most 10 minutes, split it, e.g.
#   bash benches/gpu_check.sh build
#   ONLY=tests bash benches/gpu_check.sh test
#   ONLY="tests_moe bench_moe" bash benches/gpu_check.sh test bench
#   ONLY="bench_attention bench_e2e" bash benches/gpu_check.sh bench

set -u

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}

OUT_DIR=${OUT:-}
if [ -z "$OUT_DIR" ]; then
  OUT_DIR=$(mktemp -d /tmp/gpu_check.XXXXXX)
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export MC_BUILD_JOBS=${MC_BUILD_JOBS:-$(nproc 2>/dev/null || echo 8)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

STAGES=${*:-info build test bench}
for s in $STAGES; do
  case "$s" in
    info | build | test | bench) ;;
    *) echo "unknown stage '$s' (stages: info build test bench)"; exit 2 ;;
  esac
done
want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
STEP_NAMES="tests tests_moe bench_attention bench_e2e bench_moe bench_quant"
for s in ${ONLY:-}; do
  case " $STEP_NAMES " in
    *" $s "*) ;;
    *) echo "unknown step '$s' in ONLY (steps: $STEP_NAMES)"; exit 2 ;;
  esac
done
# pick NAME: the test/bench step NAME runs (ONLY unset, or NAME listed in it).
pick() { [ -z "${ONLY:-}" ] && return 0; case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

STEPS="$OUT_DIR/steps.tsv"
: >"$STEPS"

# run_step [--quiet] NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` with its output in
# $OUT_DIR/NAME.log (and on the terminal; --quiet: only the log's last 25 lines), and records
# (name, exit status, seconds, log) in steps.tsv.
run_step() {
  local quiet=0
  if [ "$1" = --quiet ]; then
    quiet=1
    shift
  fi
  local name=$1 limit=$2
  shift 2
  local log="$OUT_DIR/$name.log"
  echo
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S) UTC) ==="
  echo "\$ $*"
  local t0=$SECONDS rc
  if [ "$quiet" = 1 ]; then
    timeout -k 20 "$limit" "$@" >"$log" 2>&1
    rc=$?
    if [ "$rc" != 0 ]; then
      echo "--- first lines mentioning an error:"
      grep -n -i -E "error|FAILED" "$log" | head -n 30
    fi
    echo "--- last lines (full output in $log):"
    tail -n 25 "$log"
  else
    timeout -k 20 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  local took=$((SECONDS - t0))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "*** $name: stopped at its ${limit}s limit" | tee -a "$log"
  fi
  echo "=== $name: exit $rc after ${took}s ==="
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$log" >>"$STEPS"
  return 0
}

device_info() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S') UTC; host $(hostname); $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,driver_version --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
  cmake --version 2>/dev/null | head -n 1
  "$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device 0: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
except Exception as e:
    print("torch: import failed:", e)
for mod in ("transformers", "pybind11", "setuptools", "pytest", "safetensors"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "missing:", e)
EOF
  return 0
}

# pip's editable install builds mistral_cuda/_C in place. If pip itself fails (an old
# setuptools, say), build in place with setup.py so the tests can still run, and exit 3.
build() {
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . && return 0
  echo "*** pip install -e . failed; building in place with setup.py build_ext --inplace instead"
  "$PY" setup.py build_ext --inplace || return $?
  return 3
}

# The build is usable: mistral_cuda imports from anywhere, has its CUDA backend, sees a device,
# and a CUDA op runs (catches "no kernel image for this architecture").
smoke() {
  cd /tmp && "$PY" - <<'EOF'
import os

import torch
import mistral_cuda as mc
from mistral_cuda import testing as ops

print("mistral_cuda", mc.__version__, "from", mc.__file__, "with", mc._C.__file__)
here = os.path.dirname(os.path.abspath(mc.__file__))
assert os.path.dirname(os.path.abspath(mc._C.__file__)) == here, "mistral_cuda._C comes from another install"
print("cuda_compiled", mc.cuda_compiled(), "cuda_device_count", mc.cuda_device_count())
assert mc.cuda_compiled(), "built without the CUDA backend"
assert mc.cuda_device_count() > 0 and torch.cuda.is_available(), "no CUDA device visible"
table = torch.randn(100, 64, dtype=torch.bfloat16, device="cuda")
ids = torch.tensor([3, 99, 0], dtype=torch.int32, device="cuda")
out = ops.embedding(table, ids)
torch.cuda.synchronize()
assert torch.equal(out.cpu(), table.float().cpu()[[3, 99, 0]]), "CUDA embedding gave wrong rows"
print("CUDA op smoke test: ok")
EOF
}

built() { compgen -G "$ROOT/mistral_cuda/_C*.so" >/dev/null; }  # the in-place build of this checkout

# `timeout` runs programs, not shell functions: the steps below run as `bash -c NAME`.
export PY
export -f device_info build smoke

echo "gpu_check: stages [$STAGES], outputs in $OUT_DIR"

if want info; then
  run_step info 120 bash -c device_info
fi

if want build || { { want test || want bench; } && ! built; }; then
  run_step --quiet build "${BUILD_LIMIT:-480}" bash -c build
  run_step import 120 bash -c smoke
fi

if want test; then
  if pick tests; then
    run_step --quiet tests "${TEST_LIMIT:-420}" "$PY" -m pytest -m cuda -v -rfEs --durations=15 \
      -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml" tests/test_cuda_ops.py tests/test_cuda_model.py \
      tests/test_scheduler.py tests/test_quantization.py tests/test_async_engine.py
  fi
  if pick tests_moe; then
    run_step --quiet tests_moe "${TEST_MOE_LIMIT:-300}" "$PY" -m pytest -m cuda -v -rfEs --durations=15 \
      -p no:cacheprovider --junitxml="$OUT_DIR/pytest_moe.xml" tests/test_cuda_moe.py
  fi
fi

if want bench; then
  # shellcheck disable=SC2086  # the *_ARGS knobs are word-split on purpose
  pick bench_attention && run_step bench_attention "${ATTENTION_LIMIT:-180}" "$PY" benches/bench_attention.py ${BENCH_ATTENTION_ARGS:-}
  # shellcheck disable=SC2086
  pick bench_e2e && run_step bench_e2e "${E2E_LIMIT:-300}" "$PY" benches/bench_e2e.py ${BENCH_E2E_ARGS:-}
  # shellcheck disable=SC2086
  pick bench_moe && run_step bench_moe "${MOE_LIMIT:-200}" "$PY" benches/bench_moe.py ${BENCH_MOE_ARGS:-}
  # shellcheck disable=SC2086
  pick bench_quant && run_step bench_quant "${QUANT_LIMIT:-200}" "$PY" benches/bench_quant.py --gpu ${BENCH_QUANT_ARGS:-}
fi

echo
"$PY" benches/common.py summary "$OUT_DIR"
status=$?
if [ "$status" != 0 ] && [ "$status" != 1 ]; then
  echo "summary failed (exit $status); raw step results:"
  cat "$STEPS"
  status=1
fi
echo "outputs: $OUT_DIR"
exit "$status"
