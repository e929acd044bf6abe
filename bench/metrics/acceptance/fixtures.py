"""Offline stand-ins for CI: random weights in the real layout, synthetic images and references.

With these, every code path of the metrics (weights resolution and manifest, Inception, DINOv2, clean-fid, the
reference loaders, the record) runs on a machine without the real files. The numbers are meaningless and every
record says ``official: false`` for the Inception weights. ``kindbench metrics make-fixtures DIR`` writes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bench.metrics.networks import dinov2 as dino
from bench.metrics.networks.inception import InceptionV3TF, load_inception, random_inception_state_dict
from bench.metrics.networks.weights import DINOV2_FILES, LAYOUT
from bench.metrics.reference.statistics import save_reference
from bench.metrics.sample_io import write_samples_npz
from bench.metrics.scores.stats import moments_of


def synthetic_images(n: int, size: int = 64, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """Smooth random colour fields plus noise, uint8 NHWC; ``shift`` moves the distribution (brightness/contrast)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
        img = smooth * (1.0 - 0.5 * shift) + 60.0 * shift + rng.normal(0, 12, (size, size, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


class _CleanFidStandIn(torch.nn.Module):
    """Has the interface clean-fid's ``InceptionV3W`` expects of NVIDIA's TorchScript file (``.layers``)."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


class _PoolTrunk(torch.nn.Module):
    def __init__(self, model: InceptionV3TF):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.trunk(x)[0][:, :, None, None]


def write_cleanfid_standin(inception_weights: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A TorchScript file at clean-fid's expected name, wrapping our Inception with the given (random) weights."""
    model = load_inception(inception_weights)
    traced = torch.jit.trace(_PoolTrunk(model), torch.zeros(1, 3, 299, 299))
    scripted = torch.jit.script(_CleanFidStandIn(traced))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(out))
    return out


def write_random_weights(root: str | os.PathLike, *, seed: int = 0,
                         dinov2_arch: str | None = "vit_small_patch14_dinov2", clean_fid: bool = False) -> Path:
    """Fill ``root`` with random weights under the real file names (docs/metrics.md §10 layout)."""
    root = Path(root)
    inception = root / LAYOUT["inception"].paths[0]
    inception.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state_dict(seed), inception)
    if dinov2_arch:
        path = root / "dinov2" / DINOV2_FILES[dinov2_arch]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dino.random_fb_checkpoint(dinov2_arch, seed), path)
    if clean_fid:
        write_cleanfid_standin(inception, root / LAYOUT["cleanfid_inception"].paths[0])
    return root


def write_synthetic_adm_reference(path: str | os.PathLike, inception_weights: str | os.PathLike, *, n: int = 64,
                                  size: int = 64, seed: int = 1) -> Path:
    """An ADM-format reference batch (mu, sigma, mu_s, sigma_s, arr_0) from synthetic images.

    Written with plain ``np.savez`` and no provenance, exactly like the published file, so the ADM loading path
    (stats from the file, P/R features extracted from ``arr_0``) is what gets exercised.
    """
    images = synthetic_images(n, size, seed)
    model = load_inception(inception_weights)
    with torch.no_grad():
        out = model(torch.from_numpy(images))
    pool, spatial = moments_of(out.pool.numpy()), moments_of(out.spatial.numpy())
    np.savez(path, arr_0=images, mu=pool.mu.astype(np.float32), sigma=pool.sigma, mu_s=spatial.mu.astype(np.float32),
             sigma_s=spatial.sigma)
    return Path(path)


def write_synthetic_fdd_reference(path: str | os.PathLike, dinov2_weights: str | os.PathLike, arch: str, *,
                                  n: int = 64, size: int = 64, seed: int = 1) -> str:
    model = dino.build_dinov2(dinov2_weights, arch)
    feats = dino.extract(model, synthetic_images(n, size, seed)).numpy()
    return save_reference(path, {"dinov2": moments_of(feats)},
                          {"source": f"synthetic_images(n={n}, size={size}, seed={seed})",
                           "extractor": f"dinov2:{arch}", "fdd_resize": "pil_bicubic_uint8",
                           "pos_embed": "dinov2_offset0.1", "synthetic": True})


def write_synthetic_samples(path: str | os.PathLike, *, n: int = 48, size: int = 64, seed: int = 2,
                            shift: float = 0.3) -> Path:
    images = synthetic_images(n, size, seed, shift)
    return write_samples_npz(path, (images[i:i + 16] for i in range(0, n, 16)), n)
