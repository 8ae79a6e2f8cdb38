#!/usr/bin/env bash
# A real SLURM cluster on one Linux host, for the `slurm`-marked tests and for trying slurm/submit.py.
#
#   slurm/local_cluster.sh start [--nodes N]  install munge + slurm if missing, write /etc/slurm/slurm.conf, start
#                                             munged, slurmctld and N slurmd, wait until every node is idle; on a
#                                             running cluster, restart the slurmd of any node that lost it
#   slurm/local_cluster.sh stop               cancel every job, wait for them to end, stop the daemons this script
#                                             started and remove the namespaces, links and files it made
#   slurm/local_cluster.sh status             print daemons, node states and queue; exit 0 only if usable
#   slurm/local_cluster.sh shell NODE [CMD]   run CMD (default: bash) on NODE of a multi-node cluster: in its
#                                             network, hostname and mount namespaces, as its jobs run
#
# Needs root (Debian/Ubuntu, apt). Runs slurmctld/slurmd as root without cgroups. Two partitions share the nodes:
# `debug` (default) and `high`, whose jobs preempt (requeue) `debug` jobs.
#
# --nodes 1 (default): one node called "localhost" at 127.0.0.1, so nothing depends on the host's name resolving.
# --nodes N (2-16): N nodes pvtnode1..N, each a network namespace of its own joined to a bridge, so that the nodes
# talk over a real (virtual) network, each with its own address and hostname:
#   bridge pvtbr0     $NET.1/24 in the root namespace: slurmctld's address (host name pvtctl, set in a UTS
#                     namespace of its own) and the address from which sbatch/srun/squeue reach the cluster
#   node pvtnode<i>   network namespace pvtnode<i>; veth pvtveth<i> (on the bridge) <-> eth0 (in the namespace)
#                     at $NET.(10+i)/24; /etc/netns/pvtnode<i>/hosts (mounted over /etc/hosts for the node's
#                     processes, as `ip netns exec` does) names the controller and every node; slurmd -N pvtnode<i>
#                     runs in a UTS namespace whose hostname is pvtnode<i>. Job steps inherit the namespaces:
#                     socket.gethostname() is the node's name and resolves to its address (what gloo binds to).
#                     Every node advertises the host's CPUs and memory.
# munged's socket is a file under /run/munge, so one munged serves every namespace. Only $NET.0/24 is used.
#
# Environment knobs:
#   SLURM_LOCAL_DIR         state, spool, logs and pid files (default /var/lib/slurm-local)
#   SLURM_LOCAL_CPUS        CPUs to advertise per node (default: what `slurmd -C` detects)
#   SLURM_LOCAL_MEM_MB      RealMemory to advertise per node (default: what `slurmd -C` detects)
#   SLURM_LOCAL_KEEP_STATE  1 = keep jobs/ids from the previous run (default: fresh state, job ids restart at 1)
#   SLURM_LOCAL_NET         first three octets of the /24 of a multi-node cluster (default 10.213.0)
# Written from the recipe in shared/slurm-local.md (verified with Debian 12's slurm 22.05 and munge 0.5).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by pvt-detr slurm/local_cluster.sh"
PACKAGES=(munge slurmctld slurmd slurm-client)
NET=${SLURM_LOCAL_NET:-10.213.0}
BRIDGE=pvtbr0
CTL_NAME=pvtctl
NODE_PREFIX=pvtnode
MAX_NODES=16
LAYOUT=$DIR/run/nodes  # the node names of the running cluster, one per line

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- helpers

# pid_alive PIDFILE NAME: the pid in PIDFILE is a live process called NAME (guards against reused pids; a killed
# daemon stays a zombie until its parent, init, reaps it).
pid_alive() {
  local pid stat
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$2" ]] || return 1
  stat=$(</proc/"$pid"/stat) 2>/dev/null || return 1
  stat=${stat##*) }  # the fields after "pid (comm) ": state first
  [[ ${stat%% *} != Z ]]
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

# The node names of the configured cluster: "localhost", or pvtnode1..N (from the layout file).
nodes() {
  if [[ -s $LAYOUT ]]; then cat "$LAYOUT"; else echo localhost; fi
}
multi_node() { [[ $(nodes) != localhost ]]; }
slurmd_pidfile() {  # slurmd_pidfile NODE
  if [[ $1 == localhost ]]; then echo "$DIR/run/slurmd.pid"; else echo "$DIR/run/slurmd-$1.pid"; fi
}
node_addr() { echo "$NET.$((10 + ${1#"$NODE_PREFIX"}))"; }  # node_addr pvtnode<i>: $NET.(10+i)

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | head -n 1; }  # node_state NODE
all_nodes() {  # all_nodes REGEX: every configured node's state matches REGEX
  local node
  for node in $(nodes); do
    [[ $(node_state "$node") =~ $1 ]] || return 1
  done
}
nodes_idle() { all_nodes '^idle$'; }
nodes_usable() { all_nodes '^(idle|mixed|allocated|completing)$'; }
no_jobs() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }
states() { local n; for n in $(nodes); do printf '%s=%s ' "$n" "$(node_state "$n")"; done; }

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

# The network of a multi-node cluster (see the header). Records in $DIR/run/made-run-netns and made-etc-netns
# whether it created /run/netns (`ip netns add` makes it a mount point) and /etc/netns, so that stop can remove them.
start_network() {
  local i node addr
  local routed
  routed=$(ip -4 route show "$NET.0/24" 2>/dev/null; ip -4 addr show to "$NET.0/24" 2>/dev/null)
  [[ -z $routed ]] || die "$NET.0/24 is already in use on this host; pick another with SLURM_LOCAL_NET"
  [[ -e /run/netns ]] || touch "$DIR/run/made-run-netns"
  [[ -e /etc/netns ]] || touch "$DIR/run/made-etc-netns"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for node in $(nodes); do
    i=${node#"$NODE_PREFIX"}
    addr=$(node_addr "$node")
    ip netns add "$node"
    ip link add "pvtveth$i" type veth peer name eth0 netns "$node"
    ip link set "pvtveth$i" master "$BRIDGE" up
    ip -n "$node" addr add "$addr/24" dev eth0
    ip -n "$node" link set lo up
    ip -n "$node" link set eth0 up
    mkdir -p "/etc/netns/$node"
    {
      echo "127.0.0.1 localhost"
      echo "$NET.1 $CTL_NAME"
      local other
      for other in $(nodes); do echo "$(node_addr "$other") $other"; done
    } >"/etc/netns/$node/hosts"
  done
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
  local hardware="CPUs=$cpus Sockets=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1}"
  hardware+=" RealMemory=$mem State=UNKNOWN"

  mkdir -p /etc/slurm
  if [[ -e $CONF && ! -e $CONF.before-slurm-local ]] && ! grep -qF "$MARKER" "$CONF"; then
    log "saving the existing $CONF as $CONF.before-slurm-local"
    cp -p "$CONF" "$CONF.before-slurm-local"
  fi
  local node_lines nodelist ctl_host slurmd_files
  if multi_node; then
    ctl_host="$CTL_NAME($NET.1)"
    nodelist="$NODE_PREFIX[1-$(nodes | wc -l)]"
    node_lines=$(for node in $(nodes); do echo "NodeName=$node NodeAddr=$(node_addr "$node") $hardware"; done)
    # One slurmd per node on one host: %n (the node name) keeps their pid files, logs and spools apart.
    slurmd_files="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
  else
    ctl_host=localhost
    nodelist=localhost
    node_lines="NodeName=localhost NodeAddr=127.0.0.1 $hardware"
    slurmd_files="SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
  fi
  cat >"$CONF" <<EOF
$MARKER ($(date -Is)); 'slurm/local_cluster.sh stop' leaves a one-node one in place and removes a multi-node one.
ClusterName=localcluster
SlurmctldHost=$ctl_host
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
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$slurmd_files
$node_lines
PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes=$nodelist MaxTime=INFINITE State=UP PriorityTier=10
EOF
}

start_slurmd() {  # start_slurmd NODE
  if pid_alive "$(slurmd_pidfile "$1")" slurmd; then
    return
  fi
  if [[ $1 == localhost ]]; then
    slurmd -N localhost
  else
    mkdir -p "$DIR/spool/$1"
    # The node's network namespace, plus a UTS namespace (its hostname) and a mount namespace in which its hosts
    # file covers /etc/hosts, as `ip netns exec` does (which would also remount /sys without the cgroup tree
    # that slurmd reads). slurmd daemonizes inside them; its job steps inherit them.
    nsenter --net="/run/netns/$1" -- unshare --uts --mount --propagation slave -- \
      sh -c "mount --bind /etc/netns/$1/hosts /etc/hosts && hostname $1 && exec slurmd -N $1" ||
      die "slurmd of $1 did not start (see $DIR/log/slurmd-$1.log)"
  fi
}

start() {
  local want=1
  while (($#)); do
    case $1 in
      --nodes) want=${2:-}; shift 2 || die "--nodes needs a number" ;;
      --nodes=*) want=${1#--nodes=}; shift ;;
      *) die "unknown argument '$1' (usage: start [--nodes N])" ;;
    esac
  done
  [[ $want =~ ^[0-9]+$ ]] && ((want >= 1 && want <= MAX_NODES)) || die "--nodes must be 1-$MAX_NODES, got '$want'"
  [[ $(id -u) == 0 ]] || die "must run as root"
  mkdir -p "$DIR"/{run,log}

  if pid_alive "$DIR/run/slurmctld.pid" slurmctld && ctld_up; then
    local running
    running=$(nodes | wc -l)
    ((running == want)) || die "a $running-node cluster is running; stop it first (slurm/local_cluster.sh stop)"
    log "already running"
    # A node whose slurmd is gone (killed, crashed) comes back: ReturnToService=2 makes it usable again.
    local node
    for node in $(nodes); do
      if ! pid_alive "$(slurmd_pidfile "$node")" slurmd; then
        log "restarting the slurmd of $node"
        start_slurmd "$node"
      fi
    done
    wait_for 30 nodes_usable || die "nodes not usable: $(states)(see $DIR/log/)"
    status
    return
  fi
  # Nothing answers: clear what a crashed or killed run may have left (daemons, namespaces, bridge).
  stop_daemons_and_network >/dev/null 2>&1 || true
  ((want == 1)) || PACKAGES+=(iproute2)  # ip: namespaces, veth pairs, the bridge
  install_packages
  if ((want > 1)); then
    command -v unshare >/dev/null && command -v nsenter >/dev/null ||
      die "--nodes $want needs unshare and nsenter (util-linux)"
    seq -f "$NODE_PREFIX%g" 1 "$want" >"$LAYOUT"
  else
    rm -f "$LAYOUT"
  fi
  if [[ ${SLURM_LOCAL_KEEP_STATE:-0} != 1 ]]; then
    rm -rf "$DIR/state" "$DIR/spool"
  fi
  mkdir -p "$DIR"/{state,spool}
  start_munge
  multi_node && start_network
  write_conf
  if multi_node; then
    # slurmctld checks that its hostname is the SlurmctldHost name; it listens on every address of the root
    # namespace, the bridge's included.
    unshare --uts sh -c "hostname $CTL_NAME && exec slurmctld"  # daemonizes and writes its pid file
  else
    slurmctld
  fi
  wait_for 20 ctld_up || die "slurmctld did not answer 'scontrol ping' (see $DIR/log/slurmctld.log)"
  local node
  for node in $(nodes); do start_slurmd "$node"; done
  wait_for 30 nodes_idle || die "nodes not idle: $(states)(see $DIR/log/)"
  log "up: nodes $(nodes | paste -sd ' '), partitions $(sinfo -h -o %P | paste -sd ' ')"
}

# ---------------------------------------------------------------- stop

# stop_daemons PIDFILE...: SIGTERM at once every live daemon recorded in the pid files (named by the file:
# slurmd-pvtnode1.pid holds a slurmd; each takes about 2 s to exit), wait for all of them, SIGKILL any still there
# after 30 s; remove the pid files.
stop_daemons() {
  local pidfile name pids=()
  for pidfile in "$@"; do
    name=$(basename "$pidfile")
    name=${name%%[-.]*}
    if pid_alive "$pidfile" "$name"; then
      pids+=("$(<"$pidfile")")
    fi
    rm -f "$pidfile"
  done
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  if ! wait_for 30 bash -c "! kill -0 ${pids[*]} 2>/dev/null"; then
    log "daemons ${pids[*]} ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
}

# Every process inside one of our node namespaces (job steps and tasks a vanished slurmd left behind): they were
# all started by this script's slurmd. SIGTERM, then SIGKILL after 10 s.
kill_namespace_processes() {
  local ns pids
  for ns in $(our_namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null | paste -sd ' ')
    [[ -n $pids ]] || continue
    log "stopping what is left in $ns: pids $pids"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    wait_for 10 bash -c "[[ -z \$(ip netns pids $ns) ]]" ||
      kill -KILL $(ip netns pids "$ns") 2>/dev/null || true
  done
}

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NODE_PREFIX[0-9]+$" || true; }

# Removes the bridge, the veth pairs, the namespaces and their /etc/netns files (found by name, so that leftovers
# of a killed run go too), and /run/netns if start created it and nothing else uses it.
stop_network() {
  local link ns
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^pvtveth[0-9]+$'); do
    ip link del "$link" 2>/dev/null || true  # takes the peer inside the namespace with it
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  for ns in $(our_namespaces); do ip netns del "$ns"; done
  rm -rf /etc/netns/"$NODE_PREFIX"[0-9]*
  if [[ -e $DIR/run/made-etc-netns ]]; then
    rmdir /etc/netns 2>/dev/null || true
    rm -f "$DIR/run/made-etc-netns"
  fi
  if [[ -e $DIR/run/made-run-netns ]]; then
    if [[ -d /run/netns && -z $(ls -A /run/netns) ]]; then
      umount /run/netns 2>/dev/null || true
      rmdir /run/netns
    fi
    rm -f "$DIR/run/made-run-netns"
  fi
}

stop_daemons_and_network() {
  # The slurmd and slurmctld together (jobs are gone by now), then what runs on in the nodes, then munged.
  stop_daemons "$DIR"/run/slurmd.pid "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"
  kill_namespace_processes
  stop_daemons "$DIR/run/munged.pid"
  stop_network
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
  local was_multi=0
  multi_node && was_multi=1
  stop_daemons_and_network
  if ((was_multi)) && [[ -e $CONF ]] && grep -qF "$MARKER" "$CONF"; then
    # A multi-node slurm.conf points clients at the bridge's address, which is gone: put back what was there.
    if [[ -e $CONF.before-slurm-local ]]; then mv "$CONF.before-slurm-local" "$CONF"; else rm -f "$CONF"; fi
  fi
  rm -f "$LAYOUT"
  log "stopped"
}

# ---------------------------------------------------------------- status

status() {
  local node ok=0 pidfile where
  if pid_alive "$DIR/run/munged.pid" munged; then
    echo "munged: running (pid $(<"$DIR/run/munged.pid"))"
  elif munge_ok; then
    echo "munged: running (not started by this script)"
  else
    echo "munged: not running"
    ok=3
  fi
  if pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
    where=""
    multi_node && where=", $CTL_NAME $NET.1"
    echo "slurmctld: running (pid $(<"$DIR/run/slurmctld.pid")$where)"
  else
    echo "slurmctld: not running"
    ok=3
  fi
  local label
  for node in $(nodes); do
    pidfile=$(slurmd_pidfile "$node")
    label=slurmd where=""
    [[ $node == localhost ]] || label="slurmd $node" where=", $(node_addr "$node") in network namespace $node"
    if pid_alive "$pidfile" slurmd; then
      echo "$label: running (pid $(<"$pidfile")$where)"
    else
      echo "$label: not running"
      ok=3
    fi
  done
  if command -v scontrol >/dev/null && ctld_up; then
    for node in $(nodes); do echo "node $node: $(node_state "$node")"; done
    sinfo
    squeue
    nodes_usable || ok=3
  else
    echo "slurmctld: not answering"
    ok=3
  fi
  return $ok
}

# ---------------------------------------------------------------- shell

shell() {  # shell NODE [CMD...]: run CMD in the namespaces of NODE's slurmd
  [[ $(id -u) == 0 ]] || die "must run as root"
  local node=${1:-}
  [[ -n $node ]] || die "usage: shell NODE [CMD...]"
  shift
  multi_node || die "shell needs a multi-node cluster (start --nodes N)"
  nodes | grep -qx "$node" || die "no node '$node' (nodes: $(nodes | paste -sd ' '))"
  local pidfile
  pidfile=$(slurmd_pidfile "$node")
  pid_alive "$pidfile" slurmd || die "slurmd of $node is not running"
  (($#)) || set -- bash
  exec nsenter --target "$(<"$pidfile")" --net --uts --mount -- "$@"
}

cmd=${1:-}
(($#)) && shift
case $cmd in
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  shell) shell "$@" ;;
  *) echo "usage: $0 start [--nodes N] | stop | status | shell NODE [CMD...]" >&2; exit 2 ;;
esac
