#!/bin/bash
# A one-node Slurm cluster on this machine, for testing the batch scripts for real.
#
#   launch/slurm/local-cluster.sh install   # apt-get the Debian packages (root)
#   launch/slurm/local-cluster.sh start     # munge key, slurm.conf, munged, slurmctld, slurmd
#   launch/slurm/local-cluster.sh stop
#
# Needs root. The node is this host with all its CPUs in one partition, "debug".
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm

install_packages() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge
}

write_config() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
    cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=distnn-test
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
SlurmdSpoolDir=${SPOOL}
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SchedulerType=sched/backfill
MinJobAge=3600
KillWait=10
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start() {
    if ! command -v slurmctld >/dev/null; then
        echo "slurmctld not installed; run: $0 install" >&2
        exit 1
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- munged
    write_config
    # -c: start from a clean controller state (no jobs left over from earlier runs)
    pgrep -x slurmctld >/dev/null || slurmctld -c
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 150); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 0.2
    done
    echo "Slurm did not come up within 30 s; see ${LOGS}" >&2
    sinfo >&2 || true
    exit 1
}

stop() {
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
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
