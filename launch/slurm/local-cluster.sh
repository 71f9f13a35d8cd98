#!/bin/bash
# A Slurm cluster on this machine, for testing the batch scripts for real.
#
#   launch/slurm/local-cluster.sh install            # apt-get the Debian packages (root)
#   launch/slurm/local-cluster.sh start [--nodes N]  # munge key, slurm.conf, munged, slurmctld, slurmds
#   launch/slurm/local-cluster.sh stop               # every slurmd (the nodes' too) and slurmctld
#
# Needs root. This host, with all its CPUs, is the one node of partition "debug" (the
# default). With --nodes N the simulated nodes node1..nodeN of launch/nodes.sh (network
# namespaces on a bridge, each its own hostname and address) form a second partition,
# "nodes", one slurmd on each: `sbatch -p nodes -N 2 -n 4 ...` spreads a job over them.
# start uses node1..nodeN as they are when they exist (their CPUs: nodes.sh's hostfile)
# and brings them up otherwise (launch/nodes.sh up N, 2 CPUs each); nodes.sh down
# removes them, slurmds and all. start is idempotent: it starts only what is not
# running. When the configuration changes (another --nodes, or none: back to this host
# alone), it restarts the daemons with it; slurmctld keeps its jobs across that restart.
# A state directory another cluster wrote (slurmctld will not start on it) stops start
# with one line before it touches a daemon.
set -euo pipefail

CLUSTER=distnn-test
CONF_DIR=/etc/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd   # one directory per node below it, as %n
LOGS=/var/log/slurm
NODES_SH=$(cd "$(dirname "$0")/.." && pwd)/nodes.sh
NODES_STATE=${DISTNN_NODES_STATE:-/run/distnn-nodes}
NET=10.77.77              # launch/nodes.sh: this host is $NET.1, node i is $NET.(10+i)

die() { echo "local-cluster.sh: $*" >&2; exit 2; }

install_packages() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # libpmix-dev holds the unversioned libpmix.so that srun --mpi=pmix loads (Open MPI's ranks)
    apt-get install -y -qq slurmctld slurmd slurm-client munge libpmix2 libpmix-dev
}

node_cpus() {  # node_cpus I: node i's slots in nodes.sh's hostfile (2 if it does not say)
    local cpus
    cpus=$(awk -F: -v node="node$1" '$1 == node {print $2}' "$NODES_STATE/hostfile" 2>/dev/null)
    echo "${cpus:-2}"
}

config() {  # config N: slurm.conf for this host plus N simulated nodes
    local n=$1 host cpus mem i
    host=$(hostname -s)
    cpus=$(nproc --all)  # every CPU: plain nproc honours OMP_NUM_THREADS (1 in many shells)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    # SlurmctldHost by name: this host's clients resolve it as always, the nodes through
    # nodes.sh's hosts file (the bridge's address). %n: each slurmd its own spool, pid and
    # log file. config_overrides: a node may claim CPUs it shares with the others.
    # cred_expire and a scheduling pass every second: a requeued job starts again 11 s after
    # its requeue instead of at the next half-minute's pass (40 s).
    cat <<CONF
ClusterName=${CLUSTER}
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=${STATE}
SlurmdSpoolDir=${SPOOL}/%n
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd-%n.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=3600
KillWait=10
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    [ "$n" -gt 0 ] || return 0
    for ((i = 1; i <= n; i++)); do
        echo "NodeName=node$i NodeAddr=$NET.$((10 + i)) NodeHostname=node$i CPUs=$(node_cpus "$i")" \
             "RealMemory=$((mem / n)) State=UNKNOWN"
    done
    echo "PartitionName=nodes Nodes=node[1-$n] MaxTime=INFINITE State=UP OverSubscribe=NO"
}

nodes_ready() {  # nodes_ready N: node1..nodeN exist (namespaces, hostnames, hosts file)
    local i
    [ -s "$NODES_STATE/hosts" ] || return 1
    for ((i = 1; i <= $1; i++)); do
        ip netns list | grep -qw "distnn-node$i" && mountpoint -q "$NODES_STATE/node$i.uts" &&
            grep -qw "node$i" "$NODES_STATE/hosts" || return 1
    done
}

node_slurmd() {  # node_slurmd I: the PID of the slurmd running on node i, if any
    local pid
    for pid in $(ip netns pids "distnn-node$1" 2>/dev/null); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ] && { echo "$pid"; return 0; }
    done
    return 1
}

host_slurmd() {  # the PID of the slurmd in this host's own network namespace, if any
    pgrep -x slurmd --ns $$ --nslist net
}

check_state() {  # slurmctld will not start on a state directory another cluster wrote
    local file=$STATE/clustername name
    [ -e "$file" ] && ! printf %s "$CLUSTER" | cmp -s - "$file" || return 0
    name=$(head -c 64 "$file" 2>/dev/null | tr -d '\0'; echo .)  # its bytes, newlines too
    die "$STATE holds the state of another Slurm cluster, $(printf %q "${name%.}") (this one" \
        "is $CLUSTER), which slurmctld will not take over; move it aside" \
        "(mv $STATE $STATE.old) and run start again"
}

registered() {  # registered T NODE...: each NODE's slurmd, started at T (epoch s) or later, registered
    local t=$1 node since
    shift
    for node in "$@"; do
        since=$(scontrol show node "$node" -o 2>/dev/null | tr ' ' '\n' |
                sed -n 's/^SlurmdStartTime=//p')
        [ -n "$since" ] && [ "$since" != None ] && [ "$(date -d "$since" +%s)" -ge "$t" ] || return 1
    done
}

start() {
    local n=0 host
    host=$(hostname -s)
    while [ $# -gt 0 ]; do
        case $1 in
            --nodes) n=${2:-}; shift 2 || shift ;;
            *) die "unknown option $1 (usage: $0 start [--nodes N])" ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -le 99 ] || die "--nodes needs a node count from 0 to 99, got '$n'"
    [ "$(id -u)" = 0 ] || die "needs root; run it as root"
    command -v slurmctld >/dev/null || { echo "slurmctld not installed; run: $0 install" >&2; exit 1; }
    check_state
    if [ "$n" -gt 0 ]; then
        nodes_ready "$n" || bash "$NODES_SH" up "$n" >/dev/null
        [ "$(bash "$NODES_SH" exec node1 getent hosts "$host" | awk '{print $1}')" = "$NET.1" ] ||
            die "node1 does not resolve this host's name $host to $NET.1 (see $NODES_STATE/hosts)"
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- munged

    local conf fresh=-c i
    conf=$(config "$n")
    if [ "$conf" != "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" ]; then
        if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
            echo "local-cluster.sh: the configuration changed: restarting the Slurm daemons"
            stop
            fresh=  # a restart for the new nodes: keep the controller's jobs
        fi
        mkdir -p "$CONF_DIR"
        printf '%s\n' "$conf" > "$CONF_DIR/slurm.conf"
    fi
    local started=() t0
    mkdir -p "$STATE" "$LOGS" "$SPOOL/$host"
    t0=$(date +%s)
    # -c: start from a clean controller state (no jobs left over from earlier runs)
    pgrep -x slurmctld >/dev/null || slurmctld $fresh
    host_slurmd >/dev/null || { slurmd; started+=("$host"); }
    for ((i = 1; i <= n; i++)); do
        mkdir -p "$SPOOL/node$i"
        # nsenter into the node's network and UTS namespaces, its hosts file bound over
        # /etc/hosts (not `ip netns exec`: its fresh /sys lacks the cgroup mounts slurmd wants)
        node_slurmd "$i" >/dev/null ||
            { bash "$NODES_SH" exec "node$i" slurmd -N "node$i"; started+=("node$i"); }
    done

    local expected usable
    expected=$( (echo "$host"; for ((i = 1; i <= n; i++)); do echo "node$i"; done) | sort)
    for _ in $(seq 150); do
        # every node responding (no *) and usable, the slurmds started here registered
        usable=$(sinfo -h -N -o '%N %T' 2>/dev/null |
                 awk '$2 ~ /^(idle|mixed|allocated|completing)$/ {print $1}' | sort -u) || usable=
        if [ "$usable" = "$expected" ]; then
            registered "$t0" "${started[@]}" && { sinfo; return 0; }
        fi
        sleep 0.2
    done
    echo "Slurm did not come up within 30 s; see ${LOGS}" >&2
    sinfo -N >&2 || true
    exit 1
}

stop() {
    # every slurmd: this host's and the simulated nodes' (same PID namespace)
    pkill -x slurmd || true
    pkill -x slurmctld || true
    for _ in $(seq 100); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0
        sleep 0.2
    done
    echo "Slurm daemons still running after 20 s" >&2
    exit 1
}

case "${1:-}" in
    install) install_packages ;;
    start) shift; start "$@" ;;
    stop) stop ;;
    *) echo "usage: $0 install | start [--nodes N] | stop" >&2; exit 2 ;;
esac
