#!/usr/bin/env bash
# A one-machine SLURM cluster for trying and testing `hydra/launcher=slurm`: installs Debian's slurm-wlm and munge
# (when missing), writes /etc/slurm/slurm.conf for this machine as one node of one partition, and starts munged,
# slurmctld and slurmd. Run as root; a no-op when the cluster is already up. `bash scripts/setup_slurm.sh stop` ends it.
#   bash scripts/setup_slurm.sh && sinfo        # then: tunelab-train -m hydra/launcher=slurm ...
# Not a production set-up: no cgroups (the processes of a job are tracked by their parent), no accounting, jobs
# run as the user who submits them, and KillWait is short so that a cancelled trial ends within seconds.
set -euo pipefail

log() { echo "setup_slurm: $*" >&2; }
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm-tunelab

stop() {
  for daemon in slurmd slurmctld; do
    if [ -f "/run/$daemon.pid" ] && kill -0 "$(cat "/run/$daemon.pid")" 2>/dev/null; then
      kill "$(cat "/run/$daemon.pid")" && log "stopped $daemon"
    fi
  done
}

if [ "${1:-}" = "stop" ]; then
  stop
  if [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    kill "$(cat /run/munge/munged.pid)" && log "stopped munged"
  fi
  exit 0
fi
if [ "$(id -u)" != 0 ]; then log "run as root (it installs packages and starts system daemons)"; exit 1; fi
if command -v sinfo >/dev/null && sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
  log "SLURM is up:"; sinfo >&2; exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurm-wlm munge >/dev/null
fi

# munge authenticates every SLURM message; its key is made when the package is installed
[ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged --force
  log "started munged"
fi

host=$(hostname -s)
node=$(slurmd -C | head -1)          # NodeName=<host> CPUs=... RealMemory=... as slurmd sees this machine
mkdir -p "$STATE/ctld" "$STATE/d" /var/log/slurm
cat > "$CONF" <<EOF
# written by tunelab's scripts/setup_slurm.sh: this machine as a one-node cluster
ClusterName=tunelab
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

stop
slurmctld -c      # -c: a clean state (no jobs left from an earlier cluster)
slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then log "SLURM is up:"; sinfo >&2; exit 0; fi
  sleep 1
done
log "slurmctld/slurmd started but no node is idle after 60 s; see /var/log/slurm/"
exit 1
