#!/usr/bin/env bash
# Builds the C++ core and the module under AddressSanitizer + UndefinedBehaviorSanitizer (gcc,
# separate build directory build-asan/) and runs the CPU tests that load checkpoints and step
# the model with it. Any report fails the run: UBSan stops at the first error, ASan at any.
#   bash tests/sanitize.sh [pytest args]      (default: the loading/stepping subset below)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=build-asan
PACKAGE="$BUILD/python/mistral_cuda"
SANITIZE="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"

if [ ! -f "$(gcc -print-file-name=libasan.so)" ] || [ ! -f "$(gcc -print-file-name=libubsan.so)" ]; then
  echo "installing gcc's sanitizer runtimes" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "libgcc-$(gcc -dumpversion | cut -d. -f1)-dev" >/dev/null
fi

cmake -S . -B "$BUILD" -G Ninja -DMC_ENABLE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$SANITIZE" -DCMAKE_MODULE_LINKER_FLAGS="$SANITIZE" -DCMAKE_SHARED_LINKER_FLAGS="$SANITIZE" \
  -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/$PACKAGE" >/dev/null
cmake --build "$BUILD" -j "${MC_BUILD_JOBS:-2}"

# A package directory beside the sources: their .py files (linked) with the sanitized _C.
mkdir -p "$PACKAGE"
for source in mistral_cuda/*.py; do ln -sf "$PWD/$source" "$PACKAGE/"; done

if [ "$#" -eq 0 ]; then
  set -- tests/test_hardening.py tests/test_errors.py tests/test_cache.py tests/test_logits.py tests/test_generate.py
fi
# python3 itself is not instrumented, so the ASan runtime must be loaded first, and libstdc++
# with it (ASan finds the real __cxa_throw at start-up, before the module would load it). Leak
# checking is off: the interpreter keeps its own allocations until exit.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
PYTHONPATH="$PWD/$BUILD/python" \
  python3 -m pytest -q -p no:cacheprovider "$@"
