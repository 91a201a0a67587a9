#!/usr/bin/env bash
# The README's main command. On a fresh Debian 12 machine it installs what is
# needed, builds dtrain, converts Fashion-MNIST from Debian's
# dataset-fashion-mnist package to sharded HDF5 (once), and trains ResNet-20
# on 2 CPU ranks for at most DTRAIN_DEMO_MINUTES (default 5) minutes under
# the restart supervisor, with checkpoints. It then evaluates on the test
# split and prints the test accuracy and where the metrics, plot and
# checkpoints are. Run it again and it resumes from the newest checkpoint;
# the full schedule (DTRAIN_DEMO_EPOCHS, default 8 epochs) takes a few runs.
#
# Environment: DTRAIN_DEMO_MINUTES, DTRAIN_DEMO_EPOCHS, DTRAIN_DEMO_RANKS (2),
# DTRAIN_DEMO_OUT (runs/demo), DTRAIN_BUILD_DIR (build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" -DDTRAIN_BUILD_TESTS=OFF
build=${DTRAIN_BUILD_DIR:-$root/build}
minutes=${DTRAIN_DEMO_MINUTES:-5}
epochs=${DTRAIN_DEMO_EPOCHS:-8}
ranks=${DTRAIN_DEMO_RANKS:-2}
out=${DTRAIN_DEMO_OUT:-$root/runs/demo}
mkdir -p "$(dirname "$out")"
data=$root/data/fashion-mnist

if [ ! -f "$data/test/manifest.json" ]; then
  source_dir=$(dirname "$(dpkg -L dataset-fashion-mnist | grep -m1 'train-images-idx3-ubyte')")
  "$build/src/data/dtrain-data" convert-fashion-mnist --source "$source_dir" --out "$data" --shards 4
fi

# --max-minutes stops with an evaluation and a checkpoint (exit 0); the
# supervisor restarts the job only after a failure.
"$root/scripts/launch/dtrain-launch" -n "$ranks" --max-restarts 3 --backoff 5 -- \
  "$build/examples/resnet/dtrain-resnet" --model resnet20 \
  --train-data "$data/train" --test-data "$data/test" --out "$out" \
  --epochs "$epochs" --global-batch 128 --lr 0.1 --warmup-epochs 1 --schedule cosine \
  --threads 1 --max-minutes "$minutes" --checkpoint-every 100 | tee "$out.log"

if /usr/bin/python3 "$root/scripts/plot_metrics.py" "$out/metrics" -o "$out/metrics.png"; then
  echo "plot:        $out/metrics.png"
fi
if grep -q "time limit of" "$out.log"; then
  echo "demo: stopped after $minutes minutes with a checkpoint; run the same command again to continue"
fi
