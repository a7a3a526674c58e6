#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (as root), for tests/cluster/test_slurm.py:
# installs Debian's slurm-wlm and munge where missing, writes a slurm.conf for this host, starts
# munged, slurmctld and slurmd, and waits until the node is idle. Exit 0 when it is; otherwise
# non-zero with the reason on stderr. tests/cluster/slurm_down.sh stops it again.
set -uo pipefail
die() { echo "slurm_up: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 ||
   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1)) ||
    die "could not install slurm-wlm and munge with apt-get"
fi
host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge /var/lib/munge /var/log/munge
cat > "$conf" <<CONF
# written by segplan's tests/cluster/slurm_up.sh: one node, this host
ClusterName=segplan-test
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null
chmod 400 /etc/munge/munge.key
chmod 700 /etc/munge
pgrep -x munged >/dev/null || runuser -u munge -- munged --force || die "munged did not start"
pgrep -x slurmctld >/dev/null || slurmctld -c || die "slurmctld did not start (/var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || die "slurmd did not start (/var/log/slurm/slurmd.log)"
for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1)
  case "$state" in
    idle|mixed|allocated) echo "slurm_up: node $host is $state ($cpus CPUs, $mem MB)"; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 ;;
  esac
  sleep 1
done
die "node $host did not become idle within 60 s (state: ${state:-none}); see /var/log/slurm/"
