#!/usr/bin/env bash
# The README's test command: installs what is needed, builds everything and
# runs every test (unit, mpi with 1-4 ranks, and gpu tests, which skip
# themselves without a device). With DTRAIN_COMPAT=1 it then builds again on
# Debian 13 (trixie)'s stack and runs the unit and mpi tests there
# (scripts/compat/trixie.sh, docs/compat.md); that run is not on by default:
# on a fresh machine (no cached root, no compiler cache) it does not fit in
# CI's 45 minutes after the main suite (docs/compat.md, "Why it is not in CI
# by default"). CI runs exactly this. Arguments go to the first ctest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DTRAIN_BUILD_DIR:-$root/build}
"$root/scripts/setup.sh"

compat=0
[ "${DTRAIN_COMPAT:-0}" = 1 ] && compat=1
root_job=""
if [ "$compat" = 1 ]; then
  # The trixie root (cached after the first run) is made while the main
  # suite builds and runs: that mostly waits on the package archive.
  mkdir -p "$build"
  "$root/scripts/compat/trixie.sh" --root-only >"$build/compat-root.log" 2>&1 &
  root_job=$!
  trap '[ -z "$root_job" ] || { kill "$root_job" 2>/dev/null && wait "$root_job"; } || true' EXIT
fi

"$root/scripts/build.sh"
rc=0
(cd "$build" && ctest --output-on-failure --parallel "$(nproc)" --timeout 900 "$@") || rc=$?

if [ "$compat" = 1 ]; then
  # After the main suite, even when it failed: both verdicts are wanted.
  root_rc=0
  wait "$root_job" || root_rc=$?
  root_job=""
  cat "$build/compat-root.log"
  if [ "$root_rc" -eq 0 ]; then
    "$root/scripts/compat/trixie.sh" || rc=1
  else
    echo "test: the Debian 13 (trixie) root could not be made (exit $root_rc; log above)" >&2
    rc=1
  fi
else
  echo "test: the Debian 13 (trixie) build and tests are left out (DTRAIN_COMPAT=1 runs them; docs/compat.md)"
fi
exit "$rc"
