"""The ``prepare`` step: the reference a task is scored against (held-out real images and their statistics).

On the embedded synthetic data it also scores the floor: a second set of held-out real images, as many as the suite
samples (labels balanced over the task's classes, as ``sample.label_mode = balanced`` draws them), evaluated against
the reference exactly as samples are. No generator can be expected to beat it; every leaderboard shows it as its
floor row, and its class accuracy is the classifier's ceiling."""

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
        return _synthetic_reference(job, roots, data, protocol)
    reference = Path(os.path.expandvars(protocol["reference"]))
    if not reference.is_file():
        raise FileNotFoundError(f"reference batch {reference} not found: set eval.reference (for ImageNet 256 the "
                                f"ADM file VIRTUAL_imagenet256_labeled.npz, e.g. under $KINDBENCH_REFS)")
    from bench.records.hashing import file_sha256

    return StepResult({"extra": {"reference": {"path": str(reference), "sha256": file_sha256(reference)}}},
                       {"reference": str(reference)})


def _synthetic_reference(job: Job, roots: Roots, data: dict, protocol: dict) -> StepResult:
    import numpy as np

    from bench.data.synthetic import SyntheticImages, synthetic_split
    from bench.metrics.domain_eval import build_domain_reference, evaluate_domain
    from bench.metrics.networks.domain import load_domain_extractor
    from bench.records.atomic import atomic_path

    if data["source"] != "synthetic":
        raise ValueError("eval.extractor = synthetic scores only the embedded synthetic data")
    classes = synthetic_split(data["split"])
    ref_per_class = int(protocol["ref_per_class"])

    def held_out(first_index: int, per_class: int) -> SyntheticImages:  # indices never used in training
        return SyntheticImages(classes, image_size=data["image_size"], per_class=per_class, domain=data["domain"],
                               seed=data["seed"], first_index=first_index)

    reference = held_out(data["per_class"], ref_per_class)
    extractor = load_domain_extractor(protocol["cache_dir"] or None)
    folder = roots.reference_dir(job.job_id)
    path = folder / "reference.npz"
    info = build_domain_reference(reference.images_uint8(), path, extractor,
                                  meta={"task": job.info["task"], "split": data["split"], "domain": data["domain"],
                                        "first_index": data["per_class"], "seed": data["seed"]},
                                  labels=reference.labels, class_ids=classes)
    extra: dict = {"reference": {**info, "path": roots.relative(path)}}
    n_floor = int(job.info.get("floor_samples") or 0)
    if n_floor:
        k = len(classes)
        floor_set = held_out(data["per_class"] + ref_per_class, -(-n_floor // k))
        # class-major in the set; sample i of the floor is image i // k of class i % k (balanced labels)
        order = np.array([(i % k) * floor_set.per_class + i // k for i in range(n_floor)])
        floor_path = folder / "floor.npz"
        with atomic_path(floor_path, suffix=".tmp.npz") as tmp:
            np.savez(tmp, arr_0=floor_set.images_uint8()[order], labels=floor_set.labels[order])
        record = evaluate_domain(floor_path, path, extractor, protocol={"source": "held-out real images"})
        extra["floor"] = {"metrics": record["metrics"], "n_samples": record["n_samples"],
                          "first_index": data["per_class"] + ref_per_class,
                          "sample_intervals": record["sample_intervals"]}
    return StepResult({"extra": extra}, {"reference": roots.relative(path)})
