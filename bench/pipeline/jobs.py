"""Run one planned job and write its record: the same code path for the local and the SLURM executors.

    python -m bench.pipeline.jobs --plan PLAN.json --job JOB_ID --runs RUNS --results RESULTS
    python -m bench.pipeline.jobs --plan PLAN.json --step train --index $SLURM_ARRAY_TASK_ID ...   (array tasks)
    torchrun --nproc_per_node 8 -m bench.pipeline.jobs ...                                            (multi-GPU steps)

Bulk artefacts (checkpoints, samples, references) go under ``RUNS``; records, leaderboards and plots under
``RESULTS`` (``RESULTS/records`` for successful jobs, ``RESULTS/failed`` for the rest). What a step computes lives
in ``bench.pipeline.steps.<step>``; this module routes a job there and writes its record: the code fingerprint, the
digests of the inputs it consumed and the sha256 of every output. A job whose record is trustworthy
(``bench.pipeline.status``) is not run again unless forced; a failed job leaves a failed record with its one-line error
and never a half-written success.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.config.schema import RunConfig, from_dict
from bench.pipeline.plan import Job, Plan
from bench.pipeline.status import RESTART_STATES, consumed_inputs, job_state, retire_outputs
from bench.pipeline.steps import Roots, StepResult
from bench.records.fingerprint import STEP_MODULES, code_fingerprint
from bench.records.hashing import file_sha256
from bench.records.store import RecordStore, new_record, new_run_info
from bench.run.engine import DistContext, barrier, init_distributed, shutdown
from bench.run.preemption import EXIT_REQUEUE
from bench.run.rundir import export_ref
from bench.run.train import Preempted

__all__ = ["Roots", "run_job", "main"]


def _run_step(job: Job, roots: Roots, ctx: DistContext, store: RecordStore) -> StepResult:
    module = importlib.import_module(STEP_MODULES[job.step])
    return module.run(job, roots, ctx, store)


def _outputs(result: StepResult, roots: Roots, ctx: DistContext) -> dict[str, dict[str, str]]:
    """The files a job produced, with their sha256: a later run trusts the record only while they still match."""
    if not ctx.is_main:
        return {}
    return {name: {"path": path, "sha256": file_sha256(roots.artefact(path))} for name, path in result.outputs.items()}


# --------------------------------------------------------------------------------------------------------------
#                                           One job -> one record
# --------------------------------------------------------------------------------------------------------------


def _run_info(plan: Plan, job: Job, store: RecordStore) -> dict[str, Any]:
    info = job.info
    cfg = from_dict(job.config) if job.config else None
    ancestry = None
    if info.get("ancestry_job"):
        parent = plan.jobs[info["ancestry_job"]]
        ancestry = {"job_id": parent.job_id, "path": export_ref(parent.run_id), "sha256": ""}
    run_info = new_run_info(job_id=job.job_id, run_id=job.run_id or job.job_id, step=job.step, suite=plan.suite,
                        benchmark=info.get("benchmark", ""), task=info.get("task", ""), arch=info.get("arch", ""),
                        method=info.get("method", ""), family=info.get("family", ""),
                        variant=info.get("variant", ""), seed=int(info.get("seed", 0)),
                        config=job.config or {"info": info}, config_hash=cfg.config_hash() if cfg else "",
                        ancestry=ancestry, depends_on=job.deps)
    # what the job is made of: its code, and the exact outputs of the jobs it consumes
    # (bench.pipeline.status compares both)
    run_info["code"] = code_fingerprint(job.step, info.get("method") or None)
    run_info["inputs"] = consumed_inputs(job, store)
    if job.step in ("sample", "evaluate"):
        run_info["protocol_settings"] = info.get("sample") if job.step == "sample" else info.get("eval")
    return run_info


def run_job(plan: Plan, job: Job, roots: Roots, ctx: DistContext, *, force: bool = False) -> dict[str, Any] | None:
    """Run ``job`` (every rank calls this) and write its record on rank 0; returns the record (rank 0) or None.

    Without ``force`` a job whose record is trustworthy (``bench.pipeline.status``) is not run again. A job that is run
    over an untrusted record (stale code, changed or missing outputs or inputs) first moves its old outputs aside."""
    store = RecordStore(roots.results)
    state = job_state(plan, job.job_id, roots)
    if state.state == "done" and not force:
        return store.read(job.job_id)
    if ctx.is_main and state.state in RESTART_STATES:
        retire_outputs(job, roots)
    barrier(ctx)
    run_info = _run_info(plan, job, store)
    t0 = time.perf_counter()
    try:
        result = _run_step(job, roots, ctx, store)
    except Preempted:
        raise  # checkpointed and asked to stop: not a failure; the requeued job resumes
    except Exception as err:  # a failed job is recorded, never silently lost; the executor goes on
        if ctx.is_main:
            detail = traceback.format_exc(limit=3)
            record = new_record(run_info, status="failed", error=err,
                                timings={"step_wall_s": time.perf_counter() - t0}, meta_info={"traceback": detail})
            store.write(record, force=True)
        raise
    if not ctx.is_main:
        return None
    if run_info.get("ancestry") is not None:
        run_info["ancestry"]["sha256"] = result.ancestry_sha256
    record = new_record(run_info, timings={"step_wall_s": time.perf_counter() - t0}, **result.blocks)
    record["outputs"] = _outputs(result, roots, ctx)
    store.write(record, force=store.exists(job.job_id))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--job", help="job id")
    parser.add_argument("--job-list", type=Path, help="with --index: a file of job ids, one per line (SLURM arrays)")
    parser.add_argument("--index", type=int)
    parser.add_argument("--runs", required=True, type=Path)
    parser.add_argument("--results", required=True, type=Path)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--show-run-dir", action="store_true",
                        help="print the job's run directory (empty for jobs without one) and exit")
    args = parser.parse_args(argv)
    plan = Plan.from_json(args.plan.read_text())
    if args.job:
        job_id = args.job
    elif args.job_list is not None and args.index is not None:
        job_id = args.job_list.read_text().split()[args.index]
    else:
        parser.error("give --job, or --job-list with --index")
    if job_id not in plan.jobs:
        parser.error(f"job {job_id!r} is not in plan {args.plan}")
    job = plan.jobs[job_id]
    roots = Roots(args.runs, args.results)
    if args.show_run_dir:
        print(roots.runs / job.run_id if job.run_id and job.step in ("pretrain", "train") else "")
        return 0
    ctx = init_distributed(RunConfig().engine if job.config is None else from_dict(job.config).engine)
    try:
        run_job(plan, job, roots, ctx, force=args.force)
    except Preempted:
        return EXIT_REQUEUE
    except Exception as err:  # noqa: BLE001 - reported as one line; the record holds the traceback
        print(f"kindbench job {job.job_id}: failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
