#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-bench, llama-quantize, llama-server) and unpack its own
# HF->GGUF converter, for the llama.cpp columns of benches/bench_cpu.py and bench_serve.py (see
# benches/llama_cpp_peer.py).
#
#     bash benches/setup_llama_cpp.sh          # idempotent: a finished build is reused
#
# Source: the PyPI sdist of llama-cpp-python, which vendors a full llama.cpp tree
# (vendor/llama.cpp: ggml, tools/llama-bench, tools/quantize, tools/server, convert_hf_to_gguf.py,
# gguf-py).
# PyPI is the one registry with llama.cpp's source that this project may use (Debian 12 has no
# llama.cpp package). Nothing is committed: everything lives under $LLAMA_CPP_HOME, git-ignored.
#
# Layout of $LLAMA_CPP_HOME (default benches/.llama_cpp):
#   llama_cpp_python-<ver>.tar.gz   the downloaded sdist (kept, so a rebuild needs no network)
#   src/                            its vendor/llama.cpp, unpacked
#   build/bin/llama-bench, build/bin/llama-quantize, build/bin/llama-server
#   READY                           written last: "<sdist version>"; its presence means usable
#
# Release, CPU only, -march=native (GGML_NATIVE), static libraries, only the three tool targets
# (the server without its web UI).
# Parallelism: $LLAMA_CPP_JOBS (default 2, the size of the dev/CI machines).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
home="${LLAMA_CPP_HOME:-$here/.llama_cpp}"
jobs="${LLAMA_CPP_JOBS:-2}"
python="${PYTHON:-python3}"
sdist_name="llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}"

if [[ -f "$home/READY" && "$(cat "$home/READY")" == "$LLAMA_CPP_PYTHON_VERSION" \
      && -x "$home/build/bin/llama-bench" && -x "$home/build/bin/llama-quantize" \
      && -x "$home/build/bin/llama-server" ]]; then
    echo "llama.cpp (from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) is ready in $home"
    exit 0
fi
rm -f "$home/READY"
mkdir -p "$home"
start=$(date +%s)

for tool in cmake ninja c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install cmake ninja-build g++)" >&2; exit 1; }
done

# The converter's Python dependencies; numpy, torch, transformers and safetensors are the
# project's own. gguf itself is imported from src/gguf-py, matching the converter's version.
if ! "$python" -c "import sentencepiece, yaml, tqdm, requests" 2>/dev/null; then
    echo "== installing the converter's Python dependencies (sentencepiece pyyaml tqdm requests)"
    "$python" -m pip install --quiet sentencepiece pyyaml tqdm requests
fi

if [[ ! -f "$home/$sdist_name.tar.gz" ]]; then
    echo "== downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist from PyPI"
    tmp_dl="$(mktemp -d "$home/download.XXXXXX")"
    "$python" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp_dl"
    mv "$tmp_dl/$sdist_name.tar.gz" "$home/"
    rm -rf "$tmp_dl"
fi

if [[ ! -f "$home/src/convert_hf_to_gguf.py" ]]; then
    echo "== unpacking vendor/llama.cpp"
    rm -rf "$home/src" "$home/unpack"
    mkdir -p "$home/unpack"
    tar -xzf "$home/$sdist_name.tar.gz" -C "$home/unpack" "$sdist_name/vendor/llama.cpp"
    mv "$home/unpack/$sdist_name/vendor/llama.cpp" "$home/src"
    rm -rf "$home/unpack"
fi

echo "== configuring (Release, CPU, native)"
cmake -S "$home/src" -B "$home/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_CPU=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF \
    >"$home/configure.log" 2>&1 || { tail -30 "$home/configure.log" >&2; exit 1; }

echo "== building llama-bench, llama-quantize and llama-server with -j$jobs (log: $home/build.log)"
cmake --build "$home/build" --target llama-bench llama-quantize llama-server -j "$jobs" \
    >"$home/build.log" 2>&1 || { tail -30 "$home/build.log" >&2; exit 1; }

"$home/build/bin/llama-bench" --help >/dev/null
echo "$LLAMA_CPP_PYTHON_VERSION" >"$home/READY"
echo "llama.cpp ready in $home ($(( $(date +%s) - start )) s)"
