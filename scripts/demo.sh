#!/usr/bin/env bash
# The README's main command: installs what is needed, builds, and runs the
# all-reduce benchmark with 2 ranks on this machine, every algorithm side by
# side with MPI_Allreduce. Results: runs/allreduce-2ranks.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" -DDTRAIN_BUILD_TESTS=OFF
build=${DTRAIN_BUILD_DIR:-$root/build}
mkdir -p "$root/runs"
"$root/scripts/launch/dtrain-mpirun" -n 2 "$build/benchmarks/allreduce_perf" \
  -b 8 -e 256M -f 4 -w 5 -n 20 --json "$root/runs/allreduce-2ranks.json"
echo "results: $root/runs/allreduce-2ranks.json"
