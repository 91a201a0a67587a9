#!/usr/bin/env bash
# The README's test command: installs what is needed, builds everything and
# runs every test (unit, mpi with 1-4 ranks, and gpu tests, which skip
# themselves without a device). Then it runs the Debian 13 (trixie) test set
# on Debian 13's stack (scripts/compat/trixie.sh, docs/compat.md): the unit
# and mpi tests, the mpi programs at 2 ranks. DTRAIN_COMPAT=0 leaves that part
# out. CI runs exactly this. Arguments go to the first ctest.
#
# The Debian 13 root and build run in the background from the start, at a
# lower priority (nice 10): making the root waits mostly on the package
# archive, and the build takes the processor time the main build leaves and
# that the main tests spend waiting. Their log is compat-build.log in the
# build directory. Its tests run after the main suite. A failure of any part
# fails the command, after the main suite has run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DTRAIN_BUILD_DIR:-$root/build}

case "${DTRAIN_COMPAT:-1}" in
  0) compat=0 ;;
  1) compat=1 ;;
  *)
    echo "test: DTRAIN_COMPAT is '${DTRAIN_COMPAT}'; set it to 1 (the default: also build and test on Debian 13) or 0 (leave that out)" >&2
    exit 2
    ;;
esac

"$root/scripts/setup.sh"

compat_job=""
compat_log="$build/compat-build.log"
stop_compat() {
  # trixie.sh unmounts and cleans up on SIGTERM (docs/compat.md).
  if [ -n "$compat_job" ]; then
    kill "$compat_job" 2>/dev/null || true
    wait "$compat_job" 2>/dev/null || true
    compat_job=""
  fi
}
if [ "$compat" = 1 ]; then
  mkdir -p "$build"
  echo "test: making (or finding) the Debian 13 root and building there in the background; log: $compat_log"
  nice -n 10 "$root/scripts/compat/trixie.sh" --build-only >"$compat_log" 2>&1 &
  compat_job=$!
  trap stop_compat EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi

"$root/scripts/build.sh"
rc=0
(cd "$build" && ctest --output-on-failure --parallel "$(nproc)" --timeout 900 "$@") || rc=$?

if [ "$compat" = 1 ]; then
  # After the main suite, even when it failed: both verdicts are wanted.
  echo "test: waiting for the Debian 13 root and build ($compat_log)"
  compat_rc=0
  wait "$compat_job" || compat_rc=$?
  compat_job=""
  cat "$compat_log"
  if [ "$compat_rc" -eq 0 ]; then
    "$root/scripts/compat/trixie.sh" || {
      echo "test: the Debian 13 (trixie) test set failed (above)" >&2
      rc=1
    }
  else
    echo "test: the Debian 13 (trixie) root or build failed (exit $compat_rc; its log is above and in $compat_log)." >&2
    echo "test: where it cannot run (exit 2: not root, no mount namespaces), DTRAIN_COMPAT=0 leaves it out (docs/compat.md)" >&2
    rc=1
  fi
else
  echo "test: the Debian 13 (trixie) build and tests are left out (DTRAIN_COMPAT=0; docs/compat.md)"
fi
exit "$rc"
