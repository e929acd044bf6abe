#!/bin/bash
#SBATCH --job-name=kindbench-submit
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output=kindbench-submit-%j.out
# What users type: `sbatch slurm/run_all.sh [--suite NAME] [--set KEY=VALUE ...] [--force] [--keep-stale] [--dry-run]`
# (or `bash slurm/run_all.sh ...` where compute nodes may not submit jobs). It plans the suite, submits every
# unfinished job as a job graph (each job afterok on its own dependencies, the aggregation afterany on every
# evaluation; requeue on preemption) and exits. Submitting again submits only what is not done and not queued.
# Cluster settings: slurm/clusters/$KB_CLUSTER.env (default: example.env, copy and edit it for your cluster).
set -euo pipefail
REPO=${KINDBENCH_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
cd "$REPO"
ENV_FILE=${KB_ENV_FILE:-$REPO/slurm/clusters/${KB_CLUSTER:-example}.env}
if [ ! -f "$ENV_FILE" ]; then
  echo "kindbench: cluster settings $ENV_FILE not found (set KB_CLUSTER or KB_ENV_FILE)" >&2
  exit 2
fi
set -a; source "$ENV_FILE"; set +a
export KB_ENV_FILE=$ENV_FILE
exec "${KB_PYTHON:-python3}" -m bench.pipeline.slurm submit "$@"
