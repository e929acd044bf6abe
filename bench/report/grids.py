"""Per-class image grids for the plots: one row per class, the first few images of each, from an ADM-style ``.npz``.

Samples are read from the sampler's ``samples.npz`` (``arr_0``, uint8 NHWC) with their labels in ``labels.npy``
beside it (``bench.run.sample``); the held-out real images from the prepare job's ``floor.npz``, which carries its
labels as ``labels``. Only small files are read (``MAX_BYTES``): an ImageNet-scale batch of 50,000 samples is not
loaded to draw 48 of them; its figure keeps the sampler's own ``grid.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_BYTES = 64 * 2**20
PER_CLASS = 6
GAP = 1  # pixels of white between images


def read_labelled(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(images NHWC uint8, labels) of a small ``.npz``; None when the file is too large, unlabelled or not images."""
    if not path.is_file() or path.stat().st_size > MAX_BYTES:
        return None
    with np.load(path) as data:
        images = data["arr_0"] if "arr_0" in data.files else None
        labels = data["labels"] if "labels" in data.files else None
    beside = path.parent / "labels.npy"
    if labels is None and beside.is_file():
        labels = np.load(beside)
    if images is None or labels is None or images.ndim != 4 or images.dtype != np.uint8 or len(labels) != len(images):
        return None
    return images, np.asarray(labels)


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = PER_CLASS,
               classes: int | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 grid: row c holds the first ``per_class`` images of class c (white where a class has
    fewer), rows for classes 0 .. ``classes`` - 1 (default: up to the largest label)."""
    n_classes = int(labels.max()) + 1 if classes is None else classes
    size = images.shape[1]
    images = images[..., :3] if images.shape[-1] >= 3 else np.repeat(images, 3, axis=-1)
    step = size + GAP
    grid = np.full((n_classes * step - GAP, per_class * step - GAP, 3), 255, dtype=np.uint8)
    for c in range(n_classes):
        for j, index in enumerate(np.flatnonzero(labels == c)[:per_class]):
            grid[c * step: c * step + size, j * step: j * step + size] = images[index]
    return grid
