"""The SLURM executor: submit a suite's missing jobs as a job graph (one array per stage, dependencies between them).

    sbatch slurm/run_all.sh [--suite tiny] [--set KEY=VALUE ...] [--force] [--dry-run]
    python -m bench.slurm submit --suite tiny ...          (what run_all.sh runs)

The plan is the local executor's (``bench.plan``); each array task runs ``slurm/job.sbatch``, which launches
``bench.jobs`` with ``srun`` + ``torchrun`` on every node. Idempotent: jobs with a success record are not submitted,
and jobs of an earlier submission that are still queued or running are not submitted again but depended on.
Cluster settings come from the environment (``slurm/clusters/<name>.env``, sourced by run_all.sh): partition,
account, GPUs per node, time limits; no hyperparameter lives in shell.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.executor import build_plan
from bench.jobs import Roots
from bench.plan import STAGES, Plan
from bench.suite import SuiteError

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "job.sbatch"
#: Stages that train and may be preempted: requeued on USR1, resumed from their checkpoint.
REQUEUED_STAGES = {"ancestry", "transfer", "sample"}


@dataclass
class Cluster:
    """Cluster settings from ``KB_*`` environment variables (see ``slurm/clusters/example.env``)."""

    partition: str = ""
    account: str = ""
    gpus_per_node: int = 0
    cpus_per_gpu: int = 8
    nproc_per_node: int = 1
    """Processes per node when there are no GPUs (CPU clusters and the test cluster)."""
    nodes_train: int = 1
    time_train: str = "48:00:00"
    time_short: str = "04:00:00"
    signal_lead_s: int = 300
    max_parallel: int = 0
    extra: list[str] = field(default_factory=list)
    env_file: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Cluster:
        env = dict(os.environ if env is None else env)
        get = env.get
        return cls(partition=get("KB_PARTITION", ""), account=get("KB_ACCOUNT", ""),
                   gpus_per_node=int(get("KB_GPUS_PER_NODE", "0")), cpus_per_gpu=int(get("KB_CPUS_PER_GPU", "8")),
                   nproc_per_node=int(get("KB_NPROC_PER_NODE", "1")), nodes_train=int(get("KB_NODES_TRAIN", "1")),
                   time_train=get("KB_TIME_TRAIN", "48:00:00"), time_short=get("KB_TIME_SHORT", "04:00:00"),
                   signal_lead_s=int(get("KB_SIGNAL_LEAD", "300")), max_parallel=int(get("KB_MAX_PARALLEL", "0")),
                   extra=shlex.split(get("KB_EXTRA_SBATCH", "")), env_file=get("KB_ENV_FILE", ""))

    def resources(self, stage: str) -> list[str]:
        """sbatch options of one array task of ``stage``."""
        opts = [f"--partition={self.partition}"] if self.partition else []
        opts += [f"--account={self.account}"] if self.account else []
        nodes = self.nodes_train if stage in ("ancestry", "transfer") else 1
        if stage == "aggregate":
            return opts + ["--nodes=1", "--ntasks=1", "--cpus-per-task=2", f"--time={self.time_short}", *self.extra]
        opts += [f"--nodes={nodes}", "--ntasks-per-node=1"]
        if self.gpus_per_node:
            opts += [f"--gpus-per-node={self.gpus_per_node}", f"--cpus-per-task={self.gpus_per_node * self.cpus_per_gpu}"]
        else:
            opts += [f"--cpus-per-task={max(1, self.nproc_per_node)}"]
        opts.append(f"--time={self.time_train if stage in REQUEUED_STAGES else self.time_short}")
        if stage in REQUEUED_STAGES:
            # B: the batch shell gets USR1 (job.sbatch forwards it to the trainer, which checkpoints), then requeues
            opts += ["--requeue", f"--signal=B:USR1@{self.signal_lead_s}", "--open-mode=append"]
        return opts + self.extra


class Ledger:
    """What earlier submissions queued: job id -> SLURM id (``<array>_<index>``), kept in the runs root."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        tmp.replace(self.path)


def queued_ids(slurm_ids: list[str]) -> set[str]:
    """Which of ``slurm_ids`` are still pending or running (``squeue``; requeued jobs count as queued)."""
    if not slurm_ids:
        return set()
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr.strip()}")
    live = set(out.stdout.split())
    return {s for s in slurm_ids if s in live}


def _waves(plan: Plan) -> dict[str, int]:
    """Per job, how many jobs of its own stage it waits on in a chain (0 for most; 1 for a distilled ancestry)."""
    wave: dict[str, int] = {}

    def level(job_id: str) -> int:
        if job_id not in wave:
            job = plan.jobs[job_id]
            wave[job_id] = max((level(d) + 1 for d in job.deps if plan.jobs[d].stage == job.stage), default=0)
        return wave[job_id]

    for job_id in plan.jobs:
        level(job_id)
    return wave


def submit(plan: Plan, roots: Roots, cluster: Cluster, *, force: bool = False, dry_run: bool = False,
           sbatch: str = "sbatch") -> dict[str, str]:
    """Submit every missing job of ``plan``; returns stage -> SLURM array id (or the sbatch commands on dry run)."""
    store = roots.store
    plan_path = plan.save(roots.runs / "plans" / f"{plan.suite}-{plan.plan_id()}.json")
    ledger = Ledger(roots.runs / "slurm" / "ledger.json")
    in_queue = queued_ids([ledger.entries[j] for j in plan.jobs if j in ledger.entries]) if not dry_run else set()
    pending = {j for j, sid in ledger.entries.items() if sid in in_queue}
    wanted = [j for j in plan.jobs.values() if (force or not store.exists(j.job_id)) and j.job_id not in pending]
    if not any(j.stage != "aggregate" for j in wanted) and not force:
        wanted = []  # nothing new to compute: do not re-aggregate either
    stage_ids: dict[str, str] = {}
    job_stage_array: dict[str, str] = {j: ledger.entries[j].split("_")[0] for j in pending}
    list_dir = roots.runs / "slurm" / plan.plan_id()
    wave = _waves(plan)
    for stage, level in sorted({(j.stage, wave[j.job_id]) for j in wanted}, key=lambda k: (STAGES.index(k[0]), k[1])):
        # One array per stage, split into waves where jobs of a stage depend on each other (a distilled ancestry
        # after its teacher): an array cannot wait on its own tasks.
        jobs = [j for j in wanted if j.stage == stage and wave[j.job_id] == level]
        name = stage if level == 0 else f"{stage}.{level}"
        list_dir.mkdir(parents=True, exist_ok=True)
        job_list = list_dir / f"{name}.txt"
        job_list.write_text("".join(j.job_id + "\n" for j in jobs))
        deps = sorted({job_stage_array[d] for j in jobs for d in j.deps if d in job_stage_array})
        kind = "afterany" if stage == "aggregate" else "afterok"
        throttle = f"%{cluster.max_parallel}" if cluster.max_parallel else ""
        cmd = [sbatch, "--parsable", f"--job-name=kb-{plan.suite}-{name}", f"--array=0-{len(jobs) - 1}{throttle}",
               f"--output={roots.runs / 'slurm' / 'logs' / f'{name}-%A_%a.out'}", *cluster.resources(stage)]
        if deps:
            cmd += [f"--dependency={kind}:{':'.join(deps)}", "--kill-on-invalid-dep=yes"]
        export = {"KB_PLAN": plan_path, "KB_JOB_LIST": job_list, "KB_RUNS": roots.runs.resolve(),
                  "KB_RESULTS": roots.results.resolve(), "KB_REPO": REPO, "KB_PYTHON": sys.executable,
                  "KB_STAGE": stage, "KB_GPUS_PER_NODE": cluster.gpus_per_node,
                  "KB_NPROC_PER_NODE": cluster.nproc_per_node, "KB_ENV_FILE": cluster.env_file}
        cmd += ["--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items()), str(TEMPLATE)]
        if dry_run:
            stage_ids[name] = shlex.join(cmd)
            array_id = f"DRYRUN-{name}"
        else:
            (roots.runs / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"sbatch for stage {stage} failed: {out.stderr.strip()}")
            array_id = out.stdout.strip().split(";")[0]
            stage_ids[name] = array_id
            for i, job in enumerate(jobs):
                ledger.entries[job.job_id] = f"{array_id}_{i}"
        for job in jobs:
            job_stage_array[job.job_id] = array_id
    if not dry_run:
        ledger.save()
    return stage_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("submit", help="submit a suite's missing jobs")
    p.add_argument("--suite", default=os.environ.get("KB_SUITE", "tiny"))
    p.add_argument("--runs", type=Path, default=Path(os.environ.get("KINDBENCH_RUNS", "runs")))
    p.add_argument("--results", type=Path)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="submit jobs that already have a record")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    args = parser.parse_args(argv)
    try:
        suite, plan = build_plan(args.suite, args.sets)
    except SuiteError as err:  # bad input is reported before anything is submitted
        print(f"kindbench submit: {err}", file=sys.stderr)
        return 2
    roots = Roots(args.runs, args.results or Path("results") / suite.name)
    try:
        ids = submit(plan, roots, Cluster.from_env(), force=args.force, dry_run=args.dry_run)
    except (RuntimeError, OSError) as err:
        print(f"kindbench submit: {err}", file=sys.stderr)
        return 1
    if not ids:
        print(f"kindbench submit: nothing to submit for suite {suite.name!r} (every job is done or queued)")
    for stage, value in ids.items():
        print(f"{stage:10s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
