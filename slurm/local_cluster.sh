#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for the `slurm`-marked tests (and for trying slurm/submit.py).
#
#   slurm/local_cluster.sh start    install munge + slurm if missing, write /etc/slurm/slurm.conf, start
#                                   munged, slurmctld and slurmd, wait until the node is idle
#   slurm/local_cluster.sh stop     cancel every job, wait for them to end, stop the daemons this script started
#   slurm/local_cluster.sh status   print daemons, node state and queue; exit 0 only if the cluster is usable
#
# Needs root (Debian/Ubuntu, apt). Runs slurmctld/slurmd as root without cgroups, on 127.0.0.1 only by name
# (node "localhost"), so nothing depends on the machine's hostname resolving. Two partitions share the node:
# `debug` (default) and `high`, whose jobs preempt (requeue) `debug` jobs.
# Environment knobs:
#   SLURM_LOCAL_DIR         state, spool, logs and pid files (default /var/lib/slurm-local)
#   SLURM_LOCAL_CPUS        CPUs to advertise (default: what `slurmd -C` detects)
#   SLURM_LOCAL_MEM_MB      RealMemory to advertise (default: what `slurmd -C` detects)
#   SLURM_LOCAL_KEEP_STATE  1 = keep jobs/ids from the previous run (default: fresh state, job ids restart at 1)
# Written from the recipe in shared/slurm-local.md (verified with Debian 12's slurm 22.05 and munge 0.5).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by pvt-detr slurm/local_cluster.sh"
PACKAGES=(munge slurmctld slurmd slurm-client)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- helpers

# pid_alive PIDFILE NAME: the pid in PIDFILE is a live process called NAME (guards against reused pids).
pid_alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$2" ]]
}

# wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds or SECONDS pass.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n 1; }
node_idle() { [[ $(node_state) == idle ]]; }
no_jobs() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }

# ---------------------------------------------------------------- start

install_packages() {
  local missing=() p added_policy=0
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  # The packages' postinst would start the services; a policy-rc.d that says 101 (denied) prevents it.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
  fi
  apt-cache show slurmd >/dev/null 2>&1 || apt-get update -qq
  local install=(apt-get install -y -qq --no-install-recommends "${missing[@]}")
  if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null; then
    log "install failed; refreshing the package lists once and retrying"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null || {
      ((added_policy)) && rm -f /usr/sbin/policy-rc.d
      die "apt-get install ${missing[*]} failed"
    }
  fi
  ((added_policy)) && rm -f /usr/sbin/policy-rc.d
  return 0
}

start_munge() {
  if munge_ok; then
    # A munged we did not start (e.g. the system's): use it, and leave it alone on stop.
    pid_alive "$DIR/run/munged.pid" munged || log "reusing the munged already running"
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    runuser -u munge -- mungekey --create
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid --origin=127.0.0.1
  wait_for 10 munge_ok || die "munged did not answer (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$DIR/run/munged.pid"  # munged deletes its own pid file on exit
}

write_conf() {
  local detected cpus mem sockets cores threads
  detected=$(slurmd -C | head -n 1)
  field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$detected"; }
  cpus=$(field CPUs) mem=$(field RealMemory) sockets=$(field SocketsPerBoard)
  cores=$(field CoresPerSocket) threads=$(field ThreadsPerCore)
  [[ -n $cpus && -n $mem ]] || die "cannot parse 'slurmd -C': $detected"
  if [[ -n ${SLURM_LOCAL_CPUS:-} ]]; then
    cpus=$SLURM_LOCAL_CPUS sockets=1 cores=$SLURM_LOCAL_CPUS threads=1
  fi
  mem=${SLURM_LOCAL_MEM_MB:-$mem}

  mkdir -p /etc/slurm
  if [[ -e $CONF && ! -e $CONF.before-slurm-local ]] && ! grep -qF "$MARKER" "$CONF"; then
    log "saving the existing $CONF as $CONF.before-slurm-local"
    cp -p "$CONF" "$CONF.before-slurm-local"
  fi
  cat >"$CONF" <<EOF
$MARKER ($(date -Is)); 'slurm/local_cluster.sh stop' leaves it in place.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 121 s).
AuthInfo=socket=/run/munge/munge.socket.2,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Reject impossible requests at submission instead of leaving them pending forever.
EnforcePartLimits=ALL
SchedulerParameters=sched_interval=2,bf_interval=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10
EOF
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  if pid_alive "$DIR/run/slurmctld.pid" slurmctld && pid_alive "$DIR/run/slurmd.pid" slurmd && ctld_up; then
    log "already running"
    wait_for 30 node_idle_or_busy || die "node is $(node_state), not usable (see $DIR/log/slurmd.log)"
    status
    return
  fi
  install_packages
  mkdir -p "$DIR"/{run,log}
  if [[ ${SLURM_LOCAL_KEEP_STATE:-0} != 1 ]] && ! pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
    rm -rf "$DIR/state" "$DIR/spool"
  fi
  mkdir -p "$DIR"/{state,spool}
  start_munge
  write_conf
  if ! pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
    slurmctld  # daemonizes and writes its pid file
  fi
  wait_for 20 ctld_up || die "slurmctld did not answer 'scontrol ping' (see $DIR/log/slurmctld.log)"
  if ! pid_alive "$DIR/run/slurmd.pid" slurmd; then
    slurmd -N localhost
  fi
  wait_for 30 node_idle_or_busy || die "node is '$(node_state)', not idle (see $DIR/log/slurmd.log)"
  log "up: partitions $(sinfo -h -o %P | paste -sd ' ')"
}

node_idle_or_busy() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

# ---------------------------------------------------------------- stop

stop_daemon() {  # stop_daemon NAME: SIGTERM the pid recorded for NAME, SIGKILL after 30 s
  local pidfile=$DIR/run/$1.pid pid
  if ! pid_alive "$pidfile" "$1"; then
    rm -f "$pidfile"
    return
  fi
  pid=$(<"$pidfile")
  kill -TERM "$pid"
  if ! wait_for 30 bash -c "! kill -0 $pid"; then
    log "$1 ($pid) ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

stop() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  if command -v scontrol >/dev/null && ctld_up; then
    local jobs
    jobs=$(squeue -h -o %i | sort -u | paste -sd ' ')
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs || true
      # slurmd's SIGTERM leaves running steps alive by design, so the jobs must be gone first.
      wait_for 60 no_jobs || log "jobs still listed after 60 s: $(squeue -h -o '%i %T' | paste -sd ' ')"
    fi
  fi
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
  log "stopped"
}

# ---------------------------------------------------------------- status

status() {
  local name ok=0
  for name in munged slurmctld slurmd; do
    if pid_alive "$DIR/run/$name.pid" "$name"; then
      echo "$name: running (pid $(<"$DIR/run/$name.pid"))"
    elif [[ $name == munged ]] && munge_ok; then
      echo "munged: running (not started by this script)"
    else
      echo "$name: not running"
      ok=3
    fi
  done
  if command -v scontrol >/dev/null && ctld_up; then
    echo "node localhost: $(node_state)"
    sinfo
    squeue
    node_idle_or_busy || ok=3
  else
    echo "slurmctld: not answering"
    ok=3
  fi
  return $ok
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
