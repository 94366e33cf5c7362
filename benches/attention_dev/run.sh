#!/usr/bin/env bash
# Builds the attention sandbox (attention_dev.cu + the library's attention sources) and runs it;
# arguments go to the program ("parity" = parity cases only). Run from anywhere, on a GPU machine.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${TMPDIR:-/tmp}/attention_dev"
nvcc -O2 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -lineinfo -Xcompiler -fopenmp -I "$root/csrc" \
  "$root/benches/attention_dev/attention_dev.cu" "$root/csrc/cuda/attention.cu" "$root/csrc/cuda/attention_decode.cu" \
  "$root/csrc/cuda/attention_prefill.cu" "$root/csrc/cuda/common.cu" "$root/csrc/cpu/attention.cpp" -o "$out"
"$out" "$@"
