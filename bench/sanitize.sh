#!/usr/bin/env bash
# bench/sanitize.sh — the CPU engine, and the CUDA engine's kernels on the host emulator
# (cuda/emulator/), under AddressSanitizer + UndefinedBehaviorSanitizer, on a subset of the
# test suite (tests/test_cuda_emulated.py whole: every kernel's reads and writes checked, as
# compute-sanitizer memcheck would on a GPU). Not in .ci/run: the instrumented build of the three ISA
# kernels and the slowed-down tests take tens of minutes on 2 cores (bench/README.md).
#
#   bench/sanitize.sh                 # build (incremental after the first run) and test
#   bench/sanitize.sh -k l1           # extra pytest arguments replace the default -k filter
#
# Environment:
#   SAN_DIR    where the instrumented build and its venv live (default /tmp/genloss-asan)
#   BASE_PY    the Python whose installed packages (torch, numpy, pytest, hypothesis,
#              scikit-build-core, pybind11, cmake, ninja) the sanitizer venv reuses;
#              default: the python3 on PATH
#
# The sanitizer venv sees BASE_PY's site-packages through a .pth entry (no second torch
# install) but not its genloss, for the instrumented build is installed into it
# non-editable. Python itself is not instrumented, so libasan is preloaded.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SAN_DIR=${SAN_DIR:-/tmp/genloss-asan}
BASE_PY=${BASE_PY:-$(command -v python3)}
VENV="$SAN_DIR/venv"
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"

if [ ! -x "$VENV/bin/python" ]; then
  "$BASE_PY" -m venv "$VENV"
  base_site=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  san_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$base_site" > "$san_site/base-packages.pth"
fi
# cmake and ninja of the base environment (its bin/ is not on the venv's PATH)
export PATH="$VENV/bin:$(dirname "$BASE_PY"):$PATH"

echo "sanitize: building the CPU engine and the CUDA emulator with $FLAGS into $SAN_DIR/build" >&2
(cd "$ROOT" && "$VENV/bin/python" -m pip install --no-build-isolation --no-deps -q . \
  -Cbuild-dir="$SAN_DIR/build" \
  -Ccmake.define.GENLOSS_CUDA=OFF \
  -Ccmake.define.GENLOSS_CUDA_EMULATOR=ON \
  -Ccmake.build-type=RelWithDebInfo \
  "-Ccmake.define.CMAKE_CXX_FLAGS=$FLAGS" \
  "-Ccmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined")

# libstdc++ too: python does not link it, and without it at preload time ASan's
# __cxa_throw interceptor finds no real __cxa_throw ("CHECK failed ... real___cxa_throw")
# at the first C++ exception (every ValueError the engine raises)
PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
# detect_leaks=0: CPython and torch keep allocations to exit on purpose.
# halt_on_error + -fno-sanitize-recover: the first finding fails the run, with a stack.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

if [ $# -eq 0 ]; then
  set -- -k "l1 or gan_d or gaussian_kl or mmd2"
fi
cd "$ROOT"
# `import genloss` is the instrumented install (tests/conftest.py falls back to python/
# only when genloss is not installed). -s: a sanitizer report goes to stderr, which pytest
# would capture and lose when the report ends the process (the run then died silently).
LD_PRELOAD="$PRELOAD" "$VENV/bin/python" -m pytest -q -x -s -p no:cacheprovider \
  tests/test_native.py "$@"
LD_PRELOAD="$PRELOAD" "$VENV/bin/python" -m pytest -q -x -s -p no:cacheprovider \
  tests/test_engine.py tests/test_bad_input.py tests/test_processes.py tests/test_cuda_emulated.py
echo "sanitize: clean" >&2
