#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan; build-fuzz/), writes the seed corpus from
# tiny real checkpoints, and fuzzes each target for FUZZ_SECONDS (default 15) in turn.
# A crash, sanitizer report, leak, timeout or memory blow-up fails the run; the input that
# caused it is saved as build-fuzz/findings/<target>-crash-* (or oom-, timeout-, leak-).
#   bash fuzz/run.sh                       # the CI smoke run, ~60 s of fuzzing
#   FUZZ_SECONDS=3600 bash fuzz/run.sh     # the longer run (see fuzz/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=build-fuzz
SECONDS_PER_TARGET="${FUZZ_SECONDS:-15}"

libfuzzer_works() {
  command -v clang++ >/dev/null &&
    echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' |
      clang++ -x c++ -fsanitize=fuzzer - -o "${TMPDIR:-/tmp}/mc_libfuzzer_check" 2>/dev/null
}
if ! libfuzzer_works; then
  echo "installing clang and its libFuzzer runtime" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends clang libclang-rt-dev >/dev/null 2>&1 ||
    apt-get install -y -qq --no-install-recommends clang "libclang-rt-$(clang++ --version | sed -n 's/.*version \([0-9]*\).*/\1/p')-dev" >/dev/null
  libfuzzer_works || { echo "clang with libFuzzer is not available" >&2; exit 1; }
fi

CXX=clang++ cmake -S fuzz -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j "${MC_BUILD_JOBS:-2}"
[ -d "$BUILD/corpus" ] || python3 fuzz/make_corpus.py "$BUILD/corpus"
mkdir -p "$BUILD/findings"

for target in fuzz_json fuzz_config fuzz_safetensors fuzz_checkpoint_dir; do
  mkdir -p "$BUILD/work/$target"
  # New inputs go to work/ (kept between runs), the seeds stay as written.
  "$BUILD/$target" "$BUILD/work/$target" "$BUILD/corpus/$target" \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -artifact_prefix="$BUILD/findings/$target-" -print_final_stats=1 2>"$BUILD/$target.log" || {
    tail -n 60 "$BUILD/$target.log" >&2
    echo "$target: FAILED, input saved under $BUILD/findings/" >&2
    exit 1
  }
  echo "$target: $(sed -n 's/^stat::number_of_executed_units: *//p' "$BUILD/$target.log") executions in ${SECONDS_PER_TARGET} s, no finding"
done
