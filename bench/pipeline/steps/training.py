"""The ``pretrain`` and ``train`` steps: train one run (``bench.run.train``) and describe what it produced."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.config.schema import from_dict
from bench.pipeline.steps import Roots, StepResult
from bench.run.rundir import RunDir, export_ref
from bench.run.train import train
from methods import get_method

if TYPE_CHECKING:  # types only: the record plumbing and the plan are not part of what a step computes
    from bench.pipeline.plan import Job
    from bench.records.store import RecordStore
    from bench.run.engine import DistContext


def run(job: Job, roots: Roots, ctx: DistContext, store: RecordStore) -> StepResult:
    cfg = from_dict(job.config)
    cfg.run.out_dir = str(roots.runs)
    summary = train(cfg, ctx)
    final = summary.get("final") or {}
    accounting = summary["accounting"] or {}
    info: dict[str, Any] = {
        "steps": summary["steps"], "images_seen": summary["images_seen"], "global_batch": cfg.schedule.global_batch,
        "world_size": ctx.world_size, "wall_s": summary["wall_s"],
        "gpu_hours": summary["wall_s"] * ctx.world_size / 3600 if ctx.device.type == "cuda" else 0.0,
        "peak_mem_gb": summary["peak_mem_gb"], "peak_mem_kind": summary["peak_mem_kind"],
        "final_loss": final.get("loss"), "loss_curve": str(RunDir.of(roots.runs, summary["run_id"]).train_log),
        "accounting": accounting,
        "train_gmacs_total": accounting.get("gmacs_fwd_trained", 0.0) * 3 * summary["images_seen"],
        "resumed_from_step": summary["resumed_from_step"],
        # every field of the method's Config, defaults included: the record says what ran, not what was typed
        "method_options": get_method(cfg.method.name, cfg.method.options).config.to_dict(),
        "data": summary["data"]}
    ancestry = summary.get("ancestry") or {}
    return StepResult({"train_info": info}, {"export": export_ref(summary["run_id"])},
                       ancestry_sha256=ancestry.get("sha256", ""))
