"""The evaluation record: one self-describing JSON per evaluation (metrics.md §8.3, §8.13), written atomically.

Top-level keys (every one always present; a metric that was not computed is ``null`` with a reason in
``skipped``):

* metrics: ``fid, sfid, is, is_splits, is_std, precision, recall, fdd`` (+ ``clean_fid, kid`` when requested),
  ``metric_names`` carrying N (``FID-50K``), and ``metrics``: {name: {value, higher_is_better, label}} of the
  computed ones, the form the results store reads;
* ``n_samples``, ``n_ref_pr``, ``counts`` (exact P/R numerators), ``samples`` (path, sha256 or size);
* ``reference``: ``adm_npz_sha256``, ``adm_npz_path``, ``fdd_ref_sha256``, ``fdd_ref_n``, ``fdd_ref_provenance``;
* ``weights``: ``inception_sha256``, ``dinov2_sha256`` and per-file detail (official or not, pinned now or before);
* ``protocol``: ``inception_resize``, ``fdd_resize``, ``pos_embed``, ``pr_distance``, ``pr_k``, ``is_split_size``,
  ``is_shuffle_seed``, ``class_sampling``, ``fdd_arch``, ``frechet_method``;
* ``env``: torch, timm, numpy, scipy, cuda, device, ``tf32_disabled``, ``world_size``;
* ``diagnostics``: ``min_eig_sigma`` per space (samples and reference), ``min_eig_product``, ``n_vs_d_ok``,
  ``duplicates_found``, ``sample_npz_extra_keys``;
* ``created_at``, ``schema``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from bench.records.atomic import atomic_path

SCHEMA = "kindbench.eval/1"


def metric_label(metric: str, n: int) -> str:
    """``FID-50K``: names carry N because FID-10K and FID-50K are not comparable (pitfall P14)."""
    base = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall", "fdd": "FDD",
            "clean_fid": "clean-FID", "kid": "KID"}[metric]
    size = f"{n // 1000}K" if n % 1000 == 0 and n >= 1000 else str(n)
    return f"{base}-{size}"


def env_info(world_size: int, device: str) -> dict:
    import numpy
    import scipy
    import timm
    import torch

    cuda = torch.version.cuda if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
        "cuda": cuda, "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "python": platform.python_version(), "host": platform.node(),
        "tf32_disabled": True, "autocast": False, "world_size": world_size,
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: str | os.PathLike, data: dict, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temp file and ``os.replace``; refuse to replace a record unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"record already exists: {path} (records are immutable; pass --overwrite to replace)")
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
    return path


REQUIRED_KEYS = ("schema", "created_at", "metrics", "fid", "sfid", "is", "is_splits", "precision", "recall", "fdd",
                 "metric_names", "n_samples", "n_ref_pr", "reference", "weights", "protocol", "env", "diagnostics")


def validate_record(record: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"evaluation record lacks {missing}")
    for key in ("adm_npz_sha256", "fdd_ref_sha256", "fdd_ref_n"):
        if key not in record["reference"]:
            raise ValueError(f"evaluation record lacks reference.{key}")
    for key in ("inception_resize", "fdd_resize", "pos_embed", "pr_distance", "is_split_size", "is_shuffle_seed",
                "class_sampling"):
        if key not in record["protocol"]:
            raise ValueError(f"evaluation record lacks protocol.{key}")
    for key in ("min_eig_sigma", "n_vs_d_ok", "duplicates_found"):
        if key not in record["diagnostics"]:
            raise ValueError(f"evaluation record lacks diagnostics.{key}")
