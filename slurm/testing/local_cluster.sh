#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for CI and for trying slurm/run_all.sh without a cluster:
# slurmctld plus NODES slurmd daemons (fake nodes n1..nN on 127.0.0.1) with oversubscribed CPUs and fake GPUs
# (GRES backed by character devices, so --gpus-per-node requests schedule). Debian 12, run as root, no systemd.
#   bash slurm/testing/local_cluster.sh            # start (idempotent)
#   bash slurm/testing/local_cluster.sh stop       # stop the daemons
set -euo pipefail
NODES=${NODES:-2}
FAKE_CPUS=${FAKE_CPUS:-16}
FAKE_MEM_MB=${FAKE_MEM_MB:-64000}
GPUS=${GPUS:-2}

if [ "${1:-start}" = "stop" ]; then
  for f in /run/slurmd-n*.pid /run/slurmctld.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
# munge authenticates daemons and clients; the package's postinst usually made a key
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
# gres/gpu needs File= entries; character devices stand in for GPUs
for i in $(seq 0 $((GPUS - 1))); do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done
# torchrun resolves the head node by name
grep -q ' n1 ' /etc/hosts || echo "127.0.0.1 $(seq -s ' ' -f 'n%g' 1 "$NODES") " >> /etc/hosts
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=kindbench-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
SlurmctldPort=6817
NodeName=n[1-$NODES] NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$FAKE_CPUS RealMemory=$FAKE_MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=n[1-$NODES] Name=gpu File=/dev/fakegpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf
pgrep -x slurmctld >/dev/null || slurmctld
for n in $(seq 1 "$NODES"); do pgrep -f "slurmd -N n$n\$" >/dev/null || slurmd -N "n$n"; done
for _ in $(seq 1 30); do sinfo -h -o '%T' 2>/dev/null | grep -q idle && break; sleep 1; done
sinfo -N -o '%N %G %T %c'
