"""Reference statistics: ADM's reference batch, our derived extract, and references we build and version.

* ``load_reference``: an ADM-style ``.npz`` (``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and the 10k P/R images in
  ``arr_0``) or one of ours (same keys plus ``ref_pool`` features and a JSON ``provenance``). Everything is read
  lazily; ``arr_0`` is streamed.
* ``save_reference``: writes such a file atomically with its provenance (source, crop, resize, extractor, weights
  sha256, image-list hash, N) and returns its sha256 for the manifest and the records.
* ``ImageFolderSource``: any class-folder image dataset as a sample source, ADM ``center_crop_arr`` applied, so
  reference statistics for ImageFolder datasets (and the FDD ImageNet reference, docs/metrics.md §9.4)
  use the training crop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from bench.metrics.sample_io import NpzSamples, SampleSource
from bench.metrics.scores.stats import Moments
from bench.records.atomic import atomic_path
from bench.records.fields import utc_now
from bench.records.hashing import file_sha256

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG", ".PNG", ".JPG")


@dataclasses.dataclass
class Reference:
    path: Path
    sha256: str
    keys: list[str]
    moments: dict[str, Moments]
    """'pool' (mu, sigma), 'spatial' (mu_s, sigma_s), or 'dinov2' for an FDD reference."""
    provenance: dict
    ref_pool: np.ndarray | None = None
    """Cached pool features of the P/R reference images, valid for ``provenance['inception_sha256']``."""

    def images(self) -> NpzSamples | None:
        return NpzSamples(self.path, verify=False) if "arr_0" in self.keys else None  # its sha256 is checked


def _moments(data, mu_key: str, sigma_key: str, n: int) -> Moments:
    mu = np.asarray(data[mu_key], dtype=np.float64)
    sigma = np.asarray(data[sigma_key], dtype=np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{sigma_key} has shape {sigma.shape}, expected {(mu.shape[0],) * 2}")
    return Moments(n=n, mu=mu, sigma=sigma)


def load_reference(path: str | os.PathLike, *, sha256: str | None = None) -> Reference:
    """Open an ADM or kindbench reference ``.npz``. ``sha256`` skips re-hashing when the caller already verified it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference file not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        data = np.load(path, allow_pickle=False)  # lazy: members are read (and CRC-checked) on access
        provenance = json.loads(str(data["provenance"])) if "provenance" in keys else {"source": "external (ADM)"}
        n = int(provenance.get("n", -1))
        moments = {}
        if "mu" in keys and "sigma" in keys:
            space = provenance.get("space", "pool")
            moments[space] = _moments(data, "mu", "sigma", n)
        if "mu_s" in keys and "sigma_s" in keys:
            moments["spatial"] = _moments(data, "mu_s", "sigma_s", n)
        ref_pool = np.asarray(data["ref_pool"], dtype=np.float32) if "ref_pool" in keys else None
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise ValueError(f"reference {path} is not a readable .npz ({err}): it is truncated or corrupt; rebuild "
                         "or re-download it") from None
    if not moments:
        raise ValueError(f"{path}: no reference statistics (expected mu/sigma and optionally mu_s/sigma_s); "
                         f"keys are {keys}")
    return Reference(path=path, sha256=sha256 or file_sha256(path), keys=keys, moments=moments,
                     provenance=provenance, ref_pool=ref_pool)


def save_reference(path: str | os.PathLike, moments: dict[str, Moments], provenance: dict,
                   ref_pool: np.ndarray | None = None, images: np.ndarray | None = None) -> str:
    """Write a reference ``.npz`` atomically; returns its sha256.

    ``moments['pool']`` or ``moments['dinov2']`` go to ``mu``/``sigma`` (the space is named in the provenance);
    ``moments['spatial']`` to ``mu_s``/``sigma_s``, so ADM's evaluator can read our Inception references too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    main = [k for k in moments if k != "spatial"]
    if len(main) != 1:
        raise ValueError(f"a reference holds exactly one main feature space, got {main}")
    space = main[0]
    arrays = {"mu": moments[space].mu, "sigma": moments[space].sigma}
    if "spatial" in moments:
        arrays.update(mu_s=moments["spatial"].mu, sigma_s=moments["spatial"].sigma)
    if ref_pool is not None:
        arrays["ref_pool"] = np.asarray(ref_pool, dtype=np.float32)
    if images is not None:
        arrays["arr_0"] = images
    prov = dict(provenance, space=space, n=moments[space].n, created=utc_now())
    arrays["provenance"] = np.array(json.dumps(prov, sort_keys=True))
    with atomic_path(path, suffix=".tmp.npz") as tmp:  # .npz suffix: np.savez would append one otherwise
        np.savez(tmp, **arrays)
    return file_sha256(path)


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM/DiT training crop: BOX-halve while the short side ≥ 2·size, BICUBIC short side to size, centre crop."""
    from PIL import Image

    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image.convert("RGB"))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


class ImageFolderSource(SampleSource):
    """Images under ``root`` (recursively, sorted paths), centre-cropped to ``image_size``; optional seeded subset."""

    def __init__(self, root: str | os.PathLike, image_size: int = 256, num: int | None = None, seed: int = 0):
        self.path = Path(root)
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.path}")
        files = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.suffix in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{self.path}: no images ({', '.join(IMAGE_EXTENSIONS[:5])}…)")
        if num is not None and num < len(files):
            keep = np.sort(np.random.default_rng(seed).choice(len(files), num, replace=False))
            files = [files[i] for i in keep]
        self.files = files
        self.image_size = image_size
        self.shape = (len(files), image_size, image_size, 3)

    def list_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.files).encode()).hexdigest()

    def read(self, start: int, stop: int) -> np.ndarray:
        from PIL import Image

        out = np.empty((stop - start,) + self.shape[1:], dtype=np.uint8)
        for i, rel in enumerate(self.files[start:stop]):
            with Image.open(self.path / rel) as im:
                out[i] = center_crop_arr(im.convert("RGB"), self.image_size)
        return out
