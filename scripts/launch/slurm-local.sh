#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for CI and for trying
# dtrain.sbatch without a real cluster.
#
# Usage: slurm-local.sh start|stop|status|env
#   start   start munged (if no munge daemon answers), slurmctld and slurmd,
#           wait until the node is idle; does nothing if already running.
#           If a daemon fails to start, it prints that daemon's last log
#           lines and stops the daemons this start had started (exit 1).
#   stop    stop the slurmd/slurmctld started from this directory (and munged
#           if this script started it)
#   status  exit 0 if the cluster answers and the node is usable, 1 otherwise
#   env     print `export SLURM_CONF=...` for eval in a shell
#
# Everything (slurm.conf, state, spool, logs, pid files) lives in
# $DTRAIN_SLURM_DIR (default /tmp/dtrain-slurm); nothing under /etc/slurm is
# written. Commands (sbatch, srun, squeue, scancel) need SLURM_CONF pointing at
# $DTRAIN_SLURM_DIR/slurm.conf, see `env`.
#
# Designed for a container without systemd and without cgroups, run as root:
# proctrack/linuxproc, task/none, no accounting. The node has
# max(nproc, $DTRAIN_SLURM_CPUS or 4) CPUs (SlurmdParameters=config_overrides),
# so 4-task jobs fit on a 2-core machine, and the partition is
# OverSubscribe=FORCE so concurrent test jobs share the cores.
#
# Environment: DTRAIN_SLURM_DIR, DTRAIN_SLURM_CPUS (minimum node CPUs, 4),
# DTRAIN_SLURM_PORT (slurmctld port, default 6817; slurmd uses PORT+1).
#
# Several nodes (the namespace hosts of tests/cluster/cluster.sh, say):
#   DTRAIN_SLURM_NODES="h1=10.0.0.1 h2=10.0.0.2"   node names and addresses
#   DTRAIN_SLURM_CONTROL_ADDR=10.0.0.254           where the nodes reach slurmctld
#   DTRAIN_SLURM_NODE_EXEC="tests/cluster/cluster.sh exec"
#                                    runs slurmd on node NAME as `$EXEC NAME slurmd ...`
# Then each node's slurmd has its own pid file, log and spool directory
# (slurmd-NAME.pid, slurmd-NAME.log, spool/NAME), and a node killed with its
# slurmd is noticed by slurmctld after SlurmdTimeout (10 s here).
set -euo pipefail

dir=${DTRAIN_SLURM_DIR:-/tmp/dtrain-slurm}
port=${DTRAIN_SLURM_PORT:-6817}
conf=$dir/slurm.conf
control_addr=${DTRAIN_SLURM_CONTROL_ADDR:-127.0.0.1}
node_exec=${DTRAIN_SLURM_NODE_EXEC:-}
if [ -n "${DTRAIN_SLURM_NODES:-}" ]; then
  read -r -a nodes <<< "$DTRAIN_SLURM_NODES"
  multi=1
else
  nodes=("$(hostname -s)=127.0.0.1")
  multi=0
fi
export SLURM_CONF=$conf
PATH=$PATH:/usr/sbin:/sbin

log() { echo "[slurm-local] $*" >&2; }
die() { log "error: $*"; exit 1; }

# The last lines of a daemon's log, so that the reason of a failure is in
# the output (of a test, for instance).
show_log() {
  local file=$1
  if [ -s "$file" ]; then
    log "last lines of $file:"
    tail -n 20 "$file" | sed 's/^/    /' >&2
  else
    log "$file is empty or missing"
  fi
}

# Daemons this `start` started, in order; stopped again if the start fails.
started=()

need_commands() {
  local c missing=()
  for c in munged slurmctld slurmd sinfo scontrol; do
    command -v "$c" > /dev/null 2>&1 || missing+=("$c")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "not installed: ${missing[*]} (install the Debian packages slurmctld slurmd slurm-client munge, e.g. by running scripts/setup.sh)"
  fi
}

node_names() { local n; for n in "${nodes[@]}"; do echo "${n%%=*}"; done; }
# One node: slurmd.pid, slurmd.log; several: slurmd-NAME.pid, slurmd-NAME.log.
slurmd_file() { if [ "$multi" = 1 ]; then echo "$dir/slurmd-$1.$2"; else echo "$dir/slurmd.$2"; fi; }

pid_alive() {
  local pid
  pid=$(cat "$1" 2> /dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null
}

munge_ok() { munge -n 2> /dev/null | unmunge > /dev/null 2>&1; }

start_munge() {
  if munge_ok; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey > /dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  local user=root
  id munge > /dev/null 2>&1 && user=munge
  chown "$user": /etc/munge /etc/munge/munge.key
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown "$user": /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  log "starting munged"
  local rc=0
  if [ "$user" = munge ] && command -v runuser > /dev/null 2>&1; then
    runuser -u munge -- munged --force || rc=$?
  else
    munged --force || rc=$?
  fi
  [ "$rc" -eq 0 ] && for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  # Remembered so that `stop` (or a failed start) ends only a munged started
  # here: the pid file's process, if it is a munged.
  local pid
  pid=$(cat /run/munge/munged.pid 2> /dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2> /dev/null)" = munged ]; then
    echo "$pid" > "$dir/munged.pid"
    started+=(munged)
  fi
  if [ "$rc" -ne 0 ] || ! munge_ok; then
    show_log /var/log/munge/munged.log
    die "munged $([ "$rc" -ne 0 ] && echo "exited with status $rc" || echo "does not answer")"
  fi
}

write_conf() {
  local host cpus min
  host=$(hostname -s)
  cpus=$(nproc)
  min=${DTRAIN_SLURM_CPUS:-4}
  [ "$cpus" -lt "$min" ] && cpus=$min
  mkdir -p "$dir/state" "$dir/spool"
  local slurmd_files="slurmd" spool="$dir/spool" timeout=60 node_lines="" n
  if [ "$multi" = 1 ]; then
    slurmd_files="slurmd-%n"
    spool="$dir/spool/%n"
    timeout=10
  fi
  for n in "${nodes[@]}"; do
    [ "$multi" = 1 ] && mkdir -p "$dir/spool/${n%%=*}"
    node_lines+="NodeName=${n%%=*} NodeAddr=${n#*=} CPUs=$cpus RealMemory=1000 State=UNKNOWN"$'\n'
  done
  cat > "$conf.new" << EOF
# Slurm of ${#nodes[@]} node(s) written by scripts/launch/slurm-local.sh
ClusterName=dtrain-local
SlurmctldHost=$host($control_addr)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/$slurmd_files.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/$slurmd_files.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=$timeout
${node_lines}PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
  mv "$conf.new" "$conf"
}

# The state of every node, one word each ("idle idle down*").
node_states() { sinfo -h -N -o %T 2> /dev/null | tr '\n' ' '; }
# The worst of them: the first that is not usable, else the first.
node_state() {
  local s first=""
  for s in $(node_states); do
    [ -z "$first" ] && first=$s
    case $s in idle*|mixed*|allocated*|completing*) ;; *) echo "$s"; return ;; esac
  done
  echo "$first"
}

slurmds_alive() {
  local n
  for n in $(node_names); do pid_alive "$(slurmd_file "$n" pid)" || return 1; done
}

is_up() {
  pid_alive "$dir/slurmctld.pid" && slurmds_alive || return 1
  scontrol ping 2> /dev/null | grep -q UP || return 1
  case "$(node_state)" in idle*|mixed*|allocated*|completing*) return 0 ;; esac
  return 1
}

# On a failed start (any exit before it finished): stop, newest first, the
# daemons this start started, so that nothing is left running half set up.
undo_start() {
  local i
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do
    stop_pidfile "$dir/${started[i]}.pid" "${started[i]}"
  done
}

start() {
  need_commands
  mkdir -p "$dir"
  if is_up; then log "already running (SLURM_CONF=$conf)"; return 0; fi
  trap undo_start EXIT
  start_munge
  local rc=0
  if ! pid_alive "$dir/slurmctld.pid"; then
    write_conf
    log "starting slurmctld (log $dir/slurmctld.log)"
    # -i: ignore state files from an earlier run whose config differs.
    slurmctld -i -f "$conf" || rc=$?
    started+=(slurmctld)
    if [ "$rc" -ne 0 ]; then
      show_log "$dir/slurmctld.log"
      die "slurmctld exited with status $rc"
    fi
  fi
  for _ in $(seq 100); do scontrol ping 2> /dev/null | grep -q UP && break; sleep 0.1; done
  if ! scontrol ping 2> /dev/null | grep -q UP; then
    show_log "$dir/slurmctld.log"
    die "slurmctld does not answer"
  fi
  local n
  for n in $(node_names); do
    if ! pid_alive "$(slurmd_file "$n" pid)"; then
      log "starting slurmd of $n (log $(slurmd_file "$n" log))"
      # shellcheck disable=SC2086
      $node_exec ${node_exec:+"$n"} slurmd -f "$conf" -N "$n" || rc=$?
      started+=("$(basename "$(slurmd_file "$n" pid)" .pid)")
      if [ "$rc" -ne 0 ]; then
        show_log "$(slurmd_file "$n" log)"
        die "slurmd of $n exited with status $rc"
      fi
    fi
  done
  local i
  for ((i = 0; i < 150; i++)); do
    case "$(node_state)" in idle*|mixed*|allocated*) break ;; esac
    # A slurmd that died after going to the background: no need to wait.
    if [ "$i" -ge 10 ] && ! slurmds_alive; then break; fi
    sleep 0.2
  done
  for n in $(node_names); do
    if ! pid_alive "$(slurmd_file "$n" pid)"; then
      show_log "$(slurmd_file "$n" log)"
      die "slurmd of $n is not running"
    fi
  done
  case "$(node_state)" in
    idle*|mixed*|allocated*) ;;
    down*|drain*)
      for n in $(node_names); do
        scontrol update NodeName="$n" State=RESUME 2> /dev/null || true
      done
      sleep 1 ;;
  esac
  if ! is_up; then
    for n in $(node_names); do show_log "$(slurmd_file "$n" log)"; done
    die "nodes not usable: states '$(node_states)' (see also $dir/slurmctld.log)"
  fi
  trap - EXIT
  log "running: $(sinfo -h -o '%P %D %c %T' | head -n1) (SLURM_CONF=$conf)"
}

stop_pidfile() {
  local f=$1 name=$2
  if pid_alive "$f"; then
    log "stopping $name"
    local pid
    pid=$(cat "$f" 2> /dev/null || true)
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 100); do pid_alive "$f" || break; sleep 0.1; done
    if pid_alive "$f"; then kill -KILL "$pid" 2> /dev/null || true; fi
  fi
  rm -f "$f"
}

stop() {
  local n
  for n in $(node_names); do stop_pidfile "$(slurmd_file "$n" pid)" "slurmd of $n"; done
  stop_pidfile "$dir/slurmctld.pid" slurmctld
  stop_pidfile "$dir/munged.pid" munged
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    if is_up; then
      log "running: $(sinfo -h -o '%P %D %c %T' | head -n1) (SLURM_CONF=$conf)"
    else
      log "not running"; exit 1
    fi ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
