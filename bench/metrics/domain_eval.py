"""FID / IS / precision / recall in the domain extractor's feature space, for the embedded synthetic suite.

The metric code is the ADM protocol's (``frechet``, ``inception_score``, ``precision_recall``, ``stats``); only the
network differs (``bench.metrics.networks.domain``).
Every reference and every record names the extractor and its weights
sha256 (``protocol.extractor = kindbench-synthetic-cnn-v1``), a reference refuses features of other weights, and the
leaderboard groups rows by protocol, so these numbers are never ranked with Inception FIDs.

Reference file (``build_domain_reference``): a kindbench reference ``.npz`` written by ``references.save_reference``
(atomically): ``mu``/``sigma`` float64 of the features (space ``domain``), ``ref_pool`` = the features used as the
real side of precision/recall (all of them, or a seeded subset of ``max_pr_features``), and a JSON ``provenance``
(extractor name, weights sha256 and accuracy, input rule, image size, N, the images' sha256 and the caller's
description of the source).

Class-conditional accuracy (``class_acc``): where the reference names the task's classes in the extractor's label
space (``class_ids``) and the samples carry their labels (``labels.npy`` beside ``samples.npz``, or a ``labels``
member), the share of samples whose extractor logits, restricted to the task's classes, peak at the class they were
generated for. The reference stores the same accuracy on its own held-out real images (``class_acc_real``, the
ceiling a generator can reach under this classifier).

Sample intervals (``sample_intervals``): a 95% percentile bootstrap over the samples (seeded, ``N_BOOTSTRAP``
resamples) of FID and class accuracy, the uncertainty that comes from drawing a finite number of samples (the
leaderboard's seed interval is the other part).

Protocol choices: Fréchet distance with the project's float64 Cholesky/eigh route; IS with ADM's contiguous
5000-sample splits, which is one split over all samples whenever N <= 5000 (the record says so in
``protocol.is_note``); precision/recall with k = 3 and fp32 distances.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from bench.metrics import METRICS, metric_label
from bench.metrics import distributed as D
from bench.metrics.networks.domain import DomainExtractor
from bench.metrics.record import ENV_GUARANTEES
from bench.metrics.reference.statistics import load_reference, save_reference
from bench.metrics.sample_io import open_samples, validate_images
from bench.metrics.scores.frechet import frechet_distance
from bench.metrics.scores.inception_score import ADM_SPLIT_SIZE, inception_score
from bench.metrics.scores.precision_recall import precision_hits, precision_recall
from bench.metrics.scores.stats import moments_of
from bench.progress import progress_bar
from bench.records.atomic import write_json_atomic
from bench.records.environment import device_environment
from bench.records.fields import utc_now
from bench.records.hashing import file_sha256

SPACE = "domain"
SCHEMA = "kindbench.eval-domain/1"
MAX_PR_FEATURES = 10_000
MIN_PR_FEATURES = 4  # k = 3 neighbours besides the point itself
PR_SUBSET_SEED = 0
METRIC_NAMES = ("fid", "is", "precision", "recall")
N_BOOTSTRAP = 200
BOOTSTRAP_SEED = 0
# Protocol fields evaluate_domain fills itself; a caller passing one of them is a bug, not an override.
_OWN_PROTOCOL_KEYS = ("n_samples", "extractor", "extractor_sha256", "reference_id", "reference_sha256", "resize")


def _images_sha256(images: np.ndarray) -> str:
    h = hashlib.sha256(f"{images.shape}|{images.dtype}|".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def _pr_subset(n: int, cap: int) -> tuple[np.ndarray, str]:
    """Rows kept as P/R reference features: all, or a seeded random subset (reference sets are often class-sorted)."""
    if n <= cap:
        return np.arange(n), "all"
    return np.sort(np.random.default_rng(PR_SUBSET_SEED).choice(n, cap, replace=False)), \
        f"seeded_random(seed={PR_SUBSET_SEED}, n={cap})"


def build_domain_reference(images_uint8: np.ndarray, out_path: str | os.PathLike, extractor: DomainExtractor, *,
                           meta: dict | None = None, max_pr_features: int = MAX_PR_FEATURES,
                           batch_size: int = 256, labels: np.ndarray | None = None,
                           class_ids: list[int] | None = None) -> dict:
    """Reference statistics of real ``images_uint8`` (uint8 NHWC) in the extractor's space, written to ``out_path``.

    ``meta`` describes the source (task, split, domain, generator seed, first index ...) and goes into the
    provenance; ``meta['reference_id']`` names the reference, otherwise the id is derived from the images' sha256
    (so rebuilding the same images gives the same id). Returns path, sha256 of the file, reference_id, n, n_pr,
    image_size, feature_dim, extractor name and sha256, and the stored provenance.

    ``class_ids`` (the extractor's class of each task label) with ``labels`` (the task label of each image) make
    the reference able to score class-conditional accuracy: both are stored, with the extractor's accuracy on these
    real images (``class_acc_real``).
    """
    if (labels is None) != (class_ids is None):
        raise ValueError("labels and class_ids come together: the task label of each image and the extractor class "
                         "of each task label")
    validate_images(images_uint8, where="reference images")
    if len(images_uint8) < 2:
        raise ValueError(f"a reference needs at least 2 images for a covariance, got {len(images_uint8)}")
    if max_pr_features < MIN_PR_FEATURES:
        raise ValueError(f"max_pr_features must be at least {MIN_PR_FEATURES}, got {max_pr_features}")
    meta = dict(meta or {})
    parts, logits = [], []  # in batch_size chunks (the extractor's own batches): the same features as one call
    shown = len(images_uint8) if D.rank_and_world()[0] == 0 else 0  # every rank runs it: rank 0 shows the bar
    with progress_bar(shown, f"features: reference {Path(out_path).name}") as advance:
        for start in range(0, len(images_uint8), max(batch_size, 1)):  # batch_size < 1: the extractor says so
            feats_part, logits_part = extractor.features(images_uint8[start:start + batch_size], batch_size=batch_size)
            parts.append(feats_part)
            logits.append(logits_part)
            advance(len(feats_part))
    feats = np.concatenate(parts)
    classes = {}
    if class_ids is not None:
        classes = {"class_ids": [int(c) for c in class_ids],
                   "class_acc_real": float(class_hits(np.concatenate(logits), labels, class_ids).mean())}
    if len(feats) <= extractor.feature_dim:
        warnings.warn(f"reference of {len(feats)} images in a {extractor.feature_dim}-d space: the covariance is "
                      "rank-deficient and FID is unstable (pitfall P6)")
    images_sha = _images_sha256(images_uint8)
    reference_id = str(meta.pop("reference_id", None) or f"images-{images_sha[:16]}")
    keep, subset = _pr_subset(len(feats), max_pr_features)
    provenance = {
        "reference_id": reference_id, "extractor": extractor.name, "extractor_sha256": extractor.sha256,
        "extractor_heldout_accuracy": extractor.accuracy, "feature_dim": extractor.feature_dim,
        "resize": extractor.resize_rule, "working_size": extractor.working_size,
        "image_size": int(images_uint8.shape[1]), "n_images": int(len(images_uint8)), "n_pr": int(len(keep)),
        "pr_subset": subset, "images_sha256": images_sha, "source": meta, **classes,
    }
    digest = save_reference(out_path, {SPACE: moments_of(feats)}, provenance, ref_pool=feats[keep])
    return {"path": str(Path(out_path)), "sha256": digest, "reference_id": reference_id, "n": int(len(feats)),
            "n_pr": int(len(keep)), "image_size": provenance["image_size"], "feature_dim": extractor.feature_dim,
            "extractor": extractor.name, "extractor_sha256": extractor.sha256, "provenance": provenance}


def class_hits(logits: np.ndarray, labels: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """Per image, whether the extractor's logits restricted to the task's classes (``class_ids[label]`` is the
    extractor class of task label ``label``) peak at the image's own label."""
    labels = np.asarray(labels)
    if labels.shape != (len(logits),):
        raise ValueError(f"need one label per image: {len(logits)} images, labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_ids)):
        raise ValueError(f"labels must lie in [0, {len(class_ids)}) (the task's classes), got "
                         f"[{labels.min()}, {labels.max()}]")
    if max(class_ids, default=-1) >= logits.shape[1] or min(class_ids, default=0) < 0:
        raise ValueError(f"class ids {class_ids} outside the extractor's {logits.shape[1]} classes")
    return logits[:, class_ids].argmax(axis=1) == labels


def sample_intervals(feats: np.ndarray, fid: float, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                     means: dict[str, np.ndarray], n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """95% bootstrap intervals over the samples of FID (its estimate ``fid`` from all of ``feats``) and of every
    metric in ``means`` that is a mean of per-sample indicators (class accuracy's hits, precision's manifold hits):
    resample the N samples with replacement ``n_boot`` times (one seeded stream) and recompute. The reference (its
    statistics, its manifold) stays fixed: this is the noise of a finite sample, not of the reference.

    A mean's interval is the 2.5 and 97.5 percentiles. FID is not a mean: a resample repeats about a third of its
    samples, which shrinks the sample covariance's spread and biases every resampled FID upward (held-out real images:
    0.91 against resampled FIDs of 1.4-3.2), so its percentile interval can miss the estimate itself. Its interval is
    the estimate +- 1.96 bootstrap standard deviations instead (the normal bootstrap interval)."""
    rng = np.random.default_rng(seed)
    n = len(feats)
    fids, resampled = [], {name: [] for name in means}
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        m = moments_of(feats[rows])
        fids.append(frechet_distance(m.mu, m.sigma, ref_mu, ref_sigma).value)
        for name, values in means.items():
            resampled[name].append(values[rows].mean())
    spread = 1.96 * float(np.std(fids, ddof=1))
    out = {"method": f"bootstrap over samples, {n_boot} resamples, seed {seed}: fid normal (estimate +- 1.96 sd), "
                     f"{', '.join(means) or 'no other metric'} percentile", "level": 0.95,
           "fid": [float(fid) - spread, float(fid) + spread]}
    for name, values in resampled.items():
        out[name] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


def _load_checked_reference(ref_path: str | os.PathLike, extractor: DomainExtractor):
    ref = load_reference(ref_path)
    prov = ref.provenance
    if SPACE not in ref.moments or ref.ref_pool is None:
        raise ValueError(f"{ref_path} is not a domain-extractor reference (spaces {sorted(ref.moments)}, "
                         f"ref_pool {'present' if ref.ref_pool is not None else 'missing'}); build it with "
                         "build_domain_reference")
    if prov.get("extractor") != extractor.name or prov.get("extractor_sha256") != extractor.sha256:
        raise ValueError(f"{ref_path} was built with {prov.get('extractor')} weights "
                         f"{str(prov.get('extractor_sha256'))[:12]}, not {extractor.name} weights "
                         f"{extractor.sha256[:12]}; rebuild the reference with this extractor")
    return ref


def _sample_labels(path: Path, n: int) -> np.ndarray | None:
    """Class labels stored next to ``arr_0`` (``labels``, ``y`` or ``arr_1``), if any."""
    if path.is_dir():
        return None
    beside = path.parent / "labels.npy"  # where the sampler writes them
    if beside.is_file():
        labels = np.load(beside)
        if labels.ndim == 1 and len(labels) >= n:
            return np.asarray(labels[:n])
    with np.load(path) as data:
        for key in ("labels", "y", "arr_1"):
            if key in data.files and data[key].ndim == 1 and len(data[key]) >= n:
                return np.asarray(data[key][:n])
    return None


def _extract(samples: Path, extractor: DomainExtractor, image_size: int, batch_size: int, limit: int | None):
    source = open_samples(samples)
    try:
        if source.shape[1] != image_size:
            raise ValueError(f"samples are {source.shape[1]}x{source.shape[2]} but the reference images are "
                             f"{image_size}x{image_size}; score samples against a reference of their own resolution")
        stop = len(source) if limit is None else min(limit, len(source))
        parts, digests = [], set()
        shown = stop if D.rank_and_world()[0] == 0 else 0  # every rank extracts all samples: rank 0 shows the bar
        with progress_bar(shown, f"features: {samples.name}") as advance:
            for _, batch in source.batches(batch_size, 0, stop):
                parts.append(extractor.features(batch, batch_size=batch_size))
                digests.update(hashlib.sha256(image.tobytes()).digest() for image in batch)
                advance(len(batch))
        shape = list(source.shape)
    finally:
        source.close()
    if not parts:
        raise ValueError(f"{samples}: no samples to score")
    feats = np.concatenate([p[0] for p in parts])
    logits = np.concatenate([p[1] for p in parts])
    return feats, logits, shape, len(feats) - len(digests)


def _is_protocol(n: int, split_size: int, shuffle_seed: int | None) -> dict:
    splits = -(-n // split_size)
    note = (f"single split over all {n} samples (N <= {split_size})" if splits == 1
            else f"{splits} contiguous splits of {split_size} in file order (ADM)")
    return {"is_split_size": split_size, "is_num_splits": splits, "is_shuffle_seed": shuffle_seed, "is_note": note}


def evaluate_domain(samples_npz: str | os.PathLike, ref_path: str | os.PathLike, extractor: DomainExtractor, *,
                    protocol: dict, out: str | os.PathLike | None = None, overwrite: bool = False,
                    pr_k: int = 3, is_split_size: int = ADM_SPLIT_SIZE, is_shuffle_seed: int | None = None,
                    batch_size: int = 256, limit: int | None = None) -> dict:
    """Score an ADM-style sample batch (``.npz`` with ``arr_0`` or a PNG folder) against a domain reference.

    ``protocol`` carries the sampling side of the protocol (``cfg_scale``, ``sampler``, ``num_steps``, ...) and is
    copied into the record's protocol; the fields this function fills (``n_samples``, ``extractor``,
    ``extractor_sha256``, ``reference_id``, ``reference_sha256``, ``resize``) may not be passed. Returns the record;
    with ``out`` rank 0 also writes it atomically (refusing to replace an existing one unless ``overwrite``).

    The record's ``metrics`` (``{name: {value, higher_is_better, label}}``) and ``protocol`` are in the shape of the
    run record's ``eval_info``; the flat ``fid``/``is``/``precision``/``recall`` keys mirror the Inception record.
    """
    clash = [k for k in _OWN_PROTOCOL_KEYS if k in protocol]
    if clash:
        raise ValueError(f"protocol keys {clash} are set by evaluate_domain and cannot be passed in")
    if is_split_size < 1:
        raise ValueError(f"is_split_size must be positive, got {is_split_size}")
    samples_npz = Path(samples_npz)
    ref = _load_checked_reference(ref_path, extractor)
    image_size = int(ref.provenance["image_size"])
    feats, logits, shape, duplicates = _extract(samples_npz, extractor, image_size, batch_size, limit)
    n = len(feats)
    if n < max(2, pr_k + 1):
        raise ValueError(f"need at least {max(2, pr_k + 1)} samples for FID and k={pr_k} precision/recall, got {n}")

    sample_m, ref_m = moments_of(feats), ref.moments[SPACE]
    fd = frechet_distance(sample_m.mu, sample_m.sigma, ref_m.mu, ref_m.sigma, sigma_eigs=True)
    is_proto = _is_protocol(n, is_split_size, is_shuffle_seed)
    # The class-order check (pitfall P10) matters only when there are several splits: one split ignores order.
    labels = _sample_labels(samples_npz, n)
    is_ = inception_score(logits, split_size=is_split_size, shuffle_seed=is_shuffle_seed,
                          labels=labels if is_proto["is_num_splits"] > 1 else None)
    pr = precision_recall(ref.ref_pool, feats, pr_k)
    values = {"fid": fd.value, "is": is_.value, "precision": pr.precision, "recall": pr.recall}
    class_ids = ref.provenance.get("class_ids")
    hits = class_hits(logits, labels, class_ids) if class_ids is not None and labels is not None else None
    names = METRIC_NAMES
    if hits is not None:
        values["class_acc"] = float(hits.mean())
        names = (*METRIC_NAMES, "class_acc")
    _, world = D.rank_and_world()
    means = {"precision": precision_hits(ref.ref_pool, feats, pr_k)}
    if hits is not None:
        means["class_acc"] = hits

    record = {
        "schema": SCHEMA,
        "created_at": utc_now(),
        "metrics": {name: {"value": float(values[name]), "higher_is_better": METRICS[name].higher_is_better,
                           "label": metric_label(name, n)} for name in names},
        "protocol": {
            "n_samples": n, "extractor": extractor.name, "extractor_sha256": extractor.sha256,
            "reference_id": ref.provenance.get("reference_id", ref.path.stem), "reference_sha256": ref.sha256,
            **protocol,
            "resize": extractor.resize_rule, "working_size": extractor.working_size, "image_size": image_size,
            "feature_space": SPACE, "feature_dim": extractor.feature_dim,
            "feature_layer": "pooled last conv block (fid, precision, recall); classifier logits (is)",
            "n_ref": ref_m.n, "n_ref_pr": pr.n_real, "pr_k": pr_k, "pr_distance": pr.distance, **is_proto,
            "frechet_method": fd.method,
        },
        **values,
        "is_splits": list(is_.splits), "is_std": is_.std,
        "n_samples": n,
        "metric_names": {name: metric_label(name, n) for name in names},
        "class_acc_real": ref.provenance.get("class_acc_real"),
        "sample_intervals": sample_intervals(feats, fd.value, ref_m.mu, ref_m.sigma, means),
        "counts": {"precision": pr.n_precision, "recall": pr.n_recall, "real": pr.n_real, "fake": pr.n_fake},
        "samples": {"path": str(samples_npz.resolve()), "n_in_file": shape[0], "shape": shape[1:],
                    "sha256": file_sha256(samples_npz) if samples_npz.is_file() else None},
        "reference": {"path": str(ref.path), "sha256": ref.sha256, "n": ref_m.n, "provenance": ref.provenance},
        "extractor": extractor.describe(),
        "env": {**device_environment(world, str(extractor.device)), **ENV_GUARANTEES},
        "diagnostics": {"min_eig_sigma_samples": fd.min_eig_sigma1, "min_eig_sigma_ref": fd.min_eig_sigma2,
                        "min_eig_product": fd.min_eig_product, "n_vs_d_ok": n > extractor.feature_dim,
                        "duplicates_found": duplicates},
    }
    if n <= extractor.feature_dim:
        warnings.warn(f"{n} samples in a {extractor.feature_dim}-d space: FID is unstable (pitfall P6)")
    if out is not None and D.rank_and_world()[0] == 0:
        write_json_atomic(out, record, overwrite=overwrite)
    return record
