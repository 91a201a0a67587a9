#!/usr/bin/env bash
# Configures and builds dtrain into ./build (or $DTRAIN_BUILD_DIR) with
# Ninja, Release, warnings as errors. Extra arguments go to cmake.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DTRAIN_BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDTRAIN_WERROR=ON \
  -DDTRAIN_BUILD_TESTS=ON -DDTRAIN_BUILD_BENCHMARKS=ON "$@" >/dev/null
cmake --build "$build" --parallel "$(nproc)"
