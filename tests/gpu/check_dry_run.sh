#!/usr/bin/env bash
# The GPU check's dry run on a CPU machine: scripts/gpu/prepare.sh makes the
# carried dependencies, scripts/gpu/check.sh --dry-run unpacks them, compiles
# and runs an MPI and an HDF5 program against them, configures dtrain against
# the installed LibTorch (its CMake config, and DTRAIN_TORCH_ROOT) with every
# dependency taken from them, and plans the device steps for 2 ranks (the
# multi-GPU path). Fails when a step fails or a plan is not what a 2-GPU
# machine would run.
#   check_dry_run.sh SOURCE_DIR WORK_DIR
set -euo pipefail
root=$1 work=$2
rm -rf "$work"
mkdir -p "$work"
"$root/scripts/gpu/prepare.sh" --out "$work/deps"
"$root/scripts/gpu/check.sh" --dry-run --deps "$work/deps" --build "$work/build" \
  --results "$work/results" --ranks 2
python3 - "$work/results/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
steps = {s["name"]: s for s in summary["steps"]}
problems = []
for name in ("environment", "deps", "mpi", "hdf5", "configure", "configure-torch-root"):
    if steps.get(name, {}).get("status") != "passed":
        problems.append(f"{name}: {steps.get(name, {}).get('status', 'missing')}")
for name in ("build", "ctest-gpu", "allreduce", "data", "resnet50-synthetic-dtrain",
             "resnet50-synthetic-pytorch", "resnet20-fashion-mnist-dtrain",
             "resnet20-fashion-mnist-pytorch"):
    if steps.get(name, {}).get("status") != "planned":
        problems.append(f"{name}: {steps.get(name, {}).get('status', 'missing')}, not planned")
if "mpirun_n 2 " not in steps.get("allreduce", {}).get("detail", ""):
    problems.append("allreduce is not planned on 2 ranks: " + steps.get("allreduce", {}).get("detail", ""))
if summary["counts"]["failed"]:
    problems.append(f"{summary['counts']['failed']} step(s) failed")
if problems:
    sys.exit("GPU check dry run: " + "; ".join(problems))
print("GPU check dry run: every preparation step passed and every device step is planned")
PY
