#!/usr/bin/env bash
# dtrain's DDP against PyTorch's DistributedDataParallel (Gloo), in one run:
# for each model, build/benchmarks/ddp_perf and benchmarks/pytorch_ddp_peer.py
# with the same ranks, batch, threads, optimizer and steps, then a
# side-by-side table of samples/s with the ratio dtrain / PyTorch.
#
#   benchmarks/run_ddp_comparison.sh [-n RANKS] [-w WARMUP] [-i ITERS] [-r REPEAT] [-o DIR] [MODEL...]
#
# MODELs: mlp resnet20 (default: both). Environment: BUILD_DIR (default
# build), PYTHON (default /usr/bin/python3, the interpreter Debian's
# python3-torch installs into), MASTER_PORT (default 29517). Needs PyTorch
# for PYTHON: scripts/setup.sh --with-peers installs python3-torch.
# Each program's own table is printed too, and its JSON kept in DIR
# (default: a temporary directory). -r REPEAT runs every row REPEAT times and
# keeps its fastest run (for shared, noisy machines).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ranks=2 warmup=3 iters=10 repeat=1 outdir=""
while getopts "n:w:i:r:o:h" opt; do
  case $opt in
    n) ranks=$OPTARG ;;
    w) warmup=$OPTARG ;;
    i) iters=$OPTARG ;;
    r) repeat=$OPTARG ;;
    o) outdir=$OPTARG ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(mlp resnet20)

build=${BUILD_DIR:-$root/build}
python=${PYTHON:-/usr/bin/python3}
. "$root/benchmarks/require_pytorch.sh"
require_pytorch run_ddp_comparison "$python"
launch=$root/scripts/launch/dtrain-mpirun
perf=$build/benchmarks/ddp_perf
if [ ! -x "$perf" ]; then
  echo "run_ddp_comparison: $perf not found; build it: cd $build && ninja ddp_perf" >&2
  exit 1
fi
if [ -z "$outdir" ]; then
  outdir=$(mktemp -d)
  trap 'rm -rf "$outdir"' EXIT
fi
mkdir -p "$outdir"
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29517}

for model in "${models[@]}"; do
  echo "== $model: dtrain ($ranks ranks)"
  "$launch" -n "$ranks" "$perf" --model "$model" -w "$warmup" -n "$iters" -r "$repeat" \
    --json "$outdir/dtrain-$model.json"
  echo "== $model: PyTorch DDP, Gloo ($ranks ranks)"
  "$launch" -n "$ranks" "$python" "$root/benchmarks/pytorch_ddp_peer.py" --model "$model" \
    -w "$warmup" -n "$iters" -r "$repeat" --json "$outdir/pytorch-$model.json"
done

"$python" - "$outdir" "${models[@]}" <<'PY'
import json, sys
outdir, models = sys.argv[1], sys.argv[2:]
print("\n== dtrain vs PyTorch (samples/s; ratio > 1: dtrain faster)")
print(f"{'model':<9} {'setup':<34} {'dtrain':>10} {'pytorch':>10} {'ratio':>7}")
for model in models:
    d = json.load(open(f"{outdir}/dtrain-{model}.json"))
    p = json.load(open(f"{outdir}/pytorch-{model}.json"))
    world = d["world_size"]
    plain_d = next(r for r in d["rows"] if r["name"] == "libtorch")
    plain_p = next(r for r in p["rows"] if r["name"] == "pytorch")
    ddp_p = next(r for r in p["rows"] if r["name"] == "pytorch-ddp")
    multi = [r for r in d["rows"] if r["name"] == "ddp" and r["ranks"] == world]
    same = next((r for r in multi if r["overlap"] == "on"
                 and r["bucket_cap_bytes"] == 25 << 20), None)
    best = max(multi, key=lambda r: r["samples_per_s"]) if multi else None
    pairs = [("1 process, no DDP", plain_d, plain_p)]
    if same:
        pairs.append((f"DDP {world} ranks, overlap, 25 MiB", same, ddp_p))
    if best:
        cap = best["bucket_cap_bytes"] >> 20
        pairs.append((f"DDP {world} ranks, best ({best['overlap']}, {cap} MiB)", best, ddp_p))
    for label, a, b in pairs:
        ratio = a["samples_per_s"] / b["samples_per_s"] if b["samples_per_s"] else float("nan")
        print(f"{model:<9} {label:<34} {a['samples_per_s']:>10.1f} {b['samples_per_s']:>10.1f} "
              f"{ratio:>7.2f}")
PY
