"""Evaluation metrics in the ADM protocol: FID, sFID, IS, Precision/Recall, plus FDD (docs/metrics.md).

Light to import: the heavy modules (networks, clean-fid, timm) load only when used. ``METRICS`` is the registry the
leaderboard reads: per metric, whether higher is better and which feature network it needs.
"""

from __future__ import annotations

import dataclasses
import math

#: value ranges: a distance, a share of samples, and a metric with no bound (KID's unbiased estimate may be negative)
DISTANCE, SHARE, UNBOUNDED = (0.0, math.inf), (0.0, 1.0), (-math.inf, math.inf)


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool
    needs: str
    """Feature network: ``inception`` (TF-2015 graph semantics), ``dinov2`` or ``domain`` (the embedded suite's)."""
    description: str
    value_range: tuple[float, float] = UNBOUNDED
    """Where the metric's values lie: intervals drawn with normal noise are clipped to it (``bench.report``)."""


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("fid", False, "inception", "Fréchet distance of pool_3 features to the reference (ADM protocol)",
               DISTANCE),
    MetricInfo("sfid", False, "inception", "Fréchet distance of mixed_6/conv[:7] spatial features (ADM)", DISTANCE),
    MetricInfo("is", True, "inception", "Inception Score, contiguous 5000-sample splits (ADM)", (1.0, math.inf)),
    MetricInfo("precision", True, "inception", "k=3 improved precision vs the 10k ADM reference images", SHARE),
    MetricInfo("recall", True, "inception", "k=3 improved recall vs the 10k ADM reference images", SHARE),
    MetricInfo("fdd", False, "dinov2", "Fréchet distance in DINOv2 ViT-L/14 CLS space (dgm-eval preprocessing)",
               DISTANCE),
    MetricInfo("clean_fid", False, "inception", "clean-fid 'clean' mode FID (not comparable with ADM FID)", DISTANCE),
    MetricInfo("kid", False, "inception", "clean-fid kernel inception distance"),
    MetricInfo("class_acc", True, "domain", "share of samples the domain classifier assigns to their own class",
               SHARE),
)}

#: display names (report headers, record labels)
LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall", "fdd": "FDD",
          "clean_fid": "clean-FID", "kid": "KID",
          "class_acc": "Class acc"}


def metric_label(name: str, n: int | None = None) -> str:
    """``FID`` (an unknown name as it is); with the sample count ``n``, ``FID-50K``: names in records carry N because
    FID-10K and FID-50K are not comparable (pitfall P14)."""
    label = LABELS.get(name, name)
    if n is None:
        return label
    size = f"{n // 1000}K" if n % 1000 == 0 and n >= 1000 else str(n)
    return f"{label}-{size}"


__all__ = ["DISTANCE", "LABELS", "METRICS", "SHARE", "UNBOUNDED", "MetricInfo", "metric_label"]
