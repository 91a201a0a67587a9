#!/bin/sh
# The GPT path of strategy_compare, tiny: a generated text of fortune-like
# records, 2 ranks, the dp 2, tp 2 (with and without sequence parallelism)
# and 1F1B pp 2 layouts, 3 steps each, with the planner's prediction. Fails
# unless every layout is a measured row and dp 2 and tp 2 report the bytes
# they sent (the trainer's counting communicators).
#
#   strategy_compare_gpt_smoke.sh WORK DTRAIN_DATA DTRAIN_GPT STRATEGY_PROFILE DTRAIN_PLAN
set -eu
work=$1 data_tool=$2 gpt=$3 profiler=$4 planner=$5
here=$(dirname "$0")
rm -rf "$work" && mkdir -p "$work"
# 600 records of 4-9 words from a fixed list, separated by lines of '%'.
awk 'BEGIN { split("the cat sat on a mat and dog ran far away quick brown fox jumps over lazy rain in spain", w, " ");
             s = 7; for (r = 0; r < 600; r++) { n = 4 + s % 6; line = "";
               for (i = 0; i < n; i++) { s = (s * 1103515245 + 12345) % 2147483648; line = line (i ? " " : "") w[1 + s % 20] }
               print line "."; print "%" } }' > "$work/text.txt"
"$data_tool" convert-text --source "$work/text.txt" --out "$work/data" --shards 1 >/dev/null
/usr/bin/python3 "$here/../../benchmarks/strategy_compare.py" --model gpt --program "$gpt" \
  --profiler "$profiler" --planner "$planner" --data "$work/data/train" --ranks 2 \
  --global-batch 8 --steps 3 --warmup 1 --repeats 1 --schedules 1f1b --microbatch-multiples 1 \
  --predict --out "$work/out"
test -s "$work/out/strategies.json" && test -s "$work/out/profile-calibrated.json"
for layout in "dp2 pp1 tp1" "dp1 pp1 tp2" "dp1 pp1 tp2 sp" "dp1 pp2 tp1 1f1b m2"; do
  grep -q "^| $layout | [0-9]" "$work/out/strategies.md" || { echo "no measured row for $layout"; exit 1; }
done
# The sent MB/step column (the 8th) of dp 2 and tp 2: measured, not zero.
for layout in "dp2 pp1 tp1" "dp1 pp1 tp2"; do
  sent=$(grep "^| $layout |" "$work/out/strategies.md" | awk -F' [|] ' '{ print $8 }')
  awk -v s="$sent" 'BEGIN { exit !(s + 0 > 0) }' || { echo "$layout sent '$sent' MB per step"; exit 1; }
done
echo every-gpt-layout-measured
