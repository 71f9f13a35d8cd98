#!/bin/bash
# Simulated cluster nodes on this machine: each node is a network namespace with its
# own address on a bridge and its own hostname, so MPI and Slurm see separate hosts
# that talk over TCP.
#
#   launch/nodes.sh up N [--cpus C]   # node1..nodeN (idempotent; C slots each, default 2)
#   launch/nodes.sh status            # the nodes, their addresses and processes
#   launch/nodes.sh down              # remove every node (after killing what runs there)
#   launch/nodes.sh exec NODE CMD...  # run CMD on a node (launch/node-exec does this for mpirun)
#
# Needs root. Nothing in the host's own network or /etc/hosts changes: the bridge
# distnn-br0 (10.77.77.1/24) and node i's address 10.77.77.(10+i) are new, and
# processes started on a node see $STATE/hosts as their /etc/hosts. Written for
# the launchers: $STATE/hostfile (hydra's "node1:C" lines) and $STATE/hosts.
set -euo pipefail

STATE=${DISTNN_NODES_STATE:-/run/distnn-nodes}
BRIDGE=distnn-br0
NET=10.77.77
HOST_IP=$NET.1

die() { echo "nodes.sh: $*" >&2; exit 2; }

need_root() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces and a bridge); run it as root"
    command -v ip >/dev/null || die "needs the ip command (iproute2)"
}

node_names() {  # the nodes that exist now, in order
    local ns
    for ns in /run/netns/distnn-node*; do
        if [ -e "$ns" ]; then echo "${ns#/run/netns/distnn-}"; fi
    done | sort -V
}

node_exists() { [[ $1 =~ ^node[0-9]+$ ]] && [ -e "/run/netns/distnn-$1" ]; }

node_up() {  # node_up I: namespace, veth on the bridge, address, hostname
    local i=$1 node=node$1 ns=distnn-node$1
    node_exists "$node" || ip netns add "$ns"
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
        ip link del "dnveth$i" 2>/dev/null || true
        ip link add "dnveth$i" type veth peer name eth0 netns "$ns"
    fi
    ip link set "dnveth$i" master "$BRIDGE" up
    ip -n "$ns" addr replace "$NET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    if ! mountpoint -q "$STATE/$node.uts"; then  # a UTS namespace kept by a bind mount
        touch "$STATE/$node.uts"
        unshare --uts="$STATE/$node.uts" hostname "$node"
    fi
}

up() {
    local n=${1:-} cpus=2
    shift || true
    while [ $# -gt 0 ]; do
        case $1 in
            --cpus) cpus=${2:-}; shift; [ $# -eq 0 ] || shift ;;
            *) die "unknown option $1 (see the header of $0)" ;;
        esac
    done
    [[ $n =~ ^[1-9][0-9]?$ ]] || die "up needs a node count from 1 to 99, got '${n}'"
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus needs a positive number, got '$cpus'"
    need_root
    local taken
    taken=$(ip route show "$NET.0/24" | grep -v "dev $BRIDGE" || true)
    [ -z "$taken" ] || die "$NET.0/24 is already routed on this host ($taken); the nodes need it"
    mkdir -p "$STATE"
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$HOST_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i
    for ((i = 1; i <= n; i++)); do node_up "$i"; done
    for node in $(node_names); do  # nodes beyond N from an earlier `up` go
        [ "${node#node}" -le "$n" ] || remove_node "${node#node}"
    done
    {
        echo "127.0.0.1 localhost"
        echo "$HOST_IP $(hostname) $(hostname -s) distnn-host"
        for ((i = 1; i <= n; i++)); do echo "$NET.$((10 + i)) node$i"; done
    } > "$STATE/hosts"
    for ((i = 1; i <= n; i++)); do echo "node$i:$cpus"; done > "$STATE/hostfile"
    echo "$HOST_IP" > "$STATE/host-address"
    status
}

remove_node() {  # remove_node I: its processes, namespaces and veth
    local node=node$1 ns=distnn-node$1
    local pids tries
    for tries in 1 2 3 4 5 6 7 8 9 10; do  # again: a process may fork while it is killed
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] || break
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    ip netns del "$ns" 2>/dev/null || true
    ip link del "dnveth$1" 2>/dev/null || true
    if mountpoint -q "$STATE/$node.uts"; then umount "$STATE/$node.uts"; fi
    rm -f "$STATE/$node.uts"
}

down() {
    need_root
    local node left
    for node in $(node_names); do remove_node "${node#node}"; done
    for left in "$STATE"/node*.uts; do  # what an interrupted down or a manual netns del left
        [ -e "$left" ] || continue
        left=${left##*/node}
        remove_node "${left%.uts}"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -f "$STATE/hosts" "$STATE/hostfile" "$STATE/host-address"
    rmdir "$STATE" 2>/dev/null || true
    echo "nodes.sh: no simulated nodes"
}

status() {
    local nodes node
    nodes=$(node_names)
    if [ -z "$nodes" ]; then
        echo "nodes.sh: no simulated nodes"
        return 0
    fi
    echo "bridge $BRIDGE $HOST_IP (this host); hostfile $STATE/hostfile"
    for node in $nodes; do
        printf '%s %s %s processes\n' "$node" "$NET.$((10 + ${node#node}))" \
            "$(ip netns pids "distnn-$node" | wc -l)"
    done
}

run_on() {  # run_on NODE CMD...: in its network and UTS namespaces, with its /etc/hosts
    [ $# -gt 0 ] || die "exec needs a node name and a command"
    local node=$1
    shift
    [ $# -gt 0 ] || die "exec $node needs a command"
    node_exists "$node" || die "no simulated node $node (see: $0 status)"
    exec nsenter --net="/run/netns/distnn-$node" --uts="$STATE/$node.uts" \
        unshare --mount --propagation private \
        sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$STATE/hosts" "$@"
}

case ${1:-} in
    up) shift; up "$@" ;;
    down) down ;;
    status) status ;;
    exec) shift; need_root; run_on "$@" ;;
    *) die "usage: $0 up N [--cpus C] | status | down | exec NODE CMD..." ;;
esac
