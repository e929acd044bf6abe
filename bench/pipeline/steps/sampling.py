"""The ``sample`` step: draw a trained run's samples with the sample job's own settings (the suite's protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bench.config.schema import SampleConfig, section_from_dict
from bench.pipeline.steps import Roots, StepResult
from bench.records.hashing import file_sha256
from bench.run.sample import sample_run

if TYPE_CHECKING:  # types only: the record plumbing and the plan are not part of what a step computes
    from bench.pipeline.plan import Job
    from bench.records.store import RecordStore
    from bench.run.engine import DistContext


#: sample_info keys copied from ``sample_run``'s answer.
KEEP = ("num_samples", "scheduler", "num_steps", "cfg_scale", "label_mode", "seed", "clip_denoised",
        "guide_channels", "tag", "config")


def run(job: Job, roots: Roots, ctx: DistContext, store: RecordStore) -> StepResult:
    settings = section_from_dict(SampleConfig, job.info["sample"], "sample")
    info = sample_run(roots.runs / job.run_id, settings, ctx)
    npz = Path(info["npz"])
    block = {**{k: info[k] for k in KEEP}, "npz": str(npz), "grid_png": info["grid_png"],
             "npz_sha256": file_sha256(npz) if ctx.is_main else ""}
    return StepResult({"sample_info": block},
                      {"samples": roots.relative(npz), "labels": roots.relative(info["labels"])})
