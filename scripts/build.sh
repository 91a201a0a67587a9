#!/usr/bin/env bash
# Configures and builds dtrain into ./build (or $DTRAIN_BUILD_DIR) with
# Ninja, Release, warnings as errors. Extra arguments go to cmake.
#
# DTRAIN_BUILD_FOR_TESTS=LABELS (a ctest label regex, e.g. 'unit|mpi') builds
# only what the ctest entries with those labels run, and what that needs
# (scripts/tested_targets.py), instead of everything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DTRAIN_BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDTRAIN_WERROR=ON \
  -DDTRAIN_BUILD_TESTS=ON -DDTRAIN_BUILD_BENCHMARKS=ON "$@" >/dev/null
if [ -n "${DTRAIN_BUILD_FOR_TESTS:-}" ]; then
  mapfile -t targets < <("$root/scripts/tested_targets.py" "$build" -L "$DTRAIN_BUILD_FOR_TESTS")
  if [ "${#targets[@]}" -eq 0 ]; then
    echo "build: no ctest entry has a label matching '$DTRAIN_BUILD_FOR_TESTS'; nothing to build" >&2
    exit 0
  fi
  echo "build: ${#targets[@]} programs for the tests labelled '$DTRAIN_BUILD_FOR_TESTS'" >&2
  ninja -C "$build" -j "$(nproc)" "${targets[@]}"
else
  cmake --build "$build" --parallel "$(nproc)"
fi
