#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for trying and testing the Slurm scripts (Debian/Ubuntu, as root).
#
#   slurm/dev-cluster.sh [up]     install (apt) and start munge, slurmctld and two slurmd (nodes n1, n2); idempotent
#   slurm/dev-cluster.sh status   exit 0 if the cluster answers with both nodes usable, else 1
#   slurm/dev-cluster.sh down     cancel the cluster's jobs and stop the daemons this script started
#
# Both nodes are this machine (NodeAddr=127.0.0.1, slurmd ports 17001 and 17002), one CPU each, in partition `dev`.
# The controller runs as root with a fresh job state each time it is started (`slurmctld -c`). Jobs can be
# requeued (JobRequeue=1), and `scontrol show job` shows Restarts=N. Files: /etc/slurm/slurm.conf (written only if
# absent or written by this script), /etc/munge/munge.key, /var/log/slurm/, /var/spool/slurm{ctld,d}/, /run/slurm/.
#
# Exit status 77 means "cannot be set up here" (not root, or no apt-get) and the cluster is not running: callers
# such as the test suite skip on it. Any other failure exits 1 with the reason.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons, runuser and apt-get live there

readonly CONF=/etc/slurm/slurm.conf
readonly MARK="# written by distsent slurm/dev-cluster.sh"
readonly RUN=/run/slurm
readonly LOGS=/var/log/slurm
readonly NODES=(n1 n2)
readonly PORTS=(17001 17002)
readonly SKIP=77

say() { echo "dev-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
skip() { say "skip: $*"; exit "$SKIP"; }

# pid from a pid file if that process is alive and is the named program (a stale file or a reused pid is ignored)
alive_pid() {
    local file=$1 name=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]] || return 1
    echo "$pid"
}

munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

nodes_usable() {
    local states
    states=$(timeout 10 sinfo -h -N -p dev -o '%N %t' 2>/dev/null) || return 1
    for node in "${NODES[@]}"; do
        grep -Eq "^$node (idle|mix|alloc|comp)" <<<"$states" || return 1
    done
}

cluster_ok() { munge_ok && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' && nodes_usable; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || skip "Slurm is not installed and there is no apt-get to install it (${missing[*]})"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null ||
        die "apt-get install slurmctld slurmd slurm-client munge failed"
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    munge_ok && return 0
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munge does not work after starting munged (see /var/log/munge/munged.log)"
}

write_conf() {
    local host tmp
    host=$(hostname -s)
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARK: two nodes (n1, n2) on this machine.
ClusterName=distsent-dev
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmdSpoolDir=/var/spool/slurmd/%n
StateSaveLocation=/var/spool/slurmctld
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=1 State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=1 State=UNKNOWN
PartitionName=dev Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -e $CONF ]] && ! ours; then
        rm -f "$tmp"
        die "$CONF exists and was not written by this script: not touching it"
    fi
    if [[ -e $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1  # unchanged
    fi
    install -d -m 0755 /etc/slurm
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    say "wrote $CONF"
}

hosts_entries() {
    local node
    for node in "${NODES[@]}"; do
        getent hosts "$node" >/dev/null && continue
        say "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
        echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
        return
    done
}

# stop the daemons named by pid files (slurmd before slurmctld), and wait until those processes are gone
stop_daemons() {
    local pids=() pid i
    for i in "${!NODES[@]}"; do
        if pid=$(alive_pid "$RUN/slurmd-${NODES[i]}.pid" slurmd); then pids+=("$pid"); fi
    done
    if pid=$(alive_pid "$RUN/slurmctld.pid" slurmctld); then pids+=("$pid"); fi
    if [[ ${1:-} == --munge ]] && pid=$(alive_pid /run/munge/munged.pid munged); then pids+=("$pid"); fi
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 150); do
        local left=0
        for pid in "${pids[@]}"; do if kill -0 "$pid" 2>/dev/null; then left=1; fi; done
        ((left)) || return 0
        sleep 0.1
    done
    die "daemons ${pids[*]} did not stop within 15 s"
}

ours() { [[ -e $CONF ]] && grep -qF "$MARK" "$CONF"; }

any_daemon() {
    alive_pid "$RUN/slurmctld.pid" slurmctld >/dev/null || alive_pid "$RUN/slurmd-${NODES[0]}.pid" slurmd >/dev/null ||
        alive_pid "$RUN/slurmd-${NODES[1]}.pid" slurmd >/dev/null
}

up() {
    if [[ $EUID -ne 0 ]]; then
        if ours && cluster_ok; then say "running: nodes ${NODES[*]} in partition dev"; return 0; fi
        skip "the dev cluster is not running and setting it up needs root"
    fi
    install_packages
    start_munge
    hosts_entries
    if write_conf && any_daemon; then
        say "configuration changed: restarting the Slurm daemons"
        stop_daemons
    fi
    start_all  # starts only what is not running
    say "running: nodes ${NODES[*]} in partition dev"
}

start_all() {
    local i pid
    install -d -m 0755 "$RUN" "$LOGS" /var/spool/slurmctld /var/spool/slurmd
    if ! alive_pid "$RUN/slurmctld.pid" slurmctld >/dev/null; then
        say "starting slurmctld (fresh job state)"
        slurmctld -c </dev/null >/dev/null 2>&1 || die "slurmctld did not start (see $LOGS/slurmctld.log)"
    fi
    for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer (see $LOGS/slurmctld.log)"
    for i in "${!NODES[@]}"; do
        install -d -m 0755 "/var/spool/slurmd/${NODES[i]}"
        if ! alive_pid "$RUN/slurmd-${NODES[i]}.pid" slurmd >/dev/null; then
            say "starting slurmd -N ${NODES[i]}"
            slurmd -N "${NODES[i]}" </dev/null >/dev/null 2>&1 ||
                die "slurmd -N ${NODES[i]} did not start (see $LOGS/slurmd-${NODES[i]}.log)"
        fi
    done
    for _ in $(seq 150); do
        nodes_usable && return 0
        # nodes left down or drained by an earlier unclean stop
        if timeout 5 sinfo -h -N -p dev -o '%t' 2>/dev/null | grep -Eq 'down|drain|fail'; then
            scontrol update NodeName="${NODES[0]},${NODES[1]}" State=RESUME 2>/dev/null || true
        fi
        sleep 0.2
    done
    sinfo -N >&2 || true
    die "nodes ${NODES[*]} did not become usable within 30 s (see $LOGS/)"
}

down() {
    if [[ $EUID -ne 0 ]]; then die "stopping the dev cluster needs root"; fi
    if [[ -e $CONF ]] && ! ours; then die "$CONF was not written by this script: not stopping"; fi
    if timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        scancel --partition=dev 2>/dev/null || true
        for _ in $(seq 100); do [[ -z $(squeue -h -p dev 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    stop_daemons --munge
    say "stopped"
}

case "${1:-up}" in
    up) up ;;
    down) down ;;
    status) if cluster_ok; then say "running"; else say "not running"; exit 1; fi ;;
    *) echo "usage: $0 [up|status|down]" >&2; exit 2 ;;
esac
