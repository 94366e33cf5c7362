#!/usr/bin/env bash
# Builds mistral_cuda._C for a GPU machine ahead of time, on a CPU-only machine, so that device
# minutes go to tests and benchmarks, not compiling: Python 3.12 (the device machine's python3),
# the CUDA backend for sm_90a (override with MC_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=..."),
# generic x86-64 CPU code (the device's CPU may lack this machine's instruction set).
# The module lands in mistral_cuda/ (git-ignored); carry it with the working tree, e.g.
#   bash benches/prebuild_gpu.sh
#   device run, carry ["mistral_cuda/_C.cpython-312-x86_64-linux-gnu.so"]:
#     bash benches/gpu_check.sh test bench        # finds the module: no build stage
set -euo pipefail
cd "$(dirname "$0")/.."
export PYENV_VERSION=${PYENV_VERSION:-$(pyenv versions --bare 2>/dev/null | grep -m1 '^3\.12' || true)}
PY312=${PY312:-python3.12}
"$PY312" -m pip install --quiet --disable-pip-version-check pybind11 ninja
BUILD=${BUILD_DIR:-build-gpu312}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMC_ENABLE_CUDA=ON -DMC_NATIVE=OFF \
  -DPython_EXECUTABLE="$("$PY312" -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$("$PY312" -m pybind11 --cmakedir)" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/mistral_cuda" ${MC_CMAKE_ARGS:-}
cmake --build "$BUILD" -j "${MC_BUILD_JOBS:-2}" --target _C
ls -la mistral_cuda/_C.cpython-312-*.so
