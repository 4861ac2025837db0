#!/usr/bin/env bash
# Bring a real Slurm (Debian's slurm-wlm 22.05) up on this one machine, for tests and demos,
# and tear it down again. No systemd needed: munged, slurmctld and slurmd are started here.
#
#   launch/slurm/local_slurm.sh up      # install if missing, start daemons, wait for idle nodes
#   launch/slurm/local_slurm.sh env     # print `export SLURM_CONF=...` for the client commands
#   launch/slurm/local_slurm.sh status  # sinfo
#   launch/slurm/local_slurm.sh down    # scontrol shutdown, stop what `up` started (by pid)
#
# Everything lives under $LOCAL_SLURM_DIR (config, state, spool, logs, pid files); /etc/slurm
# is not touched: clients and daemons find the config through SLURM_CONF / -f.
# LOCAL_SLURM_NODES=2 emulates two nodes on this host: two slurmd processes (slurmd -N) on
# different ports, named jsmnode1/jsmnode2 with NodeAddr=127.0.0.1. Debian's build lacks
# --enable-multiple-slurmd, so each node needs its own NodeHostname (and "localhost" cannot be
# a node name: Slurm replaces it with the real hostname). These names do not resolve in DNS;
# jsm_dist.launching.cli then takes the rendezvous address from the node's NodeAddr.
# Needs root (daemons run as SlurmUser=root; munged runs as the munge user).
set -euo pipefail

LOCAL_SLURM_DIR="${LOCAL_SLURM_DIR:-/tmp/jsm_local_slurm}"
LOCAL_SLURM_NODES="${LOCAL_SLURM_NODES:-1}"          # 1 or 2 emulated nodes
LOCAL_SLURM_CPUS="${LOCAL_SLURM_CPUS:-2}"            # CPUs per node (<= cores of this host)
LOCAL_SLURM_MEM_MB="${LOCAL_SLURM_MEM_MB:-1024}"     # RealMemory per node (below free RAM, else DRAIN)
LOCAL_SLURM_CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-6817}"
LOCAL_SLURM_SLURMD_PORT="${LOCAL_SLURM_SLURMD_PORT:-6818}"  # node i listens on port + i
LOCAL_SLURM_INSTALL="${LOCAL_SLURM_INSTALL:-1}"      # 1: apt-get install slurm-wlm if missing
LOCAL_SLURM_TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"     # seconds to wait for the nodes to be idle

CONF="$LOCAL_SLURM_DIR/slurm.conf"
log() { echo "[local_slurm] $*" >&2; }

node_names() {
  local host
  host="$(hostname -s)"
  if [ "$LOCAL_SLURM_NODES" = "1" ]; then
    echo "$host"
  elif [ "$LOCAL_SLURM_NODES" = "2" ]; then
    echo "jsmnode1 jsmnode2"
  else
    log "LOCAL_SLURM_NODES must be 1 or 2, got '$LOCAL_SLURM_NODES'"
    return 1
  fi
}

install_slurm() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && [ -x /usr/sbin/munged ]; then
    return 0
  fi
  if [ "$LOCAL_SLURM_INSTALL" != "1" ]; then
    log "slurm-wlm is not installed and LOCAL_SLURM_INSTALL=$LOCAL_SLURM_INSTALL"
    return 2
  fi
  command -v apt-get >/dev/null || { log "slurm-wlm missing and apt-get unavailable"; return 2; }
  log "installing slurm-wlm with apt-get"
  timeout 300 apt-get update -qq >/dev/null || { log "apt-get update failed"; return 2; }
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
    slurm-wlm >/dev/null || { log "apt-get install slurm-wlm failed"; return 2; }
}

write_conf() {
  local names="$1" i=0 n
  mkdir -p "$LOCAL_SLURM_DIR"/{state,log,run}
  {
    echo "ClusterName=jsmlocal"
    echo "SlurmctldHost=$(hostname -s)(127.0.0.1)"
    echo "SlurmctldPort=$LOCAL_SLURM_CTLD_PORT"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=30"
    echo "InactiveLimit=0"
    echo "KillWait=5"
    echo "StateSaveLocation=$LOCAL_SLURM_DIR/state"
    echo "SlurmdSpoolDir=$LOCAL_SLURM_DIR/spool-%n"
    echo "SlurmctldPidFile=$LOCAL_SLURM_DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$LOCAL_SLURM_DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$LOCAL_SLURM_DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$LOCAL_SLURM_DIR/log/slurmd-%n.log"
    for n in $names; do
      echo "NodeName=$n NodeAddr=127.0.0.1 NodeHostname=$n Port=$((LOCAL_SLURM_SLURMD_PORT + i)) CPUs=$LOCAL_SLURM_CPUS RealMemory=$LOCAL_SLURM_MEM_MB State=UNKNOWN"
      i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >"$CONF"
  echo "$names" >"$LOCAL_SLURM_DIR/nodes"
}

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && timeout 5 munge -n </dev/null >/dev/null 2>&1; then
    log "munged already running (not started here; left alone on 'down')"
    return 0
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || timeout 30 runuser -u munge -- mungekey --create >/dev/null 2>&1 \
    || timeout 30 /usr/sbin/create-munge-key >/dev/null 2>&1 || true
  timeout 15 runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$LOCAL_SLURM_DIR/run/munged.started"
}

cmd_up() {
  install_slurm
  local names n
  names="$(node_names)"
  if [ -f "$LOCAL_SLURM_DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$LOCAL_SLURM_DIR/run/slurmctld.pid")" 2>/dev/null; then
    log "slurmctld already running from $LOCAL_SLURM_DIR; run 'down' first"
    return 1
  fi
  # only ever wipe a directory this script made (it holds slurm.conf) or an empty one
  if [ -d "$LOCAL_SLURM_DIR" ] && [ -n "$(ls -A "$LOCAL_SLURM_DIR")" ] && [ ! -f "$CONF" ]; then
    log "$LOCAL_SLURM_DIR is not empty and not a local_slurm directory; refusing to reuse it"
    return 1
  fi
  rm -rf "$LOCAL_SLURM_DIR"
  mkdir -p "$LOCAL_SLURM_DIR"
  write_conf "$names"
  start_munge
  export SLURM_CONF="$CONF"
  # -c: cold start, ignore any saved state (jobs from a previous run)
  timeout 30 slurmctld -c -f "$CONF"
  for n in $names; do
    timeout 30 slurmd -f "$CONF" -N "$n"
  done
  local deadline=$((SECONDS + LOCAL_SLURM_TIMEOUT)) want idle
  want=$(wc -w <<<"$names")
  while :; do
    idle=$(timeout 10 sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
    [ "$idle" -ge "$want" ] && break
    if [ $SECONDS -ge $deadline ]; then
      log "nodes not idle after ${LOCAL_SLURM_TIMEOUT}s; sinfo:"
      timeout 10 sinfo -N -l >&2 || true
      tail -n 20 "$LOCAL_SLURM_DIR"/log/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "up: $want node(s) idle: $names (SLURM_CONF=$CONF)"
}

stop_pidfile() {  # stop the process named in a pid file: TERM, wait, KILL
  local f="$1" pid i
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_down() {
  [ -d "$LOCAL_SLURM_DIR" ] || { log "nothing to stop ($LOCAL_SLURM_DIR absent)"; return 0; }
  export SLURM_CONF="$CONF"
  if [ -f "$CONF" ]; then
    timeout 10 scancel --quiet --user=root >/dev/null 2>&1 || true
    local i
    for i in $(seq 1 20); do  # let slurmd kill the jobs' processes before it goes away
      [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  fi
  local f
  for f in "$LOCAL_SLURM_DIR"/run/slurmd-*.pid "$LOCAL_SLURM_DIR"/run/slurmctld.pid; do
    stop_pidfile "$f"
  done
  stop_pidfile "$LOCAL_SLURM_DIR/run/munged.started"
  log "down"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status) SLURM_CONF="$CONF" timeout 10 sinfo -N -l ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 64 ;;
esac
