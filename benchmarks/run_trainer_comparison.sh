#!/usr/bin/env bash
# A training program of dtrain against PyTorch's Python DDP (Gloo) on the same
# model, global batch and threads, in one run: the throughput of each and the
# ratio.
#
#   benchmarks/run_trainer_comparison.sh [-M resnet20|gpt] [-n RANKS] [-b GLOBAL_BATCH]
#                                        [-s STEPS] [-w WARMUP] [-r PAIRS] [-m]
#
# With -r PAIRS the two runs are repeated PAIRS times, alternating which goes
# first, and every pair's ratio is printed with their median: on a shared
# machine the speed of both sides drifts by 10-20% from minute to minute.
# -M resnet20 (the default): dtrain-resnet trains ResNet-20 on the real
# Fashion-MNIST data (data/fashion-mnist, made by scripts/demo.sh or
# dtrain-data convert-fashion-mnist), global batch 128, in images/s.
# -M gpt: dtrain-gpt trains the GPT example (4 layers, 4 heads, embedding
# 128, context 64, AdamW) data parallel on the fortunes text
# (data/fortunes, made by scripts/demo-gpt.sh or dtrain-data convert-text),
# global batch 32 windows, in tokens/s.
# dtrain runs with its loader, DDP and per-step metrics, without checkpoints
# or evaluation; its rate is the global batch over the mean step time after
# WARMUP steps, from rank 0's metrics (the step time includes the slowest
# rank, since every step ends with a collective). PyTorch trains the same
# network (benchmarks/pytorch_ddp_peer.py --model resnet20|gpt) on synthetic
# tensors already in memory, so it reads no data. Both use 1 intra-op thread
# per rank.
# dtrain's Runtime fixes glibc malloc's thresholds (docs/configuration.md);
# with -m PyTorch also runs a second time with the same thresholds
# (GLIBC_TUNABLES), and the ratio against that run is printed too.
# Environment: BUILD_DIR (build), PYTHON (/usr/bin/python3), MASTER_PORT.
# Needs PyTorch for PYTHON: scripts/setup.sh --with-peers installs python3-torch.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=resnet20 ranks=2 batch= steps=60 warmup=10 pairs=1 same_malloc=0
while getopts "M:n:b:s:w:r:mh" opt; do
  case $opt in
    M) model=$OPTARG ;;
    n) ranks=$OPTARG ;;
    b) batch=$OPTARG ;;
    s) steps=$OPTARG ;;
    w) warmup=$OPTARG ;;
    r) pairs=$OPTARG ;;
    m) same_malloc=1 ;;
    *) sed -n '2,32p' "$0"; exit 2 ;;
  esac
done
case $model in
  resnet20) batch=${batch:-128} per_sample=1 unit=images/s program=dtrain-resnet data_name=fashion-mnist
    data_hint="scripts/demo.sh or dtrain-data convert-fashion-mnist" ;;
  gpt) batch=${batch:-32} per_sample=64 unit=tokens/s program=dtrain-gpt data_name=fortunes
    data_hint="scripts/demo-gpt.sh or dtrain-data convert-text" ;;
  *) echo "run_trainer_comparison: -M must be resnet20 or gpt, got '$model'" >&2; exit 2 ;;
esac
build=${BUILD_DIR:-$root/build}
python=${PYTHON:-/usr/bin/python3}
. "$root/benchmarks/require_pytorch.sh"
require_pytorch run_trainer_comparison "$python"
data=$root/data/$data_name
[ -f "$data/train/manifest.json" ] || {
  echo "no $data/train: run $data_hint first" >&2
  exit 2
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_dtrain() {
echo "== $program: $ranks ranks, global batch $batch, $steps steps"
if [ "$model" = gpt ]; then
  "$root/scripts/launch/dtrain-mpirun" -n "$ranks" "$build/examples/gpt/dtrain-gpt" \
    --train-data "$data/train" --val-data none --checkpoint-dir none --sample-tokens 0 \
    --out "$work/dtrain" --steps "$steps" --global-batch "$batch" --threads 1 \
    --progress lines --log-every 1000 > "$work/dtrain.log"
else
  "$root/scripts/launch/dtrain-mpirun" -n "$ranks" "$build/examples/resnet/dtrain-resnet" \
    --model resnet20 --train-data "$data/train" --test-data none --checkpoint-dir none \
    --out "$work/dtrain" --steps "$steps" --global-batch "$batch" --threads 1 \
    --progress lines --log-every 1000 > "$work/dtrain.log"
fi
dtrain=$("$python" - "$work/dtrain/metrics/metrics-rank00000.jsonl" "$warmup" "$((batch * per_sample))" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if r["kind"] == "train"][int(sys.argv[2]):]
mean = lambda k: sum(r[k] for r in steps) / len(steps)
print(f"{int(sys.argv[3]) / mean('step_s'):.1f} {mean('data_wait_s')*1e3:.1f} {mean('forward_s')*1e3:.1f} "
      f"{mean('backward_s')*1e3:.1f} {mean('sync_s')*1e3:.1f} {mean('optimizer_s')*1e3:.1f} {mean('step_s')*1e3:.1f}")
EOF
)
read -r d_ips d_data d_fwd d_bwd d_sync d_opt d_step <<< "$dtrain"
}

# run_torch [ENV=VALUE...]: PyTorch's run, with the given environment.
run_torch() {
echo "== PyTorch DDP (Gloo): $ranks ranks, global batch $batch${1:+ ($1)}"
env "$@" "$root/scripts/launch/dtrain-mpirun" -n "$ranks" "$python" "$root/benchmarks/pytorch_ddp_peer.py" \
  --model "$model" $([ "$model" = gpt ] && echo --optimizer adamw) --global-batch "$batch" \
  -w "$warmup" -n "$((steps - warmup))" --threads 1 \
  --json "$work/pytorch.json" > "$work/pytorch.log"
torch=$("$python" - "$work/pytorch.json" "$per_sample" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
r = [r for r in rows if r["name"] == "pytorch-ddp"][0]
print(f"{r['samples_per_s'] * int(sys.argv[2]):.1f} {r['forward_ms']:.1f} {r['backward_ms']:.1f} {r['step_ms']:.1f}")
EOF
)
read -r t_ips t_fwd t_bwd t_step <<< "$torch"
}

# The thresholds src/runtime/malloc_policy.cpp sets, for PyTorch's processes.
same_thresholds=GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
run_torch_same_malloc() {
  [ "$same_malloc" = 1 ] || return 0
  local saved="${t_ips:-} ${t_fwd:-} ${t_bwd:-} ${t_step:-}"
  run_torch "$same_thresholds"
  m_ips=$t_ips m_fwd=$t_fwd m_bwd=$t_bwd m_step=$t_step
  read -r t_ips t_fwd t_bwd t_step <<< "$saved"
}

ratios=() same_ratios=()
for ((pair = 1; pair <= pairs; pair++)); do
  [ "$pairs" -gt 1 ] && echo "== pair $pair of $pairs"
  if ((pair % 2 == 1)); then
    run_dtrain
    run_torch_same_malloc
    run_torch
  else
    run_torch
    run_torch_same_malloc
    run_dtrain
  fi

  printf '\n%-28s %10s %8s %8s %9s %8s %8s %9s\n' "ms per step (rank 0)" "$unit" "data" "forward" "backward" "sync" "optim" "step"
  printf '%-28s %10s %8s %8s %9s %8s %8s %9s\n' "$program (real data)" "$d_ips" "$d_data" "$d_fwd" "$d_bwd" "$d_sync" "$d_opt" "$d_step"
  printf '%-28s %10s %8s %8s %9s %8s %8s %9s\n' "PyTorch DDP (in-memory)" "$t_ips" "-" "$t_fwd" "$t_bwd" "-" "-" "$t_step"
  if [ "$same_malloc" = 1 ]; then
    printf '%-28s %10s %8s %8s %9s %8s %8s %9s\n' "PyTorch, same malloc" "$m_ips" "-" "$m_fwd" "$m_bwd" "-" "-" "$m_step"
    "$python" -c "print(f'ratio dtrain / PyTorch with the same malloc thresholds: {$d_ips / $m_ips:.2f}')"
    same_ratios+=("$("$python" -c "print(f'{$d_ips / $m_ips:.2f}')")")
  fi
  "$python" -c "print(f'ratio dtrain / PyTorch ($unit): {$d_ips / $t_ips:.2f}')"
  ratios+=("$("$python" -c "print(f'{$d_ips / $t_ips:.2f}')")")
done
summary() {
  "$python" - "$@" <<'EOF'
import statistics, sys
r = [float(x) for x in sys.argv[2:]]
print(f"ratios dtrain / {sys.argv[1]}: " + " ".join(sys.argv[2:])
      + f"  median {statistics.median(r):.2f}  min {min(r):.2f}  max {max(r):.2f}")
EOF
}
if [ "$pairs" -gt 1 ]; then
  summary PyTorch "${ratios[@]}"
  if [ "$same_malloc" = 1 ]; then summary "PyTorch with the same malloc thresholds" "${same_ratios[@]}"; fi
fi
