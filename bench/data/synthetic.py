"""Procedurally generated class-conditional images: the embedded dataset of the `tiny` suite.

No download, seeded, vectorised numpy; thousands of 32x32 images per second on one CPU core.

Every class is a combination of three attributes on a grid, 8 shapes x 4 hues x 2 textures = 64 classes:

    class id c = shape + 8 * hue + 32 * texture

All classes share the same class-agnostic structure (KIND's learngenes should capture it): one rendering pipeline,
the same background statistics (a tinted grey with a low-frequency pattern), the same lighting gradient over background
and object, the same position / scale / rotation jitter and the same sensor noise. The class decides only the shape,
the hue of the object and whether it is solid or striped, so class-conditional generation is meaningful and a tiny
DiT can learn it.

Splits (`synthetic_split`): `pretrain` (48 classes) and `novel` (16 classes) are disjoint *combinations*; every
shape, hue and texture occurs in both, mirroring KIND's ImageNet protocol where novel classes share visual vocabulary
with the pre-training classes. `novel-a` and `novel-b` halve `novel` into two downstream tasks.

Domains (`SYNTHETIC_DOMAINS`) use the same geometry generator with a different appearance, for domain-shift tasks:
`natural` (default), `sketch` (pale outlines, hatched interiors, dark background) and `xray` (greyscale radiograph:
bright, soft-edged objects on dark film, the hue turned into a density level).

Determinism: image `i` of class `c` in domain `d` is a pure function of `(seed, d, c, i)` (and the resolution): its
random parameters come from a generator keyed by those four numbers, so subsets, orders and batch sizes never change
an image.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "star", "crescent")
HUES = {"red": 0.0, "lime": 0.25, "cyan": 0.5, "violet": 0.75}
TEXTURES = ("solid", "striped")
SYNTHETIC_DOMAINS = ("natural", "sketch", "xray")
NUM_SYNTHETIC_CLASSES = len(SHAPES) * len(HUES) * len(TEXTURES)

_HUE_NAMES = tuple(HUES)
_HUE_VALUES = np.array(list(HUES.values()))
# Images rendered per vectorised chunk: bounds peak memory at 64x64 (a few float arrays of chunk*H*W).
_CHUNK = 512
# Number of uniform draws per image; fixed so that adding a parameter later does not shift the noise stream.
_NUM_PARAMS = 16


def class_attributes(class_id: int) -> tuple[str, str, str]:
    """(shape, hue, texture) names of a synthetic class id."""
    if not 0 <= class_id < NUM_SYNTHETIC_CLASSES:
        raise ValueError(f"synthetic class id {class_id} out of range [0, {NUM_SYNTHETIC_CLASSES})")
    return (
        SHAPES[class_id % len(SHAPES)],
        _HUE_NAMES[(class_id // len(SHAPES)) % len(HUES)],
        TEXTURES[class_id // (len(SHAPES) * len(HUES))],
    )


def class_name(class_id: int) -> str:
    """Readable name such as `striped-cyan-star`."""
    shape, hue, texture = class_attributes(class_id)
    return f"{texture}-{hue}-{shape}"


def _is_novel(class_id: int) -> bool:
    # A Latin-square rule: for every (hue, texture) pair two of the eight shapes are novel, so each shape, hue and
    # texture is seen in pre-training and only their combinations are new.
    shape = class_id % len(SHAPES)
    hue = (class_id // len(SHAPES)) % len(HUES)
    texture = class_id // (len(SHAPES) * len(HUES))
    return (shape + hue + 2 * texture) % 4 == 3


def _build_splits() -> dict[str, tuple[int, ...]]:
    all_ids = tuple(range(NUM_SYNTHETIC_CLASSES))
    novel = tuple(c for c in all_ids if _is_novel(c))
    return {
        "all": all_ids,
        "pretrain": tuple(c for c in all_ids if not _is_novel(c)),
        "novel": novel,
        "novel-a": novel[0::2],
        "novel-b": novel[1::2],
    }


SYNTHETIC_SPLITS: dict[str, tuple[int, ...]] = _build_splits()


def synthetic_split(name: str) -> list[int]:
    """Class ids of a named split: `all`, `pretrain`, `novel`, `novel-a`, `novel-b`."""
    if name not in SYNTHETIC_SPLITS:
        raise ValueError(f"unknown synthetic split {name!r}; choose one of {sorted(SYNTHETIC_SPLITS)}")
    return list(SYNTHETIC_SPLITS[name])


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def _domain_key(domain: str) -> int:
    # A stable hash of the name, so adding a domain never changes the images of another.
    return zlib.crc32(domain.encode("utf-8"))


def _image_params(seed: int, domain: str, class_ids: np.ndarray, indices: np.ndarray, size: int):
    """Per-image uniforms (N, _NUM_PARAMS) and unit-normal sensor noise (N, size, size, 3)."""
    n = len(class_ids)
    uniforms = np.empty((n, _NUM_PARAMS))
    noise = np.empty((n, size, size, 3), dtype=np.float32)
    key = _domain_key(domain)
    for j in range(n):
        rng = np.random.default_rng([seed, key, int(class_ids[j]), int(indices[j])])
        uniforms[j] = rng.random(_NUM_PARAMS)
        noise[j] = rng.standard_normal((size, size, 3), dtype=np.float32)
    return uniforms, noise


def _shape_field(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like field of one shape in object units (negative inside; shapes span about radius 1)."""
    r = np.sqrt(u * u + v * v)
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return r - 1.0
    if shape == "square":
        return np.maximum(au, av) - 0.8
    if shape == "triangle":  # equilateral, pointing up, inradius 0.5
        s3 = np.sqrt(3.0) / 2
        return np.maximum.reduce([-v - 0.5, s3 * u + 0.5 * v - 0.5, -s3 * u + 0.5 * v - 0.5])
    if shape == "ring":
        return np.abs(r - 0.72) - 0.26
    if shape == "cross":
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if shape == "diamond":
        return (au + av - 1.1) / np.sqrt(2.0)
    if shape == "star":  # five points; the factor keeps the field's slope near 1 so edges anti-alias alike
        return (r - (0.62 + 0.38 * np.cos(5 * np.arctan2(v, u)))) * 0.7
    if shape == "crescent":
        return np.maximum(r - 1.0, 0.8 - np.sqrt((u - 0.45) ** 2 + v * v))
    raise ValueError(f"unknown shape {shape!r}")


def _shape_distance(shape_ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-image shape field for a batch: `shape_ids` (N,), `u`, `v` (N, H, W)."""
    out = np.empty_like(u)
    for shape_index, shape in enumerate(SHAPES):
        rows = shape_ids == shape_index
        if rows.any():
            out[rows] = _shape_field(shape, u[rows], v[rows])
    return out


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of shape (N,); returns (N, 3)."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + 6.0 * h[:, None]) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _render_chunk(seed: int, domain: str, class_ids: np.ndarray, indices: np.ndarray, size: int) -> np.ndarray:
    p, noise = _image_params(seed, domain, class_ids, indices, size)
    n = len(class_ids)
    shape_ids = class_ids % len(SHAPES)
    hue_ids = (class_ids // len(SHAPES)) % len(HUES)
    striped = (class_ids // (len(SHAPES) * len(HUES))) == 1

    # Pixel-centre coordinates in [-1, 1]; y grows downwards, v = -y points up so triangles point up.
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x = np.broadcast_to(axis[None, None, :], (n, size, size))
    y = np.broadcast_to(axis[None, :, None], (n, size, size))
    pixel = 2.0 / size

    # ---- class-agnostic structure: placement, lighting, background --------------------------------------------
    cx, cy = (p[:, 0] - 0.5) * 0.5, (p[:, 1] - 0.5) * 0.5
    scale = 0.42 + 0.22 * p[:, 2]
    angle = (p[:, 3] - 0.5) * np.deg2rad(30.0)  # small: a 45 degree turn would make a square a diamond
    light_dir = 2 * np.pi * p[:, 4]
    light_strength = 0.1 + 0.25 * p[:, 5]
    wave_freq = 1.5 + 2.5 * p[:, 10]
    wave_phase = 2 * np.pi * p[:, 11]

    def col(a):  # (N,) -> (N, 1, 1) for broadcasting over pixels
        return a[:, None, None]

    lighting = 1.0 + col(light_strength) * (x * col(np.cos(light_dir)) + y * col(np.sin(light_dir)))
    bg_pattern = 0.05 * np.sin(col(wave_freq) * (x + 0.7 * y) + col(wave_phase))

    dx, dy = x - col(cx), y - col(cy)
    cos_a, sin_a = col(np.cos(angle)), col(np.sin(angle))
    u = (cos_a * dx + sin_a * dy) / col(scale)
    v = -(-sin_a * dx + cos_a * dy) / col(scale)
    dist = _shape_distance(shape_ids, u, v) * col(scale)  # back to image units for anti-aliasing

    # Stripes in object coordinates, at a random (class-agnostic) angle.
    stripe_angle = np.pi * p[:, 12]
    stripe_phase = 2 * np.pi * p[:, 13]
    stripe_coord = u * col(np.cos(stripe_angle)) + v * col(np.sin(stripe_angle))
    stripes = 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * np.pi * stripe_coord / 0.55 + col(stripe_phase)))
    stripes = np.where(col(striped), stripes, 1.0)

    hue = (_HUE_VALUES[hue_ids] + (p[:, 14] - 0.5) * 0.06) % 1.0
    if domain == "sketch":
        rgb = _render_sketch(dist, stripes, hue, p, pixel, lighting)
    elif domain == "xray":
        rgb = _render_xray(dist, stripes, hue_ids, pixel, lighting, bg_pattern)
    else:
        rgb = _render_natural(dist, stripes, hue, p, pixel, lighting, bg_pattern)
    if domain == "xray":
        noise = noise[..., :1]  # film grain is grey too
    rgb = rgb + 0.02 * noise
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render_natural(dist, stripes, hue, p, pixel, lighting, bg_pattern) -> np.ndarray:
    """Coloured object (shaded stripes for striped classes) over a tinted grey background, both under one light."""
    saturation = 0.6 + 0.3 * p[:, 15]
    value = 0.95 - 0.15 * p[:, 15]
    fg = _hsv_to_rgb(hue, saturation, value)[:, None, None, :] * (0.45 + 0.55 * stripes[..., None])
    bg_level = 0.25 + 0.35 * p[:, 6]
    bg_tint = (p[:, 7:10] - 0.5) * 0.16
    bg = (bg_level[:, None, None] + bg_pattern)[..., None] + bg_tint[:, None, None, :]
    alpha = np.clip(0.5 - dist / pixel, 0.0, 1.0)[..., None]  # anti-aliased edge, one pixel wide
    return (alpha * fg + (1 - alpha) * bg) * lighting[..., None]


def _render_sketch(dist, stripes, hue, p, pixel, lighting) -> np.ndarray:
    """Pale outline (and hatching for striped classes) on a dark blue-black background."""
    n = dist.shape[0]
    line_half_width = 0.7 * pixel + 0.02
    outline = np.clip(1.0 - (np.abs(dist) - line_half_width) / pixel, 0.0, 1.0)
    inside = np.clip(0.5 - dist / pixel, 0.0, 1.0)
    hatching = inside * (1.0 - stripes) * 0.6
    ink = np.maximum(outline, hatching)[..., None]
    line_colour = _hsv_to_rgb(hue, np.full(n, 0.3), 0.85 + 0.1 * p[:, 15])[:, None, None, :]
    paper = np.array([0.03, 0.04, 0.09])[None, None, None, :] + 0.05 * p[:, 6][:, None, None, None]
    return (ink * line_colour + (1 - ink) * paper) * (0.85 + 0.15 * lighting[..., None])


def _render_xray(dist, stripes, hue_ids, pixel, lighting, bg_pattern) -> np.ndarray:
    """Greyscale radiograph look: bright, softly edged objects on a dark film; the hue becomes a density level."""
    density = (0.5 + 0.12 * hue_ids)[:, None, None]
    alpha = np.clip(0.5 - dist / (2.0 * pixel), 0.0, 1.0)  # twice as soft as the natural edge: scatter blur
    film = 0.12 + 0.5 * bg_pattern + alpha * density * (0.55 + 0.45 * stripes)
    film = film * (0.8 + 0.2 * lighting)
    return np.repeat(film[..., None], 3, axis=-1)


def render_images(
    class_ids: Sequence[int] | np.ndarray,
    indices: Sequence[int] | np.ndarray,
    *,
    image_size: int = 32,
    domain: str = "natural",
    seed: int = 0,
) -> np.ndarray:
    """Render image `indices[j]` of class `class_ids[j]` for every j; returns uint8 NHWC."""
    if domain not in SYNTHETIC_DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose one of {list(SYNTHETIC_DOMAINS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    class_ids = np.asarray(class_ids, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if class_ids.shape != indices.shape or class_ids.ndim != 1:
        raise ValueError(f"class_ids and indices must be 1-D of equal length, got {class_ids.shape}, {indices.shape}")
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= NUM_SYNTHETIC_CLASSES):
        raise ValueError(f"synthetic class ids must lie in [0, {NUM_SYNTHETIC_CLASSES})")
    if indices.size and indices.min() < 0:
        raise ValueError("image indices must be >= 0")
    out = np.empty((len(class_ids), image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, len(class_ids), _CHUNK):
        stop = start + _CHUNK
        out[start:stop] = _render_chunk(seed, domain, class_ids[start:stop], indices[start:stop], image_size)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """A class-conditional synthetic image set, rendered once at construction.

    Args:
        classes: synthetic class ids (see `synthetic_split`); None means all 64. Labels are relabelled to the
            position in this list (0..len-1), as a downstream task sees them.
        image_size: square resolution in pixels (16, 32 and 64 are tested).
        per_class: images per class.
        domain: one of `SYNTHETIC_DOMAINS`.
        seed: dataset seed; together with domain, class id and image index it fixes every image.
        first_index: index of the first image of each class, so a held-out or reference set can use
            `first_index=per_class_of_the_training_set` and never overlap with training images.

    Items are `(image, label)`: float32 CHW in [-1, 1] and an int.
    """

    def __init__(
        self,
        classes: Sequence[int] | None = None,
        *,
        image_size: int = 32,
        per_class: int = 64,
        domain: str = "natural",
        seed: int = 0,
        first_index: int = 0,
    ) -> None:
        class_list = list(range(NUM_SYNTHETIC_CLASSES)) if classes is None else [int(c) for c in classes]
        if not class_list:
            raise ValueError("classes must not be empty")
        if len(set(class_list)) != len(class_list):
            raise ValueError(f"classes contains duplicates: {class_list}")
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        if first_index < 0:
            raise ValueError(f"first_index must be >= 0, got {first_index}")
        self.classes = class_list
        self.class_names = [class_name(c) for c in class_list]
        self.image_size = image_size
        self.per_class = per_class
        self.domain = domain
        self.seed = seed
        # Class-major order: item k * per_class + i is image first_index + i of classes[k].
        self.labels = np.repeat(np.arange(len(class_list)), per_class)
        class_ids = np.repeat(np.asarray(class_list), per_class)
        indices = np.tile(np.arange(first_index, first_index + per_class), len(class_list))
        self._images = render_images(class_ids, indices, image_size=image_size, domain=domain, seed=seed)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self._images[idx]).permute(2, 0, 1).float()
        return image / 127.5 - 1.0, int(self.labels[idx])

    def raw_uint8(self, idx: int) -> np.ndarray:
        """Image `idx` as uint8 HWC (a view; do not modify)."""
        return self._images[idx]

    def images_uint8(self) -> np.ndarray:
        """All images as uint8 NHWC (ADM's `.npz` layout), for metric reference sets."""
        return self._images
