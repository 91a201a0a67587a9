#!/usr/bin/env bash
# The GPT demo: converts Debian's fortunes (installed by scripts/setup.sh) to
# a character-level token data set (once), and trains the GPT example
# (4 layers, 4 heads, embedding 128, context 64) on the CPU ranks this
# machine has, as dp x pp x tp: tensor parallelism over groups of
# DTRAIN_GPT_TP ranks, pipeline parallelism over DTRAIN_GPT_PP of those
# groups (the blocks cut into stages, 1f1b over DTRAIN_GPT_MICROBATCHES
# microbatches) and data parallelism across the rest, for at most
# DTRAIN_GPT_MINUTES (default 5) minutes with checkpoints. It prints the
# unigram baseline, the training and validation loss (and bits per
# character) and a text sample at the end. Run it again and it resumes from
# the newest checkpoint (at any --tp and --pp).
#
# The default (tp 2, pp 1) fits 2 ranks. pp 2 x tp 2 on 4 ranks (more ranks
# than a 2-core machine has cores, so slower there, but all three kinds of
# parallelism at once when the ranks allow dp 2 too):
#
#   DTRAIN_GPT_RANKS=4 DTRAIN_GPT_PP=2 scripts/demo-gpt.sh
#
# Environment: DTRAIN_GPT_MINUTES (5), DTRAIN_GPT_STEPS (2000),
# DTRAIN_GPT_RANKS (the number of cores, rounded down to a multiple of
# tp x pp, at least one group), DTRAIN_GPT_TP (2), DTRAIN_GPT_PP (1),
# DTRAIN_GPT_MICROBATCHES (4), DTRAIN_GPT_OUT (runs/gpt-demo),
# DTRAIN_BUILD_DIR (build). Extra arguments go to dtrain-gpt
# (--sequence-parallel, --dropout 0.1, --pp-schedule zb-h1, ...).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" -DDTRAIN_BUILD_TESTS=OFF
build=${DTRAIN_BUILD_DIR:-$root/build}
minutes=${DTRAIN_GPT_MINUTES:-5}
steps=${DTRAIN_GPT_STEPS:-2000}
tp=${DTRAIN_GPT_TP:-2}
pp=${DTRAIN_GPT_PP:-1}
microbatches=${DTRAIN_GPT_MICROBATCHES:-4}
ranks=${DTRAIN_GPT_RANKS:-$(nproc)}
# A whole number of pp x tp groups, at least one.
group=$((tp * pp))
ranks=$((ranks / group * group))
[ "$ranks" -ge "$group" ] || ranks=$group
pipeline=()
[ "$pp" -eq 1 ] || pipeline=(--pp "$pp" --microbatches "$microbatches")
out=${DTRAIN_GPT_OUT:-$root/runs/gpt-demo}
mkdir -p "$(dirname "$out")"
data=$root/data/fortunes

if [ ! -f "$data/val/manifest.json" ]; then
  "$build/src/data/dtrain-data" convert-text --out "$data"
fi

# --max-minutes stops with an evaluation and a checkpoint (exit 0).
"$root/scripts/launch/dtrain-launch" -n "$ranks" --max-restarts 3 --backoff 5 -- \
  "$build/examples/gpt/dtrain-gpt" --train-data "$data/train" --val-data "$data/val" \
  --tp "$tp" "${pipeline[@]}" --layers 4 --heads 4 --embedding 128 --context 64 --global-batch 32 \
  --steps "$steps" --lr 1e-3 --warmup-epochs 0.05 --checkpoint-every 200 --eval-every 0 \
  --threads 1 --max-minutes "$minutes" --out "$out" "$@" | tee "$out.log"

if grep -q "time limit of" "$out.log"; then
  echo "demo: stopped after $minutes minutes with a checkpoint; run the same command again to continue"
fi
