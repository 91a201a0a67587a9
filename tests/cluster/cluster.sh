#!/usr/bin/env bash
# A test cluster of N hosts on this machine, made of Linux namespaces.
#
#   cluster.sh check                    exit 0 if a cluster can be made here, else
#                                       print why and exit 1
#   cluster.sh up N [--owner PID]       make hosts h1..hN; print the cluster's directory
#   cluster.sh down [DIR]               remove everything `up` made
#   cluster.sh exec HOST CMD [ARG...]   run a command on a host
#   cluster.sh kill HOST                end every process of a host at once (a node
#                                       failure; the host stays, empty, as after a reboot)
#   cluster.sh cut HOST | heal HOST     take a host's link down / bring it back
#   cluster.sh hosts | subnet | mpirun-args
#   cluster.sh gc                       remove clusters whose owner process is gone
#
# Every command but up/check/gc takes the cluster from $DTRAIN_CLUSTER_DIR
# (what `up` printed): eval "$(cluster.sh up 3 | sed 's/^/export DTRAIN_CLUSTER_DIR=/')".
#
# Each host is
#   - a network namespace with one veth link into a bridge that `up` creates,
#     and one address on the bridge's private /24 (host hI has .I, the bridge
#     .254, which is where `mpirun`, run outside the hosts, is reached);
#   - a UTS namespace with the hostname hI, so that `hostname`, Open MPI and
#     dtrain see N different nodes;
#   - a mount namespace with its own /tmp and /dev/shm (empty tmpfs), as a
#     node has: no shared memory spans two hosts, and what daemons keep in
#     /tmp (Open MPI's session directories, Slurm's PMIx directories) does
#     not collide. The rest of the file system is shared, like a cluster's
#     shared file system: put what ranks on several hosts must see (data,
#     checkpoints) outside /tmp.
# A holder process (`sleep`) keeps the namespaces alive; `exec` and the
# Open MPI rsh agent (cluster-rsh, next to this script) enter them with nsenter.
# The namespaces have no route but their /24: nothing they send leaves the
# bridge. Names carry a random run id (bridge dtcbID, namespaces dtcID-hI,
# directory /run/dtrain-cluster.ID, which every host sees), so runs never collide; `down` and a
# failed `up` remove what was made, and `up` first removes clusters whose
# owner process (--owner, default the caller) has exited.
#
# Needs root, iproute2 (`ip`), util-linux (`unshare`, `nsenter`) and a kernel
# with network namespaces, veth and bridges.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=cluster.sh

die() {
  echo "$prog: $*" >&2
  exit 1
}

# --- checks -------------------------------------------------------------------
why_not() {
  [ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces and bridges); run as root"; return; }
  local tool
  for tool in ip unshare nsenter; do
    command -v "$tool" >/dev/null || { echo "'$tool' not found (install iproute2 and util-linux: scripts/setup.sh)"; return; }
  done
  local probe="dtcprobe$$"
  if ! out=$(ip netns add "$probe" 2>&1); then
    echo "cannot create a network namespace: $out"
    return
  fi
  ip netns del "$probe" 2>/dev/null || true
  if ! out=$(ip link add "$probe" type bridge 2>&1); then
    echo "cannot create a bridge: $out"
    return
  fi
  ip link del "$probe" 2>/dev/null || true
  if ! out=$(ip link add "${probe}a" type veth peer name "${probe}b" 2>&1); then
    echo "cannot create a veth pair: $out"
    return
  fi
  ip link del "${probe}a" 2>/dev/null || true
  if ! out=$(unshare --uts --mount --propagation private true 2>&1); then
    echo "cannot create UTS and mount namespaces: $out"
    return
  fi
}

# --- state --------------------------------------------------------------------
# $dir/id, subnet (a.b.c), bridge, owner; $dir/hosts: "NAME NETNS VETH ADDRESS" lines;
# $dir/NAME.pid: the holder of a host's namespaces.
cluster_dir() {
  local d=${DTRAIN_CLUSTER_DIR:-}
  [ -n "$d" ] || die "DTRAIN_CLUSTER_DIR is not set (the directory \`$prog up\` printed)"
  [ -f "$d/hosts" ] || die "$d is not a cluster directory (no hosts file)"
  echo "$d"
}

host_line() {  # DIR NAME -> "NAME NETNS VETH ADDRESS"
  local line
  line=$(awk -v h="$2" '$1 == h' "$1/hosts")
  [ -n "$line" ] || die "no host '$2' in this cluster (hosts: $(awk '{printf "%s ", $1}' "$1/hosts"))"
  echo "$line"
}

holder_pid() {  # DIR NAME
  local pid
  pid=$(cat "$1/$2.pid" 2>/dev/null) || die "host $2 has no holder process"
  kill -0 "$pid" 2>/dev/null || die "host $2 is gone (its holder process $pid has exited)"
  echo "$pid"
}

# Every process in a host's network namespace but its holder.
host_pids() {  # NETNS HOLDER
  ip netns pids "$1" 2>/dev/null | awk -v h="$2" '$1 != h'
}

# Stops, then kills, a set of processes: stopped first, none of them can
# react to the others' deaths (report a failure, clean up) before all die.
kill_all() {
  [ $# -gt 0 ] || return 0
  kill -STOP "$@" 2>/dev/null || true
  kill -KILL "$@" 2>/dev/null || true
}

# --- up / down ----------------------------------------------------------------
subnet_in_use() {  # a.b.c
  ip -4 route show table all 2>/dev/null | grep -q "\b${1//./\\.}\.[0-9]" ||
    ip -4 addr show 2>/dev/null | grep -q "inet ${1//./\\.}\."
}

do_down() {  # DIR
  local dir=$1 name ns veth addr pid
  [ -f "$dir/hosts" ] || { rm -rf "$dir"; return 0; }
  while read -r name ns veth addr; do
    pid=$(cat "$dir/$name.pid" 2>/dev/null || echo "")
    # shellcheck disable=SC2046
    kill_all $(ip netns pids "$ns" 2>/dev/null) ${pid:+$pid}
  done <"$dir/hosts"
  while read -r name ns veth addr; do
    ip link del "$veth" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done <"$dir/hosts"
  ip link del "$(cat "$dir/bridge")" 2>/dev/null || true
  rm -rf "$dir"
}

do_gc() {
  local d owner
  for d in /run/dtrain-cluster.*; do
    [ -d "$d" ] || continue
    owner=$(cat "$d/owner" 2>/dev/null || echo "")
    if [ -z "$owner" ] || ! kill -0 "$owner" 2>/dev/null; then
      echo "$prog: removing $d (its owner ${owner:-?} has exited)" >&2
      do_down "$d"
    fi
  done
}

do_up() {
  local n=$1 owner=$2
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 250 ] || die "up: N must be 1..250, got '$n'"
  local reason
  reason=$(why_not)
  [ -z "$reason" ] || die "cannot make a cluster here: $reason"
  do_gc
  local id dir tries=0
  while :; do
    id=$(printf '%05x' $(((RANDOM << 15 | RANDOM) & 0xfffff)))
    dir=/run/dtrain-cluster.$id
    if ! ip link show "dtcb$id" >/dev/null 2>&1 && mkdir "$dir" 2>/dev/null; then break; fi
    tries=$((tries + 1))
    [ $tries -lt 50 ] || die "up: no free cluster id"
  done
  echo "$owner" >"$dir/owner"
  : >"$dir/hosts"
  echo "dtcb$id" >"$dir/bridge"
  # A failed `up` leaves nothing behind.
  trap 'do_down "$dir"' EXIT
  trap 'exit 1' INT TERM

  local subnet="" a b
  for ((tries = 0; tries < 200; tries++)); do
    a=$((200 + (0x$id + tries * 7) % 50))
    b=$(((0x$id / 50 + tries * 13) % 256))
    if ! subnet_in_use "10.$a.$b"; then subnet="10.$a.$b"; break; fi
  done
  [ -n "$subnet" ] || die "up: no free 10.x.y.0/24 subnet"
  echo "$subnet" >"$dir/subnet"
  echo "$id" >"$dir/id"

  local bridge="dtcb$id"
  ip link add "$bridge" type bridge
  ip addr add "$subnet.254/24" dev "$bridge"
  ip link set "$bridge" up

  local i name ns veth peer
  for ((i = 1; i <= n; i++)); do
    name="h$i"
    ns="dtc$id-$name"
    veth="dtc${id}v$i"
    peer="dtc${id}p$i"
    echo "$name $ns $veth $subnet.$i" >>"$dir/hosts"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "$peer"
    ip link set "$peer" netns "$ns"
    ip -n "$ns" link set "$peer" name eth0
    ip -n "$ns" addr add "$subnet.$i/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip link set "$veth" master "$bridge"
    ip link set "$veth" up
    # The holder: makes its UTS and mount namespaces, enters the network
    # namespace, names the host, mounts its own /dev/shm, then sleeps. (Not
    # `ip netns exec`: it mounts a /sys of its own, which hides the cgroup
    # file systems that slurmd needs.)
    setsid unshare --uts --mount --propagation private nsenter --net="/run/netns/$ns" \
      sh -c 'hostname "$1" && echo $$ >"$2.tmp" && mv "$2.tmp" "$2" &&
             mount -t tmpfs -o mode=1777 tmpfs /dev/shm && mount -t tmpfs -o mode=1777 tmpfs /tmp &&
             touch "$2.ready" && exec sleep infinity' holder "$name" "$dir/$name.pid" \
      </dev/null >/dev/null 2>"$dir/$name.holder.log" &
  done
  local waited=0
  for ((i = 1; i <= n; i++)); do
    while [ ! -e "$dir/h$i.pid.ready" ]; do
      sleep 0.05
      waited=$((waited + 1))
      [ $waited -lt 400 ] || die "up: host h$i did not start: $(cat "$dir/h$i.holder.log" 2>/dev/null)"
    done
  done
  trap - EXIT INT TERM
  echo "$dir"
}

# --- the other commands -------------------------------------------------------
do_exec() {
  local dir=$1 host=$2
  shift 2
  local pid
  pid=$(holder_pid "$dir" "$host")
  exec nsenter --target "$pid" --net --uts --mount --wd="$PWD" -- "$@"
}

do_kill() {
  local dir=$1 host=$2 line ns pid
  line=$(host_line "$dir" "$host")
  ns=$(echo "$line" | awk '{print $2}')
  pid=$(holder_pid "$dir" "$host")
  local pids
  pids=$(host_pids "$ns" "$pid")
  # shellcheck disable=SC2086
  kill_all $pids
  echo "$prog: killed $(echo $pids | wc -w) processes on $host" >&2
}

do_link() {  # DIR HOST up|down
  local line veth
  line=$(host_line "$1" "$2")
  veth=$(echo "$line" | awk '{print $3}')
  ip link set "$veth" "$3"
  if [ "$3" = down ]; then touch "$1/$2.cut"; else rm -f "$1/$2.cut"; fi
}

mpirun_args() {
  local dir=$1 subnet
  subnet=$(cat "$dir/subnet")
  printf '%s\n' --mca plm_rsh_agent "$here/cluster-rsh" --mca plm_rsh_no_tree_spawn 1 \
    --mca btl tcp,self --mca btl_tcp_if_include "$subnet.0/24" \
    --mca oob_tcp_if_include "$subnet.0/24"
}

cmd=${1:-}
[ -n "$cmd" ] || die "usage: $prog check|up N|down|exec HOST CMD|kill HOST|cut HOST|heal HOST|hosts|subnet|mpirun-args|gc"
shift
case $cmd in
  check)
    reason=$(why_not)
    if [ -n "$reason" ]; then
      echo "$reason"
      exit 1
    fi
    ;;
  up)
    [ $# -ge 1 ] || die "usage: $prog up N [--owner PID]"
    n=$1
    shift
    owner=$PPID
    while [ $# -gt 0 ]; do
      case $1 in
        --owner) owner=${2:?--owner needs a PID}; shift 2 ;;
        *) die "up: unknown option '$1'" ;;
      esac
    done
    do_up "$n" "$owner"
    ;;
  down)
    if [ $# -ge 1 ]; then d=$1; else d=$(cluster_dir); fi
    case $d in /run/dtrain-cluster.*) ;; *) die "down: $d is not a cluster directory" ;; esac
    do_down "$d"
    ;;
  gc) do_gc ;;
  exec)
    [ $# -ge 2 ] || die "usage: $prog exec HOST CMD [ARG...]"
    do_exec "$(cluster_dir)" "$@"
    ;;
  kill)
    [ $# -eq 1 ] || die "usage: $prog kill HOST"
    do_kill "$(cluster_dir)" "$1"
    ;;
  cut)
    [ $# -eq 1 ] || die "usage: $prog cut HOST"
    do_link "$(cluster_dir)" "$1" down
    ;;
  heal)
    [ $# -eq 1 ] || die "usage: $prog heal HOST"
    do_link "$(cluster_dir)" "$1" up
    ;;
  hosts) awk '{print $1}' "$(cluster_dir)/hosts" ;;
  subnet) echo "$(cat "$(cluster_dir)/subnet").0/24" ;;
  mpirun-args) mpirun_args "$(cluster_dir)" ;;
  *) die "unknown command '$cmd'" ;;
esac
