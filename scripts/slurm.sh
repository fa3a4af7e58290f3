#!/usr/bin/env bash
# A real single-node Slurm for tests and CI, from Debian packages, without systemd.
#
#   scripts/slurm.sh up      install (first time only) and start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   scripts/slurm.sh down    cancel the jobs, stop the daemons by their pid files
#   scripts/slurm.sh status  print what runs
#
# Needs root on Debian/Ubuntu. Idempotent: `up` starts only what is not running and takes ~3 s once installed;
# `down` stops only daemons whose pid files it finds. State, logs and pid files live in $FCMAE_SLURM_STATE
# (default /var/lib/fcmae-slurm). It writes /etc/slurm/slurm.conf and slurmdbd.conf, and refuses to overwrite
# ones it did not write (a real cluster's). Partitions: `low` (default; jobs there are preempted by `high` with a
# SIGUSR2 first, then requeued after GraceTime) and `high`.
set -euo pipefail

STATE=${FCMAE_SLURM_STATE:-/var/lib/fcmae-slurm}
CONF_DIR=/etc/slurm
MARK="# written by fcmae scripts/slurm.sh"
DB_PASS=fcmae-slurmdbd
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

NAME=slurm.sh
EXES=(munged mariadbd slurmdbd slurmctld slurmd sbatch sacct)
source "$(dirname "$0")/slurm-lib.sh"  # log, die, alive, wait_for, install_packages, stop

write_conf() {  # write_conf FILE MODE: stdin -> FILE unless FILE is someone else's
    if [[ -e $1 ]] && ! grep -qF "$MARK" "$1"; then
        die "$1 exists and was not written by this script: not touching a real cluster's configuration"
    fi
    local tmp; tmp=$(mktemp "$1.XXXX")
    cat >"$tmp"; chmod "$2" "$tmp"; mv "$tmp" "$1"
}

configure() {
    local host node
    host=$(hostname -s)
    # slurmd -C prints this machine's real layout; keep the CPU topology, drop the volatile fields.
    node=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' |
           tr '\n' ' ')
    mkdir -p "$STATE/ctld" "$STATE/spool" "$CONF_DIR"
    write_conf "$CONF_DIR/slurm.conf" 644 <<EOF
$MARK
ClusterName=fcmae
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Short credential lifetime and a fast scheduler: a requeued job runs again in seconds, not ~150 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No systemd/cgroups here: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
# Preemption the way real sites do it: a job in 'low' gets SIGUSR2 (submitit checkpoints and requeues on it),
# then GraceTime seconds later it is requeued to make room for a job in 'high'.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$host NodeAddr=127.0.0.1 ${node}State=UNKNOWN
PartitionName=low Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    write_conf "$CONF_DIR/slurmdbd.conf" 600 <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

start_munge() {
    alive "$STATE/munged.pid" && return 0
    [[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || /usr/sbin/mungekey --create; }
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge; chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    wait_for 10 munged test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

start_mariadb() {
    alive "$STATE/mariadbd.pid" && return 0
    mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
    touch "$STATE/mariadbd.log"; chown mysql:mysql "$STATE/mariadbd.log"
    # Socket only: no TCP port to collide with anything else on the machine. mariadbd drops to user mysql, so
    # its own pid file goes to /run/mysqld; ours is written from the shell's $!.
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mariadbd.pid \
        --log-error="$STATE/mariadbd.log" </dev/null >/dev/null 2>&1 &
    echo $! >"$STATE/mariadbd.pid"
    wait_for 30 mariadbd mariadb -e 'SELECT 1'
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm() {
    if ! alive "$STATE/slurmdbd.pid"; then
        slurmdbd
        wait_for 30 slurmdbd sacctmgr -n show cluster
    fi
    # Accounting needs the cluster registered before slurmctld reports to slurmdbd.
    sacctmgr -n -P show cluster format=cluster | grep -qx fcmae || sacctmgr -i add cluster fcmae >/dev/null
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld
        wait_for 30 slurmctld scontrol ping
    fi
    if ! alive "$STATE/slurmd.pid"; then
        slurmd
    fi
    local host; host=$(hostname -s)
    wait_for 30 "node $host to be idle" bash -c "sinfo -h -n $host -o %t | grep -Eq '^(idle|mix|alloc)'"
}

up() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts system daemons)"
    install_packages
    export PATH=$PATH:/usr/sbin
    mkdir -p "$STATE"
    # Reconfigure only when nothing runs: a live slurmctld keeps the configuration it read.
    alive "$STATE/slurmctld.pid" || configure
    start_munge
    start_mariadb
    start_slurm
    log "up: $(sinfo -h -o '%P %D %c %t' | tr '\n' ';') state and logs in $STATE"
}

down() {
    export PATH=$PATH:/usr/sbin
    if alive "$STATE/slurmctld.pid"; then
        # Cancel every job so no step daemon outlives slurmd, then wait (bounded) for the queue to drain.
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 100); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    # Order: the controller reports to slurmdbd, which needs mariadb and munge.
    stop "$STATE/slurmd.pid" "$STATE/slurmctld.pid"
    stop "$STATE/slurmdbd.pid"
    stop "$STATE/mariadbd.pid" "$STATE/munged.pid"
    log "down"
}

status() {
    local name
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$STATE/$name.pid"; then echo "$name running ($(cat "$STATE/$name.pid"))"
        else echo "$name stopped"; fi
    done
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
