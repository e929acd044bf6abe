"""Build and version our own reference statistics (docs/metrics.md §9, §10).

* ``prepare_adm_reference``: the small derived extract of ADM's reference batch (float64 mu/sigma/mu_s/sigma_s
  plus the 10k ``ref_pool`` features computed once with our Inception), so later evaluations skip the 2 GB file.
* ``build_inception_reference``: ADM-style statistics (pool + spatial, optional P/R subset) for any image source,
  e.g. an ImageFolder dataset with ADM's centre crop.
* ``build_fdd_reference``: DINOv2 statistics for FDD (ImageNet-256 train, or any dataset).

Every file carries its provenance (what images, which crop and resize, which network and weights sha256) and its
sha256 is returned so it can be pinned in the weights manifest.
"""

from __future__ import annotations

import os

import torch

from bench.metrics import distributed as D
from bench.metrics.networks.features import extract_features
from bench.metrics.reference.statistics import ImageFolderSource, load_reference, save_reference
from bench.metrics.sample_io import SampleSource


def _source_provenance(source: SampleSource) -> dict:
    prov = {"source": str(source.path), "n_available": len(source), "image_shape": list(source.shape[1:])}
    if isinstance(source, ImageFolderSource):
        prov.update(crop="adm_center_crop_arr", image_size=source.image_size, image_list_sha256=source.list_sha256())
    return prov


def build_inception_reference(source: SampleSource, inception: torch.nn.Module, out: str | os.PathLike, *,
                              inception_sha256: str, n_ref_pr: int = 10_000, batch_size: int = 100,
                              num_workers: int = 0, limit: int | None = None, extra: dict | None = None) -> str | None:
    """mu/sigma (pool) and mu_s/sigma_s (spatial) over ``source``; ``ref_pool`` of its first ``n_ref_pr`` images."""
    feats = extract_features(source, inception=inception, batch_size=batch_size, num_workers=num_workers,
                             limit=limit)
    prov = dict(_source_provenance(source), extractor="inception_tf2015", inception_resize="tf1_bilinear",
                inception_sha256=inception_sha256, n_ref_pr=min(n_ref_pr, feats.n), **(extra or {}))
    if D.rank_and_world()[0] != 0:
        return None
    return save_reference(out, {"pool": feats.moments["pool"], "spatial": feats.moments["spatial"]}, prov,
                          ref_pool=feats.pool[:n_ref_pr])


def build_fdd_reference(source: SampleSource, dinov2: torch.nn.Module, out: str | os.PathLike, *, arch: str,
                        dinov2_sha256: str, fdd_resize: str = "pil_bicubic_uint8", batch_size: int = 100,
                        num_workers: int = 0, limit: int | None = None, extra: dict | None = None) -> str | None:
    """DINOv2 CLS statistics over ``source`` for FDD."""
    feats = extract_features(source, dinov2=dinov2, fdd_resize=fdd_resize, batch_size=batch_size,
                             num_workers=num_workers, keep_per_sample=False, limit=limit)
    prov = dict(_source_provenance(source), extractor=f"dinov2:{arch}", fdd_resize=fdd_resize,
                pos_embed="dinov2_offset0.1", dinov2_sha256=dinov2_sha256, **(extra or {}))
    if D.rank_and_world()[0] != 0:
        return None
    return save_reference(out, {"dinov2": feats.moments["dinov2"]}, prov)


def prepare_adm_reference(adm_npz: str | os.PathLike, inception: torch.nn.Module, out: str | os.PathLike, *,
                          inception_sha256: str, n_ref_pr: int = 10_000, batch_size: int = 100,
                          num_workers: int = 0) -> str | None:
    """Copy ADM's stored statistics (as float64) and add our Inception's features of its ``arr_0`` images."""
    ref = load_reference(adm_npz)
    images = ref.images()
    if images is None:
        raise ValueError(f"{adm_npz}: no arr_0 images to compute the P/R reference features from")
    feats = extract_features(images, inception=inception, batch_size=batch_size, num_workers=num_workers,
                             limit=n_ref_pr)
    images.close()
    prov = {"source": str(ref.path), "source_sha256": ref.sha256, "source_keys": ref.keys,
            "stats": "copied from the ADM reference batch (TF-computed)", "extractor": "inception_tf2015",
            "inception_sha256": inception_sha256, "inception_resize": "tf1_bilinear", "n_ref_pr": feats.n}
    if D.rank_and_world()[0] != 0:
        return None
    return save_reference(out, {"pool": ref.moments["pool"], "spatial": ref.moments["spatial"]}, prov,
                          ref_pool=feats.pool)
