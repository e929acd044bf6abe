"""One evaluation: an ADM-style sample batch against a reference → the metrics record (docs/metrics.md §1).

Steps (each a helper below): resolve and verify the offline files; load the networks; extract sample features
(sharded); take the reference statistics and the P/R reference features (cached or extracted from ``arr_0``);
compute FID, sFID, IS, P/R, FDD and optional clean-fid columns; assemble and (rank 0) write the record.
Works in one process or under torchrun; every rank returns the same record.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.metrics import METRICS, metric_label
from bench.metrics import distributed as D
from bench.metrics.networks import dinov2 as dino
from bench.metrics.networks.features import FeatureSet, extract_features
from bench.metrics.networks.inception import load_inception
from bench.metrics.networks.weights import VerifiedFile, WeightsDir, resolve_weights_dir
from bench.metrics.record import ENV_GUARANTEES, SCHEMA, validate_eval_record
from bench.metrics.reference.statistics import Reference, load_reference
from bench.metrics.sample_io import open_samples
from bench.metrics.scores.frechet import frechet_distance
from bench.metrics.scores.inception_score import ADM_SPLIT_SIZE, check_label_order, inception_score, split_bounds
from bench.metrics.scores.precision_recall import PrecisionRecall, precision_recall
from bench.records.atomic import atomic_path, write_json_atomic
from bench.records.environment import device_environment
from bench.records.fields import utc_now
from bench.records.hashing import file_sha256

ADM_N_REF_PR = 10_000


@dataclasses.dataclass
class EvalOptions:
    """Everything that changes an evaluation's numbers, plus where to write it."""

    samples: Path
    ref: Path | None = None
    """ADM reference batch or a kindbench reference; default: the weights dir's refs/ (derived extract first)."""
    weights_dir: str | None = None
    out: Path | None = None
    """Record path; default ``<samples>.eval.json``. ``False``-like empty string: do not write."""
    fdd: str = "auto"
    """``on`` (error if DINOv2 weights or reference are missing), ``off``, or ``auto`` (compute when available)."""
    fdd_ref: Path | None = None
    fdd_arch: str = dino.DEFAULT_ARCH
    fdd_resize: str = "pil_bicubic_uint8"
    pr_distance: str = "fp32"
    pr_k: int = 3
    pr_block: int = 4096
    n_ref_pr: int = ADM_N_REF_PR
    is_split_size: int = ADM_SPLIT_SIZE
    is_shuffle_seed: int | None = None
    class_sampling: str = "random"
    limit: int | None = None
    batch_size: int = 100
    num_workers: int = 0
    device: str | None = None
    extras: tuple[str, ...] = ()
    """``clean-fid``: add clean-fid's clean_fid and kid columns (needs inception/inception-2015-12-05.pt)."""
    frechet_method: str = "cholesky"
    overwrite: bool = False
    save_stats: Path | None = None
    """Also write the samples' float64 moments (mu, sigma, mu_s, sigma_s[, mu_dinov2, sigma_dinov2], n) here."""


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _resolve_ref(opts: EvalOptions, wd: WeightsDir) -> tuple[Path, dict]:
    """The reference path and its verified-file record (manifest-checked when it lives in the weights dir)."""
    if opts.ref is None:
        for key in ("adm_ref_derived", "adm_ref"):
            if wd.find(key):
                v = wd.verified(key)
                return v.path, v.record()
        wd.path("adm_ref")  # raises with the expected layout
    ref = Path(opts.ref).resolve()
    if not ref.exists():
        raise FileNotFoundError(f"reference not found: {ref}")
    try:
        rel = str(ref.relative_to(wd.root))
    except ValueError:
        rel = None
    for key in ("adm_ref_derived", "adm_ref", "fdd_ref"):
        found = wd.find(key)
        if rel is not None and found and found[1] == rel:
            v = wd.verified(key)
            return v.path, v.record()
    return ref, {"path": str(ref), "sha256": file_sha256(ref), "official": None, "pinned_now": False}


def _fdd_setup(opts: EvalOptions, wd: WeightsDir):
    """(model, reference, weights record) for FDD, or (None, None, reason) when skipped."""
    if opts.fdd == "off":
        return None, None, "disabled (--fdd off)"
    key = f"dinov2:{opts.fdd_arch}"
    ref_path = opts.fdd_ref or (wd.find("fdd_ref") or (None,))[0]
    missing = []
    if wd.find(key) is None:
        missing.append(f"DINOv2 weights {key}")
    if ref_path is None or not Path(ref_path).exists():
        missing.append(f"FDD reference {ref_path or 'refs/fdd_imagenet256_train_dinov2_vitl14.npz'}")
    if missing:
        if opts.fdd == "on":
            if wd.find(key) is None:
                wd.path(key)  # raises MissingWeightsError with the expected layout
            raise FileNotFoundError("FDD requested (--fdd on) but missing: " + "; ".join(missing))
        return None, None, "missing " + "; ".join(missing)
    weights = wd.verified(key)
    ref = load_reference(ref_path)
    if "dinov2" not in ref.moments:
        raise ValueError(f"{ref_path} is not a DINOv2 reference (spaces: {sorted(ref.moments)})")
    want = ref.provenance.get("extractor")
    if want and want != f"dinov2:{opts.fdd_arch}":
        raise ValueError(f"FDD reference {ref_path} was built with {want}, not dinov2:{opts.fdd_arch}")
    model = dino.build_dinov2(weights.path, opts.fdd_arch, device=opts.device)
    return model, ref, weights


def _ref_pool(ref: Reference, inception, inception_sha: str, opts: EvalOptions) -> tuple[np.ndarray | None, str]:
    """P/R reference features: the cached ones if computed with these weights, else extracted from ``arr_0``."""
    if ref.ref_pool is not None and ref.provenance.get("inception_sha256") == inception_sha:
        return ref.ref_pool[: opts.n_ref_pr], "cached ref_pool"
    images = ref.images()
    if images is None:
        return None, "reference has neither arr_0 nor ref_pool for these Inception weights"
    feats = extract_features(images, inception=inception, batch_size=opts.batch_size, limit=opts.n_ref_pr,
                             num_workers=opts.num_workers)
    images.close()
    return feats.pool, "extracted from reference arr_0"


def _frechet(sample_m, ref_m, method: str) -> tuple[float, dict]:
    res = frechet_distance(sample_m.mu, sample_m.sigma, ref_m.mu, ref_m.sigma, method=method, sigma_eigs="first")
    diag = {"min_eig_sigma_samples": res.min_eig_sigma1, "min_eig_product": res.min_eig_product,
            "method": res.method}
    return res.value, diag


def _sample_labels(samples_path: Path, n: int) -> np.ndarray | None:
    """Labels of the samples for the class-order check (P10), if known.

    Looked up as ``labels``/``y``/``arr_1`` inside the npz, else a ``labels.npy`` beside it with exactly one label per
    sample (what ``bench.run.sample`` writes).
    """
    if samples_path.is_dir():
        return None
    with np.load(samples_path) as data:
        for key in ("labels", "y", "arr_1"):
            if key in data.files and data[key].ndim == 1 and len(data[key]) >= n:
                return data[key][:n]
    sibling = samples_path.parent / "labels.npy"
    if sibling.is_file():
        labels = np.load(sibling, mmap_mode="r")
        if labels.ndim == 1 and len(labels) == len(open_samples(samples_path)):
            return np.asarray(labels[:n])
    return None


def _clean_extras(opts, wd, source, ref: Reference, n: int) -> dict:
    from bench.metrics.scores import cleanfid_extras as cx

    weights = wd.verified("cleanfid_inception")
    images = ref.images()
    if images is None:
        return {"clean_fid": None, "kid": None, "errors": {"clean_fid": "reference has no arr_0 images"}}
    model = cx.load_cleanfid_inception(weights.path.parent, opts.device)
    fs = cx.clean_features(model, source, batch_size=opts.batch_size, limit=n)
    fr = cx.clean_features(model, images, batch_size=opts.batch_size, limit=opts.n_ref_pr)
    out = cx.clean_fid_and_kid(fs, fr)
    out.update(clean_ref=f"{ref.path.name}:arr_0[:{len(fr)}]", cleanfid_inception=weights.record())
    return out


@dataclasses.dataclass
class _Run:
    """What one evaluation gathered before the (rank-0) arithmetic and the record."""

    opts: EvalOptions
    wd: WeightsDir
    world: int
    inception_w: VerifiedFile
    ref: Reference
    ref_record: dict
    feats: FeatureSet
    samples_shape: tuple
    extra_keys: list
    fdd_ref: Reference | None = None
    dinov2_w: VerifiedFile | None = None
    pr: PrecisionRecall | None = None
    ref_pool_origin: str = ""
    extras: dict | None = None
    labels: np.ndarray | None = None
    skipped: dict = dataclasses.field(default_factory=dict)


def evaluate(opts: EvalOptions) -> dict:
    """Run one evaluation and return its record on every rank (rank 0 writes it unless ``opts.out == ''``)."""
    wd = resolve_weights_dir(opts.weights_dir)
    opts.device = opts.device or default_device()
    rank, world = D.rank_and_world()
    out = None if opts.out == "" else Path(opts.out) if opts.out else default_record_path(Path(opts.samples))
    if out is not None and out.exists() and not opts.overwrite:  # fail before an hour of feature extraction
        raise FileExistsError(f"record already exists: {out} (records are immutable; pass --overwrite to replace)")
    inception_w = wd.verified("inception")
    ref_path, ref_record = _resolve_ref(opts, wd)
    ref = load_reference(ref_path, sha256=ref_record["sha256"])
    for space in ("pool", "spatial"):
        if space not in ref.moments:
            raise ValueError(f"{ref_path}: not an Inception reference (needs mu/sigma and mu_s/sigma_s)")
    dinov2, fdd_ref, fdd_info = _fdd_setup(opts, wd)
    inception = load_inception(inception_w.path, opts.device)
    source = open_samples(opts.samples)
    _warn_about_inputs(source, ref)
    n = len(source) if opts.limit is None else min(opts.limit, len(source))
    labels = _sample_labels(Path(opts.samples), n)
    # before the expensive part (pitfall P10)
    check_label_order(labels, opts.is_shuffle_seed, num_splits=len(split_bounds(n, opts.is_split_size)))
    feats = extract_features(source, inception=inception, dinov2=dinov2, fdd_resize=opts.fdd_resize,
                             batch_size=opts.batch_size, num_workers=opts.num_workers, limit=opts.limit)
    run = _Run(opts, wd, world, inception_w, ref, ref_record, feats, tuple(source.shape),
               list(getattr(source, "extra_keys", [])), fdd_ref=fdd_ref, labels=labels)
    if dinov2 is not None:
        run.dinov2_w = fdd_info
    else:
        run.skipped["fdd"] = fdd_info
    ref_pool, run.ref_pool_origin = _ref_pool(ref, inception, inception_w.sha256, opts)
    if ref_pool is not None:  # collective: every rank takes part
        run.pr = precision_recall(ref_pool, feats.pool, opts.pr_k, row_block=opts.pr_block, col_block=opts.pr_block,
                                  distance=opts.pr_distance, device=opts.device)
    else:
        run.skipped["precision_recall"] = run.ref_pool_origin
    if "clean-fid" in opts.extras:
        run.extras = _clean_extras(opts, wd, source, ref, feats.n)
    source.close()
    record = None
    if rank == 0:  # the rest is cheap arithmetic on merged statistics: one rank computes, all receive it
        record = _record(run, _metric_values(run))
        if opts.save_stats:
            save_sample_stats(opts.save_stats, feats)
            record["sample_stats_path"] = str(opts.save_stats)
        if out is not None:
            write_json_atomic(out, record, overwrite=opts.overwrite)
            record["_written_to"] = str(out)
    return D.broadcast_object(record)


def _warn_about_inputs(source, ref: Reference) -> None:
    ref_images = ref.images()
    if ref_images is not None:
        mismatch = ref_images.shape[1:] != source.shape[1:]
        ref_images.close()
        if mismatch:  # an FID across resolutions measures the resize, not the model
            raise ValueError(f"samples are {tuple(source.shape[1:])} but the reference images are "
                             f"{tuple(ref_images.shape[1:])}: score samples against a reference of their own "
                             "resolution")
    if any(k in getattr(source, "extra_keys", []) for k in ("mu", "sigma", "mu_s", "sigma_s")):
        warnings.warn("the sample npz carries mu/sigma keys: ADM's evaluator would use those stale statistics "
                      "instead of arr_0; we ignore them and compute from arr_0")


def _metric_values(run: _Run) -> dict:
    """FID, sFID, IS, FDD and the diagnostics (rank 0 only)."""
    opts, feats = run.opts, run.feats
    frechet = {}
    values = {}
    values["fid"], frechet["pool"] = _frechet(feats.moments["pool"], run.ref.moments["pool"], opts.frechet_method)
    values["sfid"], frechet["spatial"] = _frechet(feats.moments["spatial"], run.ref.moments["spatial"],
                                                  opts.frechet_method)
    values["fdd"] = None
    if run.dinov2_w is not None:
        values["fdd"], frechet["dinov2"] = _frechet(feats.moments["dinov2"], run.fdd_ref.moments["dinov2"],
                                                    opts.frechet_method)
    values["is"] = inception_score(feats.logits, split_size=opts.is_split_size, shuffle_seed=opts.is_shuffle_seed,
                                   labels=run.labels)
    n_vs_d = {space: m.n > m.dim for space, m in feats.moments.items()}
    if not all(n_vs_d.values()):
        warnings.warn("N <= d in some feature space: covariances are rank-deficient and FD is unstable (P6)")
    values["diagnostics"] = {
        "min_eig_sigma": {space: fr["min_eig_sigma_samples"] for space, fr in frechet.items()},
        "n_vs_d_ok": n_vs_d,
        "duplicates_found": feats.duplicates(),
        "frechet": frechet,
        "sample_npz_extra_keys": run.extra_keys,
        "ref_pool_origin": run.ref_pool_origin,
    }
    return values


def _record(run: _Run, values: dict) -> dict:
    """The record of docs/metrics.md §13 (key list in ``bench.metrics.record``)."""
    opts, n, pr, fdd_ref, with_fdd = run.opts, run.feats.n, run.pr, run.fdd_ref, run.dinov2_w is not None
    is_ = values["is"]
    record = {
        "schema": SCHEMA,
        "created_at": utc_now(),
        "fid": values["fid"], "sfid": values["sfid"], "is": is_.value, "is_splits": list(is_.splits),
        "is_std": is_.std, "precision": pr.precision if pr else None, "recall": pr.recall if pr else None,
        "fdd": values["fdd"],
        "metric_names": {m: metric_label(m, n) for m in ("fid", "sfid", "is", "precision", "recall", "fdd")},
        "n_samples": n,
        "n_ref_pr": pr.n_real if pr else 0,
        "counts": ({"precision": pr.n_precision, "recall": pr.n_recall, "real": pr.n_real, "fake": pr.n_fake}
                   if pr else None),
        "samples": {"path": str(Path(opts.samples).resolve()), "n_in_file": run.samples_shape[0],
                    "shape": list(run.samples_shape[1:])},
        "reference": {
            "adm_npz_path": str(run.ref.path), "adm_npz_sha256": run.ref.sha256, "adm_npz_keys": run.ref.keys,
            "adm_npz_verified": run.ref_record,
            "fdd_ref_sha256": fdd_ref.sha256 if fdd_ref else None,
            "fdd_ref_n": fdd_ref.moments["dinov2"].n if fdd_ref else None,
            "fdd_ref_path": str(fdd_ref.path) if fdd_ref else None,
            "fdd_ref_provenance": fdd_ref.provenance if fdd_ref else None,
        },
        "weights": {
            "inception_sha256": run.inception_w.sha256,
            "dinov2_sha256": run.dinov2_w.sha256 if with_fdd else None,
            "inception": run.inception_w.record(),
            "dinov2": run.dinov2_w.record() if with_fdd else None,
            "weights_dir": str(run.wd.root),
        },
        "protocol": {
            "inception_resize": "tf1_bilinear",
            "inception_layers": {"fid": "pool_3 (2048)", "sfid": "mixed_6/conv[..., :7] NHWC (2023)",
                                 "is": "pool_3 @ W_softmax (no bias), 1008 classes"},
            "fdd_resize": opts.fdd_resize if with_fdd else None,
            "pos_embed": "dinov2_offset0.1" if with_fdd else None,
            "fdd_arch": opts.fdd_arch if with_fdd else None,
            "pr_distance": opts.pr_distance, "pr_k": opts.pr_k,
            "is_split_size": opts.is_split_size, "is_shuffle_seed": opts.is_shuffle_seed,
            "class_sampling": opts.class_sampling, "frechet_method": opts.frechet_method,
        },
        "env": {**device_environment(run.world, str(opts.device)), **ENV_GUARANTEES},
        "diagnostics": values["diagnostics"],
        "skipped": run.skipped,
    }
    if run.extras is not None:
        extras = dict(run.extras)
        record.update(clean_fid=extras.pop("clean_fid"), kid=extras.pop("kid"), clean_fid_details=extras)
        record["metric_names"].update(clean_fid=metric_label("clean_fid", n), kid=metric_label("kid", n))
    record["metrics"] = {name: {"value": float(record[name]), "higher_is_better": METRICS[name].higher_is_better,
                                "label": label}
                         for name, label in record["metric_names"].items() if record.get(name) is not None}
    validate_eval_record(record)
    return record


def save_sample_stats(path: str | Path, feats: FeatureSet) -> None:
    """The merged sample moments, ADM key names for Inception (never written into the sample npz itself)."""
    names = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dinov2": ("mu_dinov2", "sigma_dinov2")}
    arrays = {"n": np.array(feats.n)}
    for space, m in feats.moments.items():
        arrays[names[space][0]], arrays[names[space][1]] = m.mu, m.sigma
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)


def default_record_path(samples: Path) -> Path:
    return samples.with_name(samples.name.removesuffix(".npz") + ".eval.json")
