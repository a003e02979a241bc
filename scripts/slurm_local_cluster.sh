#!/usr/bin/env bash
# A real Slurm cluster on this one machine: two emulated nodes (n1, n2), for tests and demos.
#   scripts/slurm_local_cluster.sh up     install (Debian packages) if needed, start, wait ready
#   scripts/slurm_local_cluster.sh down   stop the daemons (by their PID files)
# Needs root. Slurm 22.05 from Debian; no systemd; no accounting.
set -euo pipefail
NODES=(n1 n2)
CONF=/etc/slurm/slurm.conf
RUN=/run/dmuon-slurm

down() {
    for f in "$RUN"/*.pid /run/munge/munged.pid; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    rm -f "$RUN"/*.pid
}

up() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
    fi
    down
    mkdir -p "$RUN" /etc/slurm /var/spool/slurmctld /var/log/slurm /run/munge /etc/munge
    for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd-$n"; done
    grep -q "dmuon-slurm" /etc/hosts || echo "127.0.0.1 ${NODES[*]} # dmuon-slurm" >> /etc/hosts

    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    chown munge:munge /etc/munge/munge.key /run/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid

    cpus=$(nproc)
    cat > "$CONF" <<CONF
ClusterName=dmuon
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17101 CPUs=$cpus RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17102 CPUs=$cpus RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
    slurmctld
    for n in "${NODES[@]}"; do slurmd -N "$n"; done
    for _ in $(seq 60); do
        idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
        [ "$idle" -ge "${#NODES[@]}" ] && { sinfo; return 0; }
        sleep 1
    done
    echo "slurm nodes did not become idle:" >&2
    sinfo -N >&2 || true
    tail -20 /var/log/slurm/slurmctld.log >&2 || true
    return 1
}

"${1:-up}"
