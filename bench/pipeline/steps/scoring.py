"""The ``evaluate`` step: score a sample job's images against its task's reference with the suite's metric
protocol (``EvalConfig``); the numbers carry that protocol and the ids and checksums of what they compare."""

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
    sample_rec, prepare_rec = store.read(job.info["sample_job"]), store.read(job.info["prepare_job"])
    if sample_rec is None or prepare_rec is None:
        raise FileNotFoundError(f"evaluate {job.job_id}: the sample or prepare record is missing")
    samples = roots.artefact(sample_rec["outputs"]["samples"]["path"])
    reference = prepare_rec["extra"]["reference"]
    reference_path = roots.artefact(prepare_rec["outputs"]["reference"]["path"])
    protocol = job.info["eval"]
    s = sample_rec["sample_info"]
    if protocol["extractor"] == "synthetic":
        from bench.metrics.domain_eval import evaluate_domain
        from bench.metrics.networks.domain import load_domain_extractor

        extractor = load_domain_extractor(protocol["cache_dir"] or None)
        result = evaluate_domain(samples, reference_path, extractor,
                                 protocol={"cfg_scale": s["cfg_scale"], "sampler": s["scheduler"],
                                           "num_steps": s["num_steps"],
                                           "clip_denoised": bool(s.get("clip_denoised", False))})
        result["protocol"].setdefault("extractor_sha256", extractor.sha256)
    else:
        from bench.metrics.evaluate import EvalOptions, evaluate

        fdd_reference = protocol.get("fdd_reference") or ""
        result = evaluate(EvalOptions(samples=samples, ref=reference_path,
                                      weights_dir=protocol["weights_dir"] or None, fdd=FDD_MODES[protocol["fdd"]],
                                      fdd_ref=Path(os.path.expandvars(fdd_reference)) if fdd_reference else None,
                                      out=samples.with_suffix(".eval.json"), overwrite=True))
        result["protocol"] = inception_protocol(result)
    metrics = {name: {"value": None if m["value"] is None else float(m["value"]),
                     "higher_is_better": bool(m["higher_is_better"])} for name, m in result["metrics"].items()}
    # the reference is the prepare job's output: its id names it, its sha256 pins it
    protocol_out = {"reference_id": job.info["prepare_job"], "reference_sha256": reference.get("sha256", ""),
                    **result["protocol"], "cfg_scale": s["cfg_scale"], "sampler": s["scheduler"],
                    "num_steps": s["num_steps"], "clip_denoised": bool(s.get("clip_denoised", False)),
                    "samples_sha256": sample_rec["outputs"]["samples"]["sha256"]}
    # the finite-sample noise of each number, and the ceiling class_acc is read against (domain protocol only)
    extra = {key: result[key] for key in ("sample_intervals", "class_acc_real") if result.get(key) is not None}
    return StepResult({"eval_info": {"metrics": metrics, "protocol": protocol_out, **extra}})


#: ``eval.fdd`` of a suite as the metric evaluator's ``--fdd`` (``true`` must fail when FDD cannot be computed).
FDD_MODES = {"auto": "auto", "true": "on", "false": "off"}

#: The feature extractor an ADM-protocol evaluation names in its job record (Inception-V3, TF weights).
INCEPTION_EXTRACTOR = "inception-v3-tf"


def inception_protocol(record: dict) -> dict:
    """An ADM-protocol evaluation record's protocol, plus what every job record's protocol names
    (``bench.records.store.EvalProtocol``): the sample count and the extractor with its weights' sha256 (DINOv2's
    too when FDD was computed, since FDD rows are comparable only under the same DINOv2 weights)."""
    weights = record["weights"]
    return {**record["protocol"], "n_samples": int(record["n_samples"]), "extractor": INCEPTION_EXTRACTOR,
            "extractor_sha256": weights["inception_sha256"], "fdd_extractor_sha256": weights.get("dinov2_sha256")}
