"""The ``prepare`` step: the reference a task is scored against (held-out real images and their statistics)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bench.pipeline.steps import Roots, StepResult

if TYPE_CHECKING:  # types only: the record plumbing and the plan are not part of what a step computes
    from bench.pipeline.plan import Job
    from bench.records.store import RecordStore
    from bench.run.engine import DistContext


def run(job: Job, roots: Roots, ctx: DistContext, store: RecordStore) -> StepResult:
    data, protocol = job.info["data"], job.info["eval"]
    if protocol["extractor"] == "synthetic":
        if data["source"] != "synthetic":
            raise ValueError("eval.extractor = synthetic scores only the embedded synthetic data")
        from bench.data.synthetic import SyntheticImages, synthetic_split
        from bench.metrics.domain_eval import build_domain_reference
        from bench.metrics.networks.domain import load_domain_extractor

        # held out: image indices after the training ones, so no reference image was trained on
        held_out = SyntheticImages(synthetic_split(data["split"]), image_size=data["image_size"],
                                   per_class=int(protocol["ref_per_class"]), domain=data["domain"],
                                   seed=data["seed"], first_index=data["per_class"])
        extractor = load_domain_extractor(protocol["cache_dir"] or None)
        path = roots.reference_dir(job.job_id) / "reference.npz"
        info = build_domain_reference(held_out.images_uint8(), path, extractor,
                                      meta={"task": job.info["task"], "split": data["split"], "domain": data["domain"],
                                            "first_index": data["per_class"], "seed": data["seed"]})
        return StepResult({"extra": {"reference": {**info, "path": roots.relative(path)}}},
                           {"reference": roots.relative(path)})
    reference = Path(os.path.expandvars(protocol["reference"]))
    if not reference.is_file():
        raise FileNotFoundError(f"reference batch {reference} not found: set eval.reference (for ImageNet 256 the "
                                f"ADM file VIRTUAL_imagenet256_labeled.npz, e.g. under $KINDBENCH_REFS)")
    from bench.records.hashing import file_sha256

    return StepResult({"extra": {"reference": {"path": str(reference), "sha256": file_sha256(reference)}}},
                       {"reference": str(reference)})
