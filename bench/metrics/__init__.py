"""Evaluation metrics in the ADM protocol: FID, sFID, IS, Precision/Recall, plus FDD (metrics.md).

Light to import: the heavy modules (networks, clean-fid, timm) load only when used. ``METRICS`` is the registry the
leaderboard reads: per metric, whether higher is better and which feature network it needs.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool
    needs: str
    """Feature network: ``inception`` (TF-2015 graph semantics) or ``dinov2``."""
    description: str


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("fid", False, "inception", "Fréchet distance of pool_3 features to the reference (ADM protocol)"),
    MetricInfo("sfid", False, "inception", "Fréchet distance of mixed_6/conv[:7] spatial features (ADM)"),
    MetricInfo("is", True, "inception", "Inception Score, contiguous 5000-sample splits (ADM)"),
    MetricInfo("precision", True, "inception", "k=3 improved precision vs the 10k ADM reference images"),
    MetricInfo("recall", True, "inception", "k=3 improved recall vs the 10k ADM reference images"),
    MetricInfo("fdd", False, "dinov2", "Fréchet distance in DINOv2 ViT-L/14 CLS space (dgm-eval preprocessing)"),
    MetricInfo("clean_fid", False, "inception", "clean-fid 'clean' mode FID (not comparable with ADM FID)"),
    MetricInfo("kid", False, "inception", "clean-fid kernel inception distance"),
)}

__all__ = ["METRICS", "MetricInfo"]
