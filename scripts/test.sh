#!/usr/bin/env bash
# The README's test command: installs what is needed, builds everything and
# runs every test (unit, mpi with 1-4 ranks, and gpu tests, which skip
# themselves without a device). CI runs exactly this.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
build=${DTRAIN_BUILD_DIR:-$root/build}
cd "$build"
ctest --output-on-failure --parallel "$(nproc)" --timeout 900 "$@"
