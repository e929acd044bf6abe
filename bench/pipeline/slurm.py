"""The SLURM executor: submit a suite's unfinished jobs as a job graph with per-job dependencies.

    sbatch slurm/run_all.sh [--suite tiny] [--set KEY=VALUE ...] [--force] [--keep-stale] [--dry-run]
    python -m bench.pipeline.slurm submit --suite tiny ...          (what run_all.sh runs)

The plan is the local executor's (``bench.pipeline.plan``); every job runs ``slurm/job.sbatch``, which launches
``bench.pipeline.jobs`` with ``srun`` + ``torchrun`` on every node. Each job waits (``afterok``) on exactly the SLURM
jobs of its own dependencies, so a failed job cancels only what depends on it (``--kill-on-invalid-dep=yes``) and every
other run is still sampled and scored, as with the local executor; the aggregate job waits (``afterany``) on every
evaluation it reads. Jobs of one step with the same dependencies go in one array (the prepare jobs, the
ancestries, the transfers from one ancestry); the others are single jobs.

What to submit is ``bench.pipeline.status.plan_states``: every job whose record is not trustworthy (missing, failed,
outputs changed, stale code, inputs changed since it ran; for the aggregate job: the evaluation records it read
are not the ones that exist now), plus whatever depends on such a job, since rerunning a job changes the inputs of
its dependants. Jobs of an earlier submission that are still queued or running (the ledger, job id -> SLURM id)
are not submitted again but depended on. Cluster settings come from the environment (``slurm/clusters/<name>.env``,
sourced by run_all.sh): partition, account, GPUs per node, time limits; no hyperparameter lives in shell.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.config.suite import SuiteError
from bench.pipeline.executor import build_plan, default_results
from bench.pipeline.jobs import Roots
from bench.pipeline.plan import STEPS, Job, Plan
from bench.pipeline.status import JobState, plan_states
from bench.records.atomic import atomic_path

REPO = Path(__file__).resolve().parents[2]  # bench/pipeline/slurm.py -> the repository
TEMPLATE = REPO / "slurm" / "job.sbatch"
#: Steps that train and may be preempted: requeued on USR1, resumed from their checkpoint.
REQUEUED_STEPS = {"pretrain", "train", "sample"}


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

    def resources(self, step: str) -> list[str]:
        """sbatch options of one job (or array task) of ``step``."""
        opts = [f"--partition={self.partition}"] if self.partition else []
        opts += [f"--account={self.account}"] if self.account else []
        nodes = self.nodes_train if step in ("pretrain", "train") else 1
        if step == "aggregate":
            return opts + ["--nodes=1", "--ntasks=1", "--cpus-per-task=2", f"--time={self.time_short}", *self.extra]
        opts += [f"--nodes={nodes}", "--ntasks-per-node=1"]
        if self.gpus_per_node:
            opts += [f"--gpus-per-node={self.gpus_per_node}",
                     f"--cpus-per-task={self.gpus_per_node * self.cpus_per_gpu}"]
        else:
            opts += [f"--cpus-per-task={max(1, self.nproc_per_node)}"]
        opts.append(f"--time={self.time_train if step in REQUEUED_STEPS else self.time_short}")
        if step in REQUEUED_STEPS:
            # B: the batch shell gets USR1 (job.sbatch forwards it to the trainer, which checkpoints), then requeues
            opts += ["--requeue", f"--signal=B:USR1@{self.signal_lead_s}", "--open-mode=append"]
        return opts + self.extra


class Ledger:
    """What earlier submissions queued: job id -> SLURM id (``<job>``, or ``<array>_<index>`` for an array task),
    kept in the runs root."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))


def queued_ids(slurm_ids: list[str]) -> set[str]:
    """Which of ``slurm_ids`` are still pending or running (``squeue``; requeued jobs count as queued)."""
    if not slurm_ids:
        return set()
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr.strip()}")
    live = set(out.stdout.split())
    return {s for s in slurm_ids if s in live}


def _waves(plan: Plan) -> dict[str, int]:
    """Per job, how many jobs of its own step it waits on in a chain (0 for most; 1 for a distilled ancestry)."""
    wave: dict[str, int] = {}

    def level(job_id: str) -> int:
        if job_id not in wave:
            job = plan.jobs[job_id]
            wave[job_id] = max((level(d) + 1 for d in job.deps if plan.jobs[d].step == job.step), default=0)
        return wave[job_id]

    for job_id in plan.jobs:
        level(job_id)
    return wave


def with_dependants(plan: Plan, job_ids: set[str]) -> set[str]:
    """``job_ids`` and every job that (transitively) depends on one of them (one pass: the plan is in order)."""
    out = set(job_ids)
    for job in plan.jobs.values():
        if any(d in out for d in job.deps):
            out.add(job.job_id)
    return out


def _compact(tokens: set[str], arrays: dict[str, int]) -> list[str]:
    """SLURM ids to depend on: ``A_0 ... A_n`` of an array ``A`` of this submission, all of them, become ``A``."""
    out = set(tokens)
    for array in {t.rsplit("_", 1)[0] for t in tokens if "_" in t} & arrays.keys():
        tasks = {f"{array}_{i}" for i in range(arrays[array])}
        if tasks <= out:
            out = (out - tasks) | {array}
    return sorted(out)


@dataclass
class Batch:
    """One ``sbatch``: jobs of one step with the same dependencies (an array), or a single job."""

    name: str
    step: str
    jobs: list[Job]
    after: list[str]
    """SLURM ids it waits on (``afterok``; ``afterany`` for the aggregate job)."""

    def command(self, plan: Plan, plan_path: Path, roots: Roots, cluster: Cluster, list_dir: Path, force: bool,
                sbatch: str) -> list[str]:
        logs = roots.runs / "slurm" / "logs"
        cmd = [sbatch, "--parsable", f"--job-name=kb-{plan.suite}-{self.name}"]
        export: dict[str, object] = {"KB_PLAN": plan_path}
        if len(self.jobs) == 1:
            cmd.append(f"--output={logs / f'{self.name}-%j.out'}")
            export.update({"KB_JOB": self.jobs[0].job_id, "KB_JOB_LIST": ""})
        else:
            throttle = f"%{cluster.max_parallel}" if cluster.max_parallel else ""
            cmd += [f"--array=0-{len(self.jobs) - 1}{throttle}", f"--output={logs / f'{self.name}-%A_%a.out'}"]
            list_dir.mkdir(parents=True, exist_ok=True)
            job_list = list_dir / f"{self.name}.txt"
            job_list.write_text("".join(j.job_id + "\n" for j in self.jobs))
            export.update({"KB_JOB": "", "KB_JOB_LIST": job_list})
        cmd += cluster.resources(self.step)
        if self.after:
            kind = "afterany" if self.step == "aggregate" else "afterok"
            cmd += [f"--dependency={kind}:{':'.join(self.after)}", "--kill-on-invalid-dep=yes"]
        export.update({"KB_RUNS": roots.runs.resolve(), "KB_RESULTS": roots.results.resolve(), "KB_REPO": REPO,
                       "KB_PYTHON": sys.executable, "KB_STEP": self.step, "KB_FORCE": "1" if force else "",
                       "KB_GPUS_PER_NODE": cluster.gpus_per_node, "KB_NPROC_PER_NODE": cluster.nproc_per_node,
                       "KB_ENV_FILE": cluster.env_file})
        return cmd + ["--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items()), str(TEMPLATE)]


def submit(plan: Plan, roots: Roots, cluster: Cluster, *, force: bool = False, keep_stale: bool = False,
           dry_run: bool = False, sbatch: str = "sbatch",
           echo: Callable[[str], None] | None = None) -> dict[str, str]:
    """Submit every unfinished job of ``plan`` with per-job dependencies; returns batch name -> SLURM id (the
    array's or the single job's), or -> the sbatch command on a dry run. Batch names are ``<step>[.<wave>]``,
    with ``-<k>`` appended where a step has several batches. ``echo`` gets a line on why jobs are submitted."""
    plan_path = plan.save(roots.runs / "plans" / f"{plan.suite}-{plan.plan_id()}.json")
    ledger = Ledger(roots.runs / "slurm" / "ledger.json")
    known = {j: ledger.entries[j] for j in plan.jobs if j in ledger.entries}
    try:
        in_queue = queued_ids(list(known.values()))
    except (OSError, RuntimeError):
        if not dry_run:
            raise
        in_queue = set()  # a dry run away from the cluster: as if nothing were queued
    queued = {j: sid for j, sid in known.items() if sid in in_queue}
    states = plan_states(plan, roots, keep_stale=keep_stale, force=force)
    # a job rerun changes what its dependants read: they run again after it (the aggregate job included)
    wanted_ids = with_dependants(plan, {j for j, s in states.items() if s.todo}) - set(queued)
    wanted = [j for j in plan.jobs.values() if j.job_id in wanted_ids]
    if echo is not None:
        _explain(wanted, states, queued, echo)
    slurm_of: dict[str, str] = dict(queued)  # job id -> the SLURM id its dependants wait on
    arrays: dict[str, int] = {}  # arrays of this submission -> their size
    list_dir = roots.runs / "slurm" / plan.plan_id()
    wave = _waves(plan)
    submitted: dict[str, str] = {}
    for step, level in sorted({(j.step, wave[j.job_id]) for j in wanted}, key=lambda k: (STEPS.index(k[0]), k[1])):
        # step by step (waves where jobs of a step wait on each other: a distilled ancestry after its teacher),
        # so that every dependency has its SLURM id before its dependants are grouped by what they wait on
        groups: dict[tuple[str, ...], list[Job]] = {}
        for job in (j for j in wanted if j.step == step and wave[j.job_id] == level):
            after = tuple(_compact({slurm_of[d] for d in job.deps if d in slurm_of}, arrays))
            groups.setdefault(after, []).append(job)
        base = step if level == 0 else f"{step}.{level}"
        for k, (after, jobs) in enumerate(groups.items()):
            batch = Batch(base if len(groups) == 1 else f"{base}-{k}", step, jobs, list(after))
            cmd = batch.command(plan, plan_path, roots, cluster, list_dir, force, sbatch)
            if dry_run:
                submitted[batch.name] = shlex.join(cmd)
                slurm_id = f"DRYRUN-{batch.name}"
            else:
                (roots.runs / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
                out = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if out.returncode != 0:
                    ledger.save()  # what was submitted so far stays known: a rerun depends on it, not duplicates it
                    raise RuntimeError(f"sbatch for {batch.name} failed: {out.stderr.strip()}")
                slurm_id = out.stdout.strip().split(";")[0]
                submitted[batch.name] = slurm_id
            if len(jobs) == 1:
                slurm_of[jobs[0].job_id] = slurm_id
            else:
                arrays[slurm_id] = len(jobs)
                slurm_of.update({job.job_id: f"{slurm_id}_{i}" for i, job in enumerate(jobs)})
            if not dry_run:
                ledger.entries.update({job.job_id: slurm_of[job.job_id] for job in jobs})
    if not dry_run:
        ledger.save()
    return submitted


def _explain(wanted: list[Job], states: dict[str, JobState], queued: dict[str, str],
             echo: Callable[[str], None]) -> None:
    """One line per step: how many jobs go in and why (state counts); then why records are not trusted any more
    (changed or stale; the first few)."""
    if queued:
        echo(f"still queued from an earlier submission: {len(queued)} job(s) (depended on, not resubmitted)")
    for step in STEPS:
        jobs = [j for j in wanted if j.step == step]
        if not jobs:
            continue
        counts: dict[str, int] = {}
        for job in jobs:
            state = states[job.job_id].state if states[job.job_id].todo else "after a rerun"
            counts[state] = counts.get(state, 0) + 1
        echo(f"{step}: {len(jobs)} to run (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")")
    untrusted = [j.job_id for j in wanted if states[j.job_id].state in ("changed", "stale")]
    for job_id in untrusted[:10]:
        echo(f"  {job_id}: {states[job_id].state}: {states[job_id].reason}")
    if len(untrusted) > 10:
        echo(f"  ... and {len(untrusted) - 10} more")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("submit", help="submit a suite's unfinished jobs")
    p.add_argument("--suite", default=os.environ.get("KB_SUITE", "tiny"))
    p.add_argument("--runs", type=Path, default=Path(os.environ.get("KINDBENCH_RUNS", "runs")))
    p.add_argument("--results", type=Path,
                   help="records, leaderboards, plots; default <runs>/results/<suite>, as for kindbench run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="submit jobs that already have a record")
    p.add_argument("--keep-stale", action="store_true",
                   help="accept records made by other code (stale) as done instead of re-running them")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    args = parser.parse_args(argv)
    try:
        suite, plan = build_plan(args.suite, args.sets)
    except SuiteError as err:  # bad input is reported before anything is submitted
        print(f"kindbench submit: {err}", file=sys.stderr)
        return 2
    roots = Roots(args.runs, args.results or default_results(args.runs, suite.name))
    try:
        ids = submit(plan, roots, Cluster.from_env(), force=args.force, keep_stale=args.keep_stale,
                     dry_run=args.dry_run, echo=print)
    except (RuntimeError, OSError) as err:
        print(f"kindbench submit: {err}", file=sys.stderr)
        return 1
    if not ids:
        print(f"kindbench submit: nothing to submit for suite {suite.name!r} (every job is done or queued)")
    if args.dry_run:
        for name, command in ids.items():
            print(f"{name:10s} {command}")
        return 0
    by_step: dict[str, list[str]] = {}
    for name, slurm_id in ids.items():  # batch names are <step>[.<wave>][-<k>]
        by_step.setdefault(name.split(".")[0].split("-")[0], []).append(slurm_id)
    for step, slurm_ids in by_step.items():
        print(f"{step:10s} {' '.join(slurm_ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
