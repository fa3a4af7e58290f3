#!/usr/bin/env bash
# A real two-node Slurm on this one machine, for tests and CI: each node is a network namespace of its own (own IP
# on a private bridge, own hostname), running its own slurmd; the controller runs on the machine.
#
#   scripts/slurm-two-nodes.sh up      install (first time only) and start munged, slurmctld and the two slurmd
#   scripts/slurm-two-nodes.sh down    cancel the jobs, stop the daemons, remove the namespaces and the bridge
#   scripts/slurm-two-nodes.sh status  print what runs
#   scripts/slurm-two-nodes.sh env     print `export SLURM_CONF=...`: sbatch/srun/squeue then talk to this cluster
#
# Needs root on Debian/Ubuntu (packages, namespaces, daemons). Independent of scripts/slurm.sh (the single-node
# cluster): its own munged socket, ports (7817/7818), state and configuration in $FCMAE_SLURM2_STATE (default
# /var/lib/fcmae-slurm2); /etc/slurm is not touched, clients find the configuration through SLURM_CONF. No
# accounting (no slurmdbd): `sacct` does not work here. Nodes fcmae-n1, fcmae-n2 (10.77.0.11-12), partition `two`.
# Both nodes see the machine's filesystem, i.e. a shared filesystem, as a cluster's /home or /checkpoints.
set -euo pipefail

STATE=${FCMAE_SLURM2_STATE:-/var/lib/fcmae-slurm2}
CONF=$STATE/slurm.conf
MUNGE=$STATE/munge
BRIDGE=fcmae-br
NET=10.77.0
NODES=(fcmae-n1 fcmae-n2)
PACKAGES=(munge slurm-client slurmctld slurmd)
export PATH=$PATH:/usr/sbin SLURM_CONF=$CONF

NAME=slurm-two-nodes.sh
EXES=(munged slurmctld slurmd sbatch)
source "$(dirname "$0")/slurm-lib.sh"  # log, die, alive, wait_for, install_packages, stop

network_up() {  # a bridge on the machine (the controller's address) and one namespace per node, wired to it
    local i ns
    ip link show "$BRIDGE" >/dev/null 2>&1 || {
        ip link add "$BRIDGE" type bridge
        ip addr add "$NET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    }
    for i in "${!NODES[@]}"; do
        ns=${NODES[$i]}
        ip netns list | grep -qw "$ns" && continue
        ip netns add "$ns"
        ip link add "fcmae-v$((i + 1))" type veth peer name eth0 netns "$ns"
        ip link set "fcmae-v$((i + 1))" master "$BRIDGE" up
        ip -n "$ns" addr add "$NET.1$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        # mounted over /etc/hosts for the node's daemon and jobs (start_slurm): every node resolves every node's name
        mkdir -p "/etc/netns/$ns"
        {
            echo "127.0.0.1 localhost"
            echo "$NET.1 $(hostname -s)"
            for j in "${!NODES[@]}"; do echo "$NET.1$((j + 1)) ${NODES[$j]}"; done
        } >"/etc/netns/$ns/hosts"
    done
}

network_down() {
    local ns
    for ns in "${NODES[@]}"; do
        ip netns list | grep -qw "$ns" && ip netns del "$ns"
        rm -rf "/etc/netns/$ns"
    done
    rmdir /etc/netns 2>/dev/null || true  # when no other namespace uses it
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
    return 0
}

configure() {
    local node
    node=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' |
           tr '\n' ' ')
    mkdir -p "$STATE/ctld" "$STATE/log"
    cat >"$CONF" <<EOF
# written by fcmae scripts/slurm-two-nodes.sh
ClusterName=fcmae2
SlurmctldHost=$(hostname -s)($NET.1)
SlurmctldPort=7817
SlurmdPort=7818
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket,cred_expire=10
CredType=cred/munge
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=fcmae-n1 NodeAddr=$NET.11 ${node}State=UNKNOWN
NodeName=fcmae-n2 NodeAddr=$NET.12 ${node}State=UNKNOWN
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    alive "$STATE/munged.pid" && return 0
    mkdir -p "$MUNGE"
    [[ -s $MUNGE/munge.key ]] || dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$MUNGE"; chmod 755 "$MUNGE"; chmod 400 "$MUNGE/munge.key"  # clients reach the socket
    runuser -u munge -- munged --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
    wait_for 10 munged test -s "$MUNGE/munged.pid"
    cp "$MUNGE/munged.pid" "$STATE/munged.pid"
}

start_slurm() {
    alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    local ns
    for ns in "${NODES[@]}"; do
        alive "$STATE/slurmd-$ns.pid" && continue
        mkdir -p "$STATE/spool-$ns"
        # A node of its own: its network namespace (address), a UTS namespace (hostname = node name) and a mount
        # namespace whose /etc/hosts names every node. Not `ip netns exec`: it remounts /sys, hiding the cgroup
        # filesystem slurmd needs.
        nsenter --net="/run/netns/$ns" unshare --mount --uts sh -c \
            "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $ns && exec slurmd -f '$CONF' -N $ns"
    done
    wait_for 30 "both nodes to be idle" bash -c "[ \$(sinfo -h -p two -t idle -o %D) = ${#NODES[@]} ]"
}

up() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages, makes network namespaces, starts daemons)"
    install_packages
    mkdir -p "$STATE"
    alive "$STATE/slurmctld.pid" || configure
    network_up
    start_munge
    start_slurm
    log "up: $(sinfo -h -o '%P %D %N %t' | tr '\n' ';') configuration $CONF (export SLURM_CONF=$CONF)"
}

down() {
    local ns
    for ns in "${NODES[@]}"; do
        ip netns list | grep -qw "$ns" && ip netns del "$ns"
        rm -rf "/etc/netns/$ns"
    done
    rmdir /etc/netns 2>/dev/null || true  # when no other namespace uses it
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
    return 0
}

configure() {
    local node
    node=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' |
           tr '\n' ' ')
    mkdir -p "$STATE/ctld" "$STATE/log"
    cat >"$CONF" <<EOF
# written by fcmae scripts/slurm-two-nodes.sh
ClusterName=fcmae2
SlurmctldHost=$(hostname -s)($NET.1)
SlurmctldPort=7817
SlurmdPort=7818
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket,cred_expire=10
CredType=cred/munge
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=fcmae-n1 NodeAddr=$NET.11 ${node}State=UNKNOWN
NodeName=fcmae-n2 NodeAddr=$NET.12 ${node}State=UNKNOWN
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    alive "$STATE/munged.pid" && return 0
    mkdir -p "$MUNGE"
    [[ -s $MUNGE/munge.key ]] || dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$MUNGE"; chmod 755 "$MUNGE"; chmod 400 "$MUNGE/munge.key"  # clients reach the socket
    runuser -u munge -- munged --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
    wait_for 10 munged test -s "$MUNGE/munged.pid"
    cp "$MUNGE/munged.pid" "$STATE/munged.pid"
}

start_slurm() {
    alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    local ns
    for ns in "${NODES[@]}"; do
        alive "$STATE/slurmd-$ns.pid" && continue
        mkdir -p "$STATE/spool-$ns"
        # A node of its own: its network namespace (address), a UTS namespace (hostname = node name) and a mount
        # namespace whose /etc/hosts names every node. Not `ip netns exec`: it remounts /sys, hiding the cgroup
        # filesystem slurmd needs.
        nsenter --net="/run/netns/$ns" unshare --mount --uts sh -c \
            "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $ns && exec slurmd -f '$CONF' -N $ns"
    done
    wait_for 30 "both nodes to be idle" bash -c "[ \$(sinfo -h -p two -t idle -o %D) = ${#NODES[@]} ]"
}

up() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages, makes network namespaces, starts daemons)"
    install_packages
    mkdir -p "$STATE"
    alive "$STATE/slurmctld.pid" || configure
    network_up
    start_munge
    start_slurm
    log "up: $(sinfo -h -o '%P %D %N %t' | tr '\n' ';') configuration $CONF (export SLURM_CONF=$CONF)"
}

stop() {  # stop PIDFILE...: SIGTERM, wait up to 20 s, then SIGKILL
    local file pid pids=()
    for file in "$@"; do
        if alive "$file"; then pids+=("$(cat "$file")"); kill "${pids[-1]}"; fi
    done
    for _ in $(seq 100); do
        local left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        ((left)) || break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && { log "killing pid $pid"; kill -9 "$pid"; }; done
    rm -f "$@"
}

down() {
    if alive "$STATE/slurmctld.pid"; then
        scancel --full --quiet 2>/dev/null || true
        for _ in $(seq 100); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    local ns files=()
    for ns in "${NODES[@]}"; do files+=("$STATE/slurmd-$ns.pid"); done
    stop "${files[@]}" "$STATE/slurmctld.pid"
    stop "$STATE/munged.pid"
    network_down
    log "down"
}

status() {
    local name
    for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        if alive "$STATE/$name.pid"; then echo "$name running ($(cat "$STATE/$name.pid"))"
        else echo "$name stopped"; fi
    done
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
