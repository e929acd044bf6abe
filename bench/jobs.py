"""Run one planned job and write its record: the same code path for the local and the SLURM executors.

    python -m bench.jobs --plan PLAN.json --job JOB_ID --runs RUNS --results RESULTS
    python -m bench.jobs --plan PLAN.json --stage transfer --index $SLURM_ARRAY_TASK_ID ...   (array tasks)
    torchrun --nproc_per_node 8 -m bench.jobs ...                                            (multi-GPU stages)

Bulk artefacts (checkpoints, samples, references) go under ``RUNS``; records, leaderboards and plots under
``RESULTS`` (``RESULTS/records`` for successful jobs, ``RESULTS/failed`` for the rest). A job whose success record
exists is not run again unless forced; a failed job leaves a failed record with its one-line error and never a
half-written success.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import RunConfig, from_dict
from bench.engine import DistContext, init_distributed, shutdown
from bench.hashing import file_sha256
from bench.plan import Job, Plan
from bench.preemption import EXIT_REQUEUE
from bench.store import RecordStore, metric, new_record, new_run_info
from bench.train import Preempted, train


@dataclass(frozen=True)
class Roots:
    runs: Path
    """Bulk artefacts: run directories, samples, references (git-ignored)."""
    results: Path
    """Records, leaderboards, plots (small; committed for shipped suites)."""

    def __post_init__(self) -> None:
        # absolute: records point at artefacts, and jobs may run from another working directory (SLURM)
        object.__setattr__(self, "runs", Path(self.runs).resolve())
        object.__setattr__(self, "results", Path(self.results).resolve())

    @property
    def store(self) -> RecordStore:
        return RecordStore(self.results)

    def reference_dir(self, job: Job) -> Path:
        return self.runs / "references" / job.job_id


# --------------------------------------------------------------------------------------------------------------
#                                                 Stages
# --------------------------------------------------------------------------------------------------------------


def _train(job: Job, roots: Roots, ctx: DistContext) -> dict[str, Any]:

    cfg = from_dict(job.config)
    cfg.run.out_dir = str(roots.runs)
    summary = train(cfg, ctx)
    final = summary.get("final") or {}
    accounting = summary["accounting"] or {}
    return {"train_info": {
        "steps": summary["steps"], "images_seen": summary["images_seen"], "global_batch": cfg.schedule.global_batch,
        "world_size": ctx.world_size, "wall_s": summary["wall_s"],
        "gpu_hours": summary["wall_s"] * ctx.world_size / 3600 if ctx.device.type == "cuda" else 0.0,
        "peak_mem_gb": summary["peak_mem_gb"], "final_loss": final.get("loss"),
        "loss_curve": str(roots.runs / summary["run_id"] / "train.jsonl"), "accounting": accounting,
        "train_gmacs_total": accounting.get("gmacs_fwd_trained", 0.0) * 3 * summary["images_seen"],
        "resumed_from_step": summary["resumed_from_step"]}}


def _sample(job: Job, roots: Roots, ctx: DistContext) -> dict[str, Any]:
    from bench.sample import sample_run

    info = sample_run(roots.runs / job.run_id, [], ctx)
    keep = ("npz", "num_samples", "scheduler", "num_steps", "cfg_scale", "label_mode", "seed", "grid_png",
            "clip_denoised")
    return {"sample_info": {**{k: info[k] for k in keep}, "npz_sha256": file_sha256(Path(info["npz"])),
                            "tag": info["tag"], "guide_channels": info["guide_channels"]}}


def _prepare(job: Job, roots: Roots, ctx: DistContext) -> dict[str, Any]:
    """The reference a task is scored against: held-out real images + statistics in the extractor's space."""
    data, protocol = job.info["data"], job.info["eval"]
    extractor_kind = protocol.get("extractor", "synthetic")
    if extractor_kind == "synthetic":
        if data["source"] != "synthetic":
            raise ValueError("eval.extractor = synthetic scores only the embedded synthetic data")
        from bench.data.synthetic import SyntheticImages, synthetic_split
        from bench.metrics.domain import load_domain_extractor
        from bench.metrics.domain_eval import build_domain_reference

        # held out: image indices after the training ones, so no reference image was trained on
        held_out = SyntheticImages(synthetic_split(data["split"]), image_size=data["image_size"],
                                   per_class=int(protocol.get("ref_per_class", 64)), domain=data["domain"],
                                   seed=data["seed"], first_index=data["per_class"])
        extractor = load_domain_extractor(protocol.get("cache_dir") or None)
        path = roots.reference_dir(job) / "reference.npz"
        info = build_domain_reference(held_out.images_uint8(), path, extractor,
                                      meta={"task": job.info["task"], "split": data["split"], "domain": data["domain"],
                                            "first_index": data["per_class"], "seed": data["seed"]})
        return {"reference": {**info, "path": str(path)}}
    reference = Path(os.path.expandvars(protocol.get("reference", "")))
    if not reference.is_file():
        raise FileNotFoundError(f"reference batch {reference} not found: set eval.reference (for ImageNet 256 the "
                                f"ADM file VIRTUAL_imagenet256_labeled.npz, e.g. via $KINDBENCH_ADM_REF)")
    return {"reference": {"path": str(reference), "sha256": file_sha256(reference)}}


def _evaluate(job: Job, roots: Roots, ctx: DistContext, store: RecordStore) -> dict[str, Any]:
    sample_rec, prepare_rec = store.read(job.info["sample_job"]), store.read(job.info["prepare_job"])
    if sample_rec is None or prepare_rec is None:
        raise FileNotFoundError(f"evaluate {job.job_id}: the sample or prepare record is missing")
    samples = Path(sample_rec["sample_info"]["npz"])
    reference = prepare_rec["extra"]["reference"]
    protocol = job.info["eval"]
    s = sample_rec["sample_info"]
    if protocol.get("extractor", "synthetic") == "synthetic":
        from bench.metrics.domain import load_domain_extractor
        from bench.metrics.domain_eval import evaluate_domain

        extractor = load_domain_extractor(protocol.get("cache_dir"))
        result = evaluate_domain(samples, Path(reference["path"]), extractor,
                                 protocol={"cfg_scale": s["cfg_scale"], "sampler": s["scheduler"],
                                           "num_steps": s["num_steps"],
                                           "clip_denoised": bool(s.get("clip_denoised", False))})
        result["protocol"].setdefault("extractor_sha256", extractor.sha256)
    else:
        from bench.metrics.evaluate import EvalOptions, evaluate

        result = evaluate(EvalOptions(samples=samples, ref=Path(reference["path"]),
                                      weights_dir=protocol.get("weights_dir") or None, fdd=protocol.get("fdd", "auto"),
                                      out=samples.with_suffix(".eval.json"), overwrite=True))
    metrics = {name: metric(m["value"], m["higher_is_better"]) for name, m in result["metrics"].items()}
    # the reference is the prepare job's output: its id names it, its sha256 pins it
    protocol_out = {"reference_id": job.info["prepare_job"], "reference_sha256": reference.get("sha256", ""),
                    **result["protocol"], "cfg_scale": s["cfg_scale"], "sampler": s["scheduler"],
                    "num_steps": s["num_steps"], "clip_denoised": bool(s.get("clip_denoised", False))}
    return {"eval_info": {"metrics": metrics, "protocol": protocol_out}}


def _aggregate(job: Job, roots: Roots, ctx: DistContext) -> dict[str, Any]:
    from bench.leaderboard import build_leaderboards
    from bench.plots import make_plots

    tables = build_leaderboards(roots.results, roots.results / "leaderboard")
    plots = make_plots(roots.results / "leaderboard", roots.results / "plots")
    return {"aggregate": {"tables": [str(p) for p in tables], "plots": [str(p) for p in plots]}}


# --------------------------------------------------------------------------------------------------------------
#                                           One job -> one record
# --------------------------------------------------------------------------------------------------------------


def _run_info(plan: Plan, job: Job) -> dict[str, Any]:
    info = job.info
    cfg = from_dict(job.config) if job.config else None
    ancestry = None
    if info.get("ancestry_job"):
        parent = plan.jobs[info["ancestry_job"]]
        ancestry = {"job_id": parent.job_id, "path": f"{parent.run_id}/export.safetensors", "sha256": ""}
    return new_run_info(job_id=job.job_id, run_id=job.run_id or job.job_id, stage=job.stage, suite=plan.suite,
                        benchmark=info.get("benchmark", ""), task=info.get("task", ""), arch=info.get("arch", ""),
                        method=info.get("method", ""), family=info.get("family", ""),
                        variant=info.get("variant", ""), seed=int(info.get("seed", 0)),
                        config=job.config or {"info": info}, config_hash=cfg.config_hash() if cfg else "",
                        ancestry=ancestry, depends_on=job.deps)


def run_job(plan: Plan, job: Job, roots: Roots, ctx: DistContext, *, force: bool = False) -> dict[str, Any] | None:
    """Run ``job`` (every rank calls this) and write its record on rank 0; returns the record (rank 0) or None."""
    store = roots.store
    if store.exists(job.job_id) and not force:
        return store.read(job.job_id)
    run_info = _run_info(plan, job)
    t0 = time.perf_counter()
    try:
        if job.stage in ("ancestry", "transfer"):
            blocks = _train(job, roots, ctx)
        elif job.stage == "sample":
            blocks = _sample(job, roots, ctx)
        elif job.stage == "prepare":
            blocks = {"extra": _prepare(job, roots, ctx)}
        elif job.stage == "evaluate":
            blocks = _evaluate(job, roots, ctx, store)
        else:
            blocks = {"extra": _aggregate(job, roots, ctx)}
    except Preempted:
        raise  # checkpointed and asked to stop: not a failure; the requeued job resumes
    except Exception as err:  # a failed job is recorded, never silently lost; the executor goes on
        if ctx.is_main:
            detail = traceback.format_exc(limit=3)
            record = new_record(run_info, status="failed", error=err,
                                timings={"stage_wall_s": time.perf_counter() - t0}, meta_info={"traceback": detail})
            store.write(record, force=True)
        raise
    if not ctx.is_main:
        return None
    record = new_record(run_info, timings={"stage_wall_s": time.perf_counter() - t0}, **blocks)
    store.write(record, force=force)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
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
        print(roots.runs / job.run_id if job.run_id and job.stage in ("ancestry", "transfer") else "")
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
