#!/usr/bin/env bash
# Runs abort_on_timeout with N ranks and checks that the job ends by itself
# well before the hung rank would wake up, with a non-zero status and an
# error naming the op and the missing rank.
set -u
mpiexec=$1 ranks=$2 program=$3
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
timeout 90 "$mpiexec" -n "$ranks" "$program" >"$log" 2>&1
status=$?
elapsed=$(( $(date +%s) - start ))
cat "$log"
missing=$((ranks - 1))
fail() { echo "FAIL: $*"; exit 1; }
[ "$status" -ne 0 ] || fail "the job exited 0"
[ "$status" -ne 124 ] || fail "the job hung until the 90 s guard"
[ "$elapsed" -le 30 ] || fail "the job took ${elapsed}s to end"
grep -q "aborting the job" "$log" || fail "no abort message"
grep -q "all_reduce" "$log" || fail "the error does not name the op"
grep -q "not heard from: \[$missing\]" "$log" || fail "the error does not name rank $missing"
echo "PASS: job with a hung rank ended after ${elapsed}s with status $status"
