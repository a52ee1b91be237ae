#!/usr/bin/env bash
# A one-node Slurm on this machine, for the `slurm`-marked tests (tests/test_slurm.py starts it through a session
# fixture; scripts/setup.sh does not, so a machine that only trains starts no daemons). Needs root. The node offers
# twice its cores (config_overrides), so that a test job that mostly sleeps does not hold up the others.
#   bash scripts/slurm/local_cluster.sh          install (Debian's slurm-wlm and munge) if missing, start, wait idle
#   bash scripts/slurm/local_cluster.sh stop     stop the daemons
# Idempotent: a cluster that is already up and idle is left as it is. State, spool and logs live in /tmp/slurm.
set -euo pipefail
STATE=/tmp/slurm
if [ "${1:-}" = "stop" ]; then
  pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "local_cluster: needs root (installs packages and runs slurmd)" >&2; exit 3; }
CPUS=$(( 2 * $(nproc) ))
if [ "$(sinfo -h -o '%t %c' 2>/dev/null)" = "idle $CPUS" ]; then exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "local_cluster: installing Debian's slurm-wlm and munge" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

mkdir -p "$STATE/state" "$STATE/spool" /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
[ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

HOST=$(hostname)
cat > "$STATE/slurm.conf" <<CONF
# Written by scripts/slurm/local_cluster.sh: one node, no accounting, no cgroups.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
KillWait=30
MinJobAge=600
SlurmdTimeout=60
# Twice the cores: the tests' minute-long time-limit job (mostly asleep) runs beside the others' jobs
SlurmdParameters=config_overrides
NodeName=$HOST CPUs=$CPUS RealMemory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 )) State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$STATE/slurm.conf" /etc/slurm/slurm.conf; then  # daemons started with another configuration restart
  cp "$STATE/slurm.conf" /etc/slurm/slurm.conf
  pkill -x slurmd || true; pkill -x slurmctld || true
  for _ in $(seq 50); do pgrep -x 'slurmd|slurmctld' >/dev/null || break; sleep 0.2; done
fi
rm -f /etc/slurm/cgroup.conf

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qx idle; then exit 0; fi
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "local_cluster: the node did not come up idle; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
sinfo >&2 || true
exit 1
