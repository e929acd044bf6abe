"""A fixed, class-balanced fraction of a dataset (FINE's Sigma-only phase trains on ~1% of the target data).

Every class keeps ``ceil(fraction * n_c)`` of its items (at least one), evenly spaced over that class's items in
dataset order, so the subset is the same on every rank, every restart and every machine. The wrapper keeps the
interface the trainer uses: ``labels``, ``num_classes``, ``moments`` (latent caches) and item access.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset


def balanced_subset_indices(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the kept items: per class, ``ceil(fraction * n_c)`` evenly spaced ones (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    kept = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, math.ceil(fraction * len(members)))
        kept.append(members[np.linspace(0, len(members) - 1, count).round().astype(np.int64)])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


class ClassBalancedSubset(Dataset):
    """``dataset`` restricted to ``balanced_subset_indices(dataset.labels, fraction)``."""

    def __init__(self, dataset: Dataset, fraction: float):
        self.dataset = dataset
        self.indices = balanced_subset_indices(dataset.labels, fraction)
        self.labels = np.asarray(dataset.labels)[self.indices]
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]

    def moments(self, index: int, flipped: bool = False):
        return self.dataset.moments(int(self.indices[index]), flipped=flipped)

    def __getattr__(self, name: str):  # geometry and other read-only facts of the wrapped dataset
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
