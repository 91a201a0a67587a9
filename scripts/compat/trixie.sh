#!/usr/bin/env bash
# Builds dtrain and runs its unit and mpi tests on Debian 13 (trixie)'s stack:
# LibTorch 2.6, GCC 14, Open MPI 5.0, HDF5 1.14.
#
# It makes a trixie root with `debootstrap --variant=minbase` from the archive
# apt uses on this machine, installs the packages inside through the same
# scripts/setup.sh, and keeps the root in a cache for the next run. The source
# tree is bind-mounted at /src, the build directory at /build; the build is
# scripts/build.sh's (warnings as errors).
#
# Usage:
#   scripts/compat/trixie.sh [CTEST_ARGS...]   build what the unit and mpi tests
#                                               run, then run the trixie test set:
#                                               ctest -L 'unit|mpi' -E '_np[134]$'
#                                               (CTEST_ARGS replace it, and
#                                               everything is built)
#   scripts/compat/trixie.sh --build-only       make (or find) the root and build
#                                               what the unit and mpi tests run
#   scripts/compat/trixie.sh --shell [CMD]      a shell inside the root (or runs CMD there)
#   scripts/compat/trixie.sh --root-only        only make (or find) the cached root
#   scripts/compat/trixie.sh --print-tests      print the trixie test set's ctest
#                                               arguments, one a line
#
# The trixie test set: every unit- and mpi-labelled ctest entry except the
# 1-, 3- and 4-rank runs (_np1, _np3, _np4) of programs that also run at 2
# ranks: each program runs once, multi-rank, on the new stack, and the whole
# set fits in CI's time (docs/compat.md).
#
# Environment:
#   DTRAIN_COMPAT_CACHE      where roots live (default /var/cache/dtrain/compat)
#   DTRAIN_COMPAT_BUILD_DIR  build directory (default <repo>/build-trixie)
#   DTRAIN_COMPAT_MIRROR     Debian archive (default: the URI in apt's sources)
#
# Needs root (debootstrap, chroot and mounts) and a Linux that allows mount
# namespaces (`unshare --mount`). Everything it mounts lives in a private
# mount namespace that disappears with the script, and is also unmounted on
# exit. Runs one after another reuse the root; concurrent runs share it, and
# wait for each other only while a root is made or on the same build directory.
# Exit status: ctest's (--build-only: the build's), or 2 where it cannot run
# (not root, no namespaces).
set -euo pipefail

# The trixie test set (above) and the labels whose programs are built for it:
# the same programs (tests/scripts/test_compat_tests.py checks that).
test_labels='unit|mpi'
test_set=(-L "$test_labels" -E '_np[134]$')
build_for=$test_labels
if [ "${1:-}" = --print-tests ]; then
  printf '%s\n' "${test_set[@]}"
  exit 0
fi

suite=trixie
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
self="$repo/scripts/compat/$(basename "${BASH_SOURCE[0]}")"
cache=${DTRAIN_COMPAT_CACHE:-/var/cache/dtrain/compat}
build=${DTRAIN_COMPAT_BUILD_DIR:-$repo/build-$suite}

say() { echo "compat[$suite]: $*" >&2; }
die() {
  say "$*"
  exit 1
}

# --- can it run here? ----------------------------------------------------------
cannot_run() {
  say "cannot run here: $*"
  say "(scripts/test.sh runs this build unless DTRAIN_COMPAT=0; docs/compat.md)"
  exit 2
}
[ "$(uname -s)" = Linux ] || cannot_run "needs Linux"
[ "$(id -u)" -eq 0 ] || cannot_run "needs root for debootstrap, chroot and mounts; run it as root (sudo $0)"
for tool in unshare chroot mount flock sha256sum; do
  command -v "$tool" >/dev/null || cannot_run "'$tool' is missing"
done

# Re-run inside a private mount and PID namespace: no mount can leak to the
# host, and no process started inside outlives the script.
if [ "${DTRAIN_COMPAT_IN_NAMESPACE:-}" != 1 ]; then
  unshare --mount --propagation private --fork --pid --kill-child true 2>/dev/null ||
    cannot_run "cannot create a mount namespace (unshare --mount); a container needs CAP_SYS_ADMIN"
  DTRAIN_COMPAT_IN_NAMESPACE=1 unshare --mount --propagation private --fork --pid \
    --kill-child "$self" "$@" &
  namespace_pid=$!
  # unshare blocks SIGINT and SIGTERM while it waits, so a signal sent to this
  # script alone (a CI job cancelled, scripts/test.sh stopping) is passed on
  # to every process in the namespace: the step running there (a build,
  # ctest) stops, and the script inside unmounts and cleans up. If it has
  # not finished 10 s later, the namespace is ended, which ends every process
  # in it and takes its mounts along; the next run removes what it left in
  # the cache.
  stopped_by=""
  stop_namespace() { # stop_namespace SIGNAL EXIT-STATUS
    trap '' INT TERM HUP
    stopped_by=$2
    local inner _
    inner=$(ps -o pid= --ppid "$namespace_pid" 2>/dev/null | tr -d ' ')
    if [ -n "$inner" ]; then
      pkill -"$1" --ns "$inner" --nslist pid 2>/dev/null || kill -"$1" "$inner" 2>/dev/null || true
    fi
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$namespace_pid" 2>/dev/null || return 0
      sleep 1
    done
    say "still running 10 s after SIG$1: ending its namespace"
    kill -KILL "$namespace_pid" 2>/dev/null || true
  }
  trap 'stop_namespace INT 130' INT
  trap 'stop_namespace TERM 143' TERM
  trap 'stop_namespace HUP 129' HUP
  while :; do
    rc=0
    wait "$namespace_pid" || rc=$?
    kill -0 "$namespace_pid" 2>/dev/null || break # else a trap interrupted wait
  done
  exit "${stopped_by:-$rc}"
fi

mode=test
case "${1:-}" in
  --shell) mode=shell; shift ;;
  --root-only) mode=root; shift ;;
  --build-only) mode=build; shift ;;
  -h | --help) sed -n '2,/^set -euo/p' "$self" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

[ "$mode" = build ] && [ $# -gt 0 ] && die "--build-only takes no other arguments (given: $*)"

if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# The archive apt uses here: the first URI of the deb822 sources, else of the
# one-line sources.
archive_uri() {
  local f uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "URIs:" { print $2; exit }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; exit } }')
  fi
  echo "${uri%/}"
}
mirror=${DTRAIN_COMPAT_MIRROR:-$(archive_uri)}
[ -n "$mirror" ] || die "no Debian archive found in /etc/apt; set DTRAIN_COMPAT_MIRROR"
case "$mirror" in
  *debian-security*) die "the first apt source is a security archive ($mirror); set DTRAIN_COMPAT_MIRROR" ;;
esac

# --- mounts ----------------------------------------------------------------------
mounted=()
mount_at() { # mount_at TARGET MOUNT-ARGS...
  local target=$1
  shift
  mount "$@" "$target"
  mounted+=("$target")
}
unmount_all() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount -R "${mounted[i]}" 2>/dev/null || umount -R -l "${mounted[i]}" 2>/dev/null || true
  done
  mounted=()
}
run_dir=""
cleanup() {
  local rc=$?
  trap '' INT TERM HUP # a second Ctrl-C must not cut the cleanup short
  unmount_all
  [ -n "$run_dir" ] && rm -rf --one-file-system "$run_dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# The kernel file systems, a fresh /tmp and /dev/shm, and the source tree.
enter_mounts() { # enter_mounts ROOT
  local r=$1
  mkdir -p "$r/src" "$r/build" "$r/ccache"
  mount_at "$r/proc" -t proc proc
  mount_at "$r/sys" --rbind /sys
  mount_at "$r/dev" --bind /dev
  mount_at "$r/dev/pts" --bind /dev/pts
  mount_at "$r/dev/shm" -t tmpfs -o mode=1777,nosuid,nodev tmpfs
  run_dir=$(mktemp -d "$cache/run.XXXXXX")
  chmod 1777 "$run_dir"
  mount_at "$r/tmp" --bind "$run_dir"
  mount_at "$r/src" --bind "$repo"
  cp /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
}

# Runs a command inside ROOT with a clean environment.
in_root() { # in_root ROOT CMD...
  local r=$1
  shift
  chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" DEBIAN_FRONTEND=noninteractive "$@"
}

# Is there a mount below PATH (in this namespace)? Guards every rm -rf.
has_mounts_below() {
  awk -v p="$1/" 'index($5 "/", p) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo
}
remove_tree() {
  if has_mounts_below "$1"; then
    die "not removing $1: something is mounted below it"
  fi
  rm -rf --one-file-system "$1"
}

# --- the root ---------------------------------------------------------------------
make_root() {
  local tmp="$cache/.tmp-$suite-$key-$$" started=$SECONDS
  say "making a $suite root from $mirror (once per package list; cached in $rootfs)"
  debootstrap --variant=minbase "$suite" "$tmp" "$mirror" >"$cache/debootstrap-$suite.log" 2>&1 || {
    tail -20 "$cache/debootstrap-$suite.log" >&2
    die "debootstrap failed; the whole log is $cache/debootstrap-$suite.log"
  }
  # Package scripts must not start services (munge, slurmd) inside the root.
  printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
  chmod 755 "$tmp/usr/sbin/policy-rc.d"
  enter_mounts "$tmp"
  local packages_started=$SECONDS
  say "base system in $((SECONDS - started)) s; installing packages through scripts/setup.sh"
  in_root "$tmp" /src/scripts/setup.sh
  in_root "$tmp" apt-get install -y -qq --no-install-recommends ccache >/dev/null
  in_root "$tmp" apt-get clean
  unmount_all
  remove_tree "$run_dir"
  run_dir=""
  mv "$tmp" "$rootfs"
  say "packages in $((SECONDS - packages_started)) s; root made in $((SECONDS - started)) s"
}

# A root is keyed by what made it: the code above that makes it, setup.sh
# (its package list) and the archive. A changed package list makes a new root.
key=$({ declare -f make_root enter_mounts in_root; cat "$repo/scripts/setup.sh"; echo "$suite $mirror"; } |
  sha256sum | cut -c1-16)
rootfs="$cache/$suite-$key"

mkdir -p "$cache"
exec 9>"$cache/lock"
if flock -xn 9; then
  # No other run is going: a half-made root (.tmp-*) or a /tmp (run.*) left
  # here belongs to a run that was killed.
  for old in "$cache"/.tmp-* "$cache"/run.*; do
    if [ -e "$old" ]; then remove_tree "$old"; fi
  done
fi
flock -s 9 # a shared lock while the root is in use: no one replaces it
if [ -d "$rootfs" ]; then
  say "using the cached root $rootfs"
else
  flock -x 9 # released and taken again: runs that use a root finish first
  if [ -d "$rootfs" ]; then
    say "using the root $rootfs that another run has just made"
  else
    # No other run holds the lock: older roots (other keys) are unused.
    for old in "$cache"/.tmp-"$suite"-* "$cache"/"$suite"-*; do
      [ -e "$old" ] || continue
      say "removing $old"
      remove_tree "$old"
    done
    make_root
  fi
  flock -s 9
fi
[ "$mode" = root ] && exit 0

# --- build and test -----------------------------------------------------------------
mkdir -p "$build" "$cache/ccache"
exec 8<"$build"
flock -x 8 # one run at a time per build directory
# A build made against another root is stale in ways CMake does not see.
if [ -f "$build/CMakeCache.txt" ] && [ "$(cat "$build/.compat-root" 2>/dev/null)" != "$key" ]; then
  say "the build in $build was made against another root; starting it afresh"
  for entry in "$build"/* "$build"/.[!.]*; do
    if [ -e "$entry" ]; then remove_tree "$entry"; fi
  done
fi
echo "$key" >"$build/.compat-root"

# The compiler cache. ccache keeps nothing that makes or uses a precompiled
# header (CMake's target_precompile_headers) unless its sloppiness allows
# pch_defines and time_macros. Both are safe here: the precompiled headers
# are LibTorch's and GoogleTest's, and nothing uses __DATE__ or __TIME__.
ccache_env=(CCACHE_DIR=/ccache CCACHE_MAXSIZE=3G CCACHE_SLOPPINESS=pch_defines,time_macros)

enter_mounts "$rootfs"
mount_at "$rootfs/build" --bind "$build"
mount_at "$rootfs/ccache" --bind "$cache/ccache"

if [ "$mode" = shell ]; then
  if [ $# -gt 0 ]; then
    in_root "$rootfs" "${ccache_env[@]}" DTRAIN_BUILD_DIR=/build bash -c 'cd /src && eval "$*"' bash "$@"
  else
    say "shell in $rootfs (source at /src, build at /build); exit to leave"
    in_root "$rootfs" "${ccache_env[@]}" DTRAIN_BUILD_DIR=/build bash -i
  fi
  exit $?
fi

# cpu_seconds VAR: VAR = the processor time (user + system, in s) of what
# this script has run so far. With the wall time it tells how much the
# machine's load stretched a step: on an idle machine a step takes about its
# processor time / cores.
cpu_seconds() {
  times >"$run_dir/times" # here, not in $(...): a subshell's `times` would not see them
  printf -v "$1" '%s' "$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); n += t[1] * 60 + t[2] }
                              printf "%d\n", n }' "$run_dir/times")"
}
load() { cut -d' ' -f1 /proc/loadavg; }

# Without ctest arguments: build only what the unit and mpi tests run (no
# benchmark without a test, no header example, no cluster probe), and run the
# trixie test set; with them, build everything.
if [ $# -eq 0 ]; then
  set -- "${test_set[@]}"
else
  build_for=""
fi
started=$SECONDS
cpu_seconds started_cpu
say "building (load average $(load), $(nproc) cores)"
in_root "$rootfs" /src/scripts/setup.sh # no-op unless the package list changed
in_root "$rootfs" "${ccache_env[@]}" DTRAIN_BUILD_DIR=/build DTRAIN_BUILD_FOR_TESTS="$build_for" \
  /src/scripts/build.sh -DCMAKE_CXX_COMPILER_LAUNCHER=ccache
built=$SECONDS
cpu_seconds built_cpu
say "built in $((built - started)) s, $((built_cpu - started_cpu)) s of processor time (load average $(load))"
[ "$mode" = build ] && exit 0
rc=0
in_root "$rootfs" bash -c 'cd /build && ctest --output-on-failure --parallel "$(nproc)" --timeout 900 "$@"' \
  ctest "$@" || rc=$?
cpu_seconds tested_cpu
say "tests ran in $((SECONDS - built)) s, $((tested_cpu - built_cpu)) s of processor time (load average $(load); exit $rc)"
exit "$rc"
