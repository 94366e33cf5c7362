#!/usr/bin/env bash
# Installs mistral_cuda with its test dependencies and runs the test suite.
# torch is pinned first to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
python3 -m pytest -q tests "$@"
