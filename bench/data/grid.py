"""Image grids as PNG: previews of datasets and samples (README figures, the sample stage's 64-image grid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images_uint8: np.ndarray, nrow: int = 8, *, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, `nrow` images per row, row-major."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 NHWC images with 1 or 3 channels, got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("cannot make a grid of zero images")
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    n, h, w, c = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for k, image in enumerate(images):
        top = padding + (k // cols) * (h + padding)
        left = padding + (k % cols) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_grid(
    images_uint8: np.ndarray, path: str | Path, nrow: int = 8, *, padding: int = 2, upscale: int = 1
) -> Path:
    """Write a PNG grid of uint8 NHWC images; `upscale` enlarges with nearest neighbour (for tiny images)."""
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    grid = make_grid(images_uint8, nrow, padding=padding)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
