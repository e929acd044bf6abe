"""The ``evaluate`` step: score a sample job's images against its task's reference with the suite's metric
protocol (``EvalConfig``); the numbers carry that protocol and the ids and checksums of what they compare."""

from __future__ import annotations

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

        result = evaluate(EvalOptions(samples=samples, ref=reference_path,
                                      weights_dir=protocol["weights_dir"] or None, fdd=protocol["fdd"],
                                      out=samples.with_suffix(".eval.json"), overwrite=True))
    metrics = {name: {"value": None if m["value"] is None else float(m["value"]),
                     "higher_is_better": bool(m["higher_is_better"])} for name, m in result["metrics"].items()}
    # the reference is the prepare job's output: its id names it, its sha256 pins it
    protocol_out = {"reference_id": job.info["prepare_job"], "reference_sha256": reference.get("sha256", ""),
                    **result["protocol"], "cfg_scale": s["cfg_scale"], "sampler": s["scheduler"],
                    "num_steps": s["num_steps"], "clip_denoised": bool(s.get("clip_denoised", False)),
                    "samples_sha256": sample_rec["outputs"]["samples"]["sha256"]}
    return StepResult({"eval_info": {"metrics": metrics, "protocol": protocol_out}})
