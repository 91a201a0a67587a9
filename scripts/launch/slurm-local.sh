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
set -euo pipefail

dir=${DTRAIN_SLURM_DIR:-/tmp/dtrain-slurm}
port=${DTRAIN_SLURM_PORT:-6817}
conf=$dir/slurm.conf
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
  cat > "$conf.new" << EOF
# Single-node Slurm written by scripts/launch/slurm-local.sh
ClusterName=dtrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
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
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
  mv "$conf.new" "$conf"
}

node_state() { sinfo -h -N -o %T 2> /dev/null | head -n1; }

is_up() {
  pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid" || return 1
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
  if ! pid_alive "$dir/slurmd.pid"; then
    log "starting slurmd (log $dir/slurmd.log)"
    slurmd -f "$conf" -N "$(hostname -s)" || rc=$?
    started+=(slurmd)
    if [ "$rc" -ne 0 ]; then
      show_log "$dir/slurmd.log"
      die "slurmd exited with status $rc"
    fi
  fi
  local i
  for ((i = 0; i < 150; i++)); do
    case "$(node_state)" in idle*|mixed*|allocated*) break ;; esac
    # A slurmd that died after going to the background: no need to wait.
    if [ "$i" -ge 10 ] && ! pid_alive "$dir/slurmd.pid"; then break; fi
    sleep 0.2
  done
  if ! pid_alive "$dir/slurmd.pid"; then
    show_log "$dir/slurmd.log"
    die "slurmd is not running"
  fi
  case "$(node_state)" in
    idle*|mixed*|allocated*) ;;
    down*|drain*)
      scontrol update NodeName="$(hostname -s)" State=RESUME 2> /dev/null || true
      sleep 1 ;;
  esac
  if ! is_up; then
    show_log "$dir/slurmd.log"
    die "node not usable: state '$(node_state)' (see also $dir/slurmctld.log)"
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
  stop_pidfile "$dir/slurmd.pid" slurmd
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
