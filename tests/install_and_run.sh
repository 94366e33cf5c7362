#!/usr/bin/env bash
# Installs mistral_cuda with its test dependencies (and libsentencepiece-dev for the C API's
# example service) and runs the test suite, then the sanitizer
# run (tests/sanitize.sh: the loading/stepping tests under ASan + UBSan) and the fuzz smoke run
# (fuzz/run.sh: ~60 s of libFuzzer over the loaders). Arguments go to the main pytest run.
# torch is pinned first to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

timed() {
  local start=$SECONDS
  "$@"
  echo "[install_and_run] '$*' took $((SECONDS - start)) s" >&2
}

python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# The C API's example service (tests/test_capi.py) tokenizes with the SentencePiece C++ library.
if ! pkg-config --exists sentencepiece 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq pkg-config libsentencepiece-dev
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
timed python3 -m pytest -q tests "$@"
timed bash tests/sanitize.sh
timed bash fuzz/run.sh
