"""The domain feature extractor of the embedded synthetic suite: a small CNN trained once on the synthetic data.

Inception-v3 and DINOv2 never saw 16-64 px renders of striped cyan stars, so the tiny suite scores samples in the
feature space of a classifier trained on the suite's own data (``bench.data.synthetic``), the way FID uses an
ImageNet classifier for ImageNet. It replaces the Inception network, not the metrics: the Fréchet distance, IS and
precision/recall functions are the project's (``domain_eval``). Numbers from this extractor are only comparable with
numbers from the same extractor name and weights sha256; records say which (``protocol.extractor``).

* **Network** (``ARCH``): four conv3x3-BN-ReLU blocks of 16, 32, 64, 128 channels with 2x2 max-pooling between
  them, global average pooling, a linear 64-class classifier. About 0.1 M parameters.
* **Features**: the 128-d pooled output of the last block (penultimate layer; post-ReLU like Inception's pool_3)
  for Fréchet distance and precision/recall; the 64 classifier logits for IS.
* **Input rule**: uint8 NHWC RGB, square, any size >= 8 → float32 ``x / 127.5 - 1`` (the dataset's scaling) →
  resized to 32x32 with ``torch.nn.functional.interpolate(mode="bilinear", antialias=True,
  align_corners=False)`` when the size differs. Antialiasing is a no-op for upsampling (16 → 32 is plain
  bilinear) and a triangle filter for downsampling, so large inputs do not alias. 32 px input is used as is.
* **Training** (``DomainRecipe``): all 64 classes of all three domains, rendered at 16, 32 and 64 px and brought to
  32 px by the input rule above, so each suite resolution is in-distribution. The loss is the 64-class cross entropy
  plus two auxiliary heads that are dropped afterwards: the domain (3-way), which keeps domain shift visible in the
  features, and the class attributes (shape 8, hue 4, texture 2), which speed up learning of the combinatorial
  classes on a CPU budget. AdamW with a one-cycle schedule; seeded init and shuffling; deterministic algorithms.
  Held-out accuracy (images of indices never used in training) is measured and stored with the weights.
* **Cache**: ``<cache_dir>/kindbench-synthetic-cnn-v1-<key16>.safetensors``. The key hashes the extractor version,
  the architecture, the recipe (data and optimisation) and a fingerprint of the generator's output, so a change to
  any of them trains a new file; the torch version is recorded in the metadata but not hashed. Cache dir: the
  argument, else ``$KINDBENCH_CACHE_DIR/extractors``, else ``~/.cache/kindbench/extractors``.
* **Concurrency**: on a miss the trainer holds an advisory ``flock`` on ``<file>.lock`` and re-checks the cache
  after acquiring it, so a second process waits and then loads the first one's file instead of training again.
  The file is written to a temp name and renamed into place, so readers never see half a file even where flock
  does not work.
* **Corruption policy**: a cached file that cannot be parsed, whose metadata belongs to another key, or whose
  tensors do not match the digest stored in its metadata is a ``CorruptExtractorError``. With
  ``train_if_missing=True`` (the default) it is reported with a warning and replaced by a fresh training run; with
  ``train_if_missing=False`` the error is raised.

Bitwise reproducibility: training runs on one intra-op thread whatever the caller's setting, so the same recipe and
torch build give the same weights sha256 on the same kind of CPU (measured: 1 vs 2 threads otherwise differ).
Another CPU instruction set or torch build may differ in the last bits; the records carry the weights sha256, so
such a difference is visible rather than silent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.data.synthetic import HUES, NUM_SYNTHETIC_CLASSES, SHAPES, SYNTHETIC_DOMAINS, TEXTURES, render_images
from bench.metrics.networks.numerics import strict_fp32
from bench.metrics.sample_io import validate_images
from bench.records.atomic import atomic_path, write_json_atomic
from bench.records.fields import utc_now
from bench.records.hashing import file_sha256

EXTRACTOR_NAME = "kindbench-synthetic-cnn-v1"
EXTRACTOR_VERSION = 1
"""Bump when the network code, the input rule or the training loop changes meaning (the recipe is hashed anyway)."""
FILE_FORMAT = "kindbench-domain-extractor/1"
METADATA_KEY = "kindbench_extractor"
WORKING_SIZE = 32
RESIZE_RULE = "torch_bilinear_antialias_to_32"
MIN_IMAGE_SIZE = 8
CACHE_ENV = "KINDBENCH_CACHE_DIR"
ARCH = {"block": "conv3x3-bn-relu", "widths": (16, 32, 64, 128), "downsample": "maxpool2x2",
        "pool": "global_avg", "feature_layer": "pooled last block (post-ReLU)", "classes": NUM_SYNTHETIC_CLASSES}
_NUM_ATTRIBUTES = len(SHAPES) + len(HUES) + len(TEXTURES)


class CorruptExtractorError(ValueError):
    """A cached extractor file that cannot be trusted (unreadable, foreign key, or tensors not matching)."""


# --------------------------------------------------------------------------------------------------------------------
# Network and input rule
# --------------------------------------------------------------------------------------------------------------------


class DomainCNN(nn.Module):
    """conv3x3-BN-ReLU blocks with max-pooling between them, global average pooling and a linear classifier."""

    def __init__(self, widths: tuple[int, ...] = ARCH["widths"], num_classes: int = NUM_SYNTHETIC_CLASSES):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            in_ch = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_ch, num_classes)
        self.feature_dim = in_ch
        # channels_last: oneDNN's fast CPU convolutions for few channels (measured about 2x faster training)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, feature_dim), logits (N, classes)) of inputs prepared by ``prepare_images``."""
        feats = self.body(x.contiguous(memory_format=torch.channels_last))
        return feats, self.classifier(feats)


def prepare_images(images: np.ndarray) -> torch.Tensor:
    """The input rule: uint8 NHWC square RGB → float32 NCHW in [-1, 1] at 32x32 (module docstring)."""
    validate_images(images, where="domain extractor input")
    height, width = images.shape[1:3]
    if height != width:
        raise ValueError(f"domain extractor input must be square, got {height}x{width}")
    if height < MIN_IMAGE_SIZE:
        raise ValueError(f"domain extractor input must be at least {MIN_IMAGE_SIZE} px, got {height}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if height != WORKING_SIZE:
        x = F.interpolate(x, size=(WORKING_SIZE, WORKING_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Training recipe and data
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DomainRecipe:
    """Everything that decides the trained weights; hashed (with ``ARCH``) into the cache key."""

    data_seed: int = 0
    """``seed`` of the synthetic generator."""
    domains: tuple[str, ...] = SYNTHETIC_DOMAINS
    train_per_class: tuple[tuple[int, int], ...] = ((16, 16), (32, 32), (64, 4))
    """(render size, images per class and domain): image indices 0..n-1 of every class."""
    holdout_per_class: tuple[tuple[int, int], ...] = ((16, 4), (32, 8), (64, 2))
    """Held-out images per class and domain, indices from max(train counts) on, so no scene is seen in training."""
    epochs: int = 4
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.25
    domain_loss_weight: float = 0.3
    attribute_loss_weight: float = 1.0
    init_seed: int = 0
    """Seed of the weight init and of the shuffling order."""

    def as_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples → lists, as stored in the metadata


@dataclasses.dataclass
class _Split:
    x: torch.Tensor
    """Prepared images (N, 3, 32, 32)."""
    classes: torch.Tensor
    domains: torch.Tensor
    sizes: torch.Tensor
    """Render size of each image, for per-resolution accuracy."""


def _render_split(recipe: DomainRecipe, counts: tuple[tuple[int, int], ...], first_index: int) -> _Split:
    parts = []
    for size, per_class in counts:
        class_ids = np.repeat(np.arange(NUM_SYNTHETIC_CLASSES), per_class)
        indices = np.tile(np.arange(first_index, first_index + per_class), NUM_SYNTHETIC_CLASSES)
        for d, domain in enumerate(recipe.domains):
            images = render_images(class_ids, indices, image_size=size, domain=domain, seed=recipe.data_seed)
            n = len(class_ids)
            parts.append((prepare_images(images), torch.from_numpy(class_ids), torch.full((n,), d),
                          torch.full((n,), size)))
    return _Split(*(torch.cat(column) for column in zip(*parts)))


def _render_data(recipe: DomainRecipe) -> tuple[_Split, _Split]:
    if not recipe.train_per_class or not recipe.holdout_per_class or not recipe.domains:
        raise ValueError("the domain extractor recipe needs training and held-out render sizes and a domain")
    for domain in recipe.domains:
        if domain not in SYNTHETIC_DOMAINS:
            raise ValueError(f"unknown synthetic domain {domain!r} in the recipe; choose from {SYNTHETIC_DOMAINS}")
    holdout_start = max(n for _, n in recipe.train_per_class)
    return _render_split(recipe, recipe.train_per_class, 0), _render_split(recipe, recipe.holdout_per_class,
                                                                            holdout_start)


def generator_fingerprint(seed: int = 0) -> str:
    """sha256 of one 16 px render per class and domain: changes whenever the synthetic generator's output does."""
    h = hashlib.sha256()
    ids = np.arange(NUM_SYNTHETIC_CLASSES)
    for domain in SYNTHETIC_DOMAINS:
        h.update(render_images(ids, np.zeros_like(ids), image_size=16, domain=domain, seed=seed).tobytes())
    return h.hexdigest()


def cache_key(recipe: DomainRecipe) -> str:
    """Content hash naming the cached weights (module docstring: what it covers and what it leaves out)."""
    spec = {"name": EXTRACTOR_NAME, "version": EXTRACTOR_VERSION, "arch": ARCH, "working_size": WORKING_SIZE,
            "resize": RESIZE_RULE, "recipe": recipe.as_dict(), "generator": generator_fingerprint(recipe.data_seed)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


class _AuxHeads(nn.Module):
    """Training-only heads on the features: domain and class attributes (shape, hue, texture)."""

    def __init__(self, dim: int, num_domains: int):
        super().__init__()
        self.domain = nn.Linear(dim, num_domains)
        self.attributes = nn.Linear(dim, _NUM_ATTRIBUTES)

    def loss(self, feats: torch.Tensor, classes: torch.Tensor, domains: torch.Tensor, recipe: DomainRecipe):
        n_shape, n_hue = len(SHAPES), len(HUES)
        a = self.attributes(feats)
        attribute_loss = (F.cross_entropy(a[:, :n_shape], classes % n_shape)
                          + F.cross_entropy(a[:, n_shape:n_shape + n_hue], (classes // n_shape) % n_hue)
                          + F.cross_entropy(a[:, n_shape + n_hue:], classes // (n_shape * n_hue)))
        return (recipe.domain_loss_weight * F.cross_entropy(self.domain(feats), domains)
                + recipe.attribute_loss_weight * attribute_loss)


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded RNG, deterministic kernels and ONE intra-op thread for the block; the caller's settings come back.

    One thread because CPU reductions split work by thread count, so 1 vs 2 threads give weights that differ in the
    last bits (measured): training single-threaded makes the weights sha256 independent of OMP_NUM_THREADS
    (torchrun sets 1, pytest has 2). The price is at most the second core during training.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            with strict_fp32():
                yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)


def _accuracy_report(model: DomainCNN, split: _Split, domains: tuple[str, ...]) -> dict:
    model.eval()
    with torch.inference_mode():
        correct = torch.cat([model(x)[1].argmax(1) for x in split.x.split(512)]) == split.classes
    report = {"overall": correct.float().mean().item()}
    for d, domain in enumerate(domains):
        report[f"domain={domain}"] = correct[split.domains == d].float().mean().item()
    for size in split.sizes.unique().tolist():
        report[f"size={size}"] = correct[split.sizes == size].float().mean().item()
    return report


@dataclasses.dataclass
class TrainedWeights:
    state_dict: dict[str, torch.Tensor]
    accuracy: dict
    n_train: int
    n_holdout: int
    wall_s: float


def train_domain_cnn(recipe: DomainRecipe) -> TrainedWeights:
    """Render the data and train ``DomainCNN`` once, deterministically; returns the weights and held-out accuracy."""
    start = time.perf_counter()
    train, holdout = _render_data(recipe)
    with _deterministic(recipe.init_seed):
        model = DomainCNN()
        heads = _AuxHeads(model.feature_dim, len(recipe.domains))
        params = list(model.parameters()) + list(heads.parameters())
        steps_per_epoch = len(train.x) // recipe.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"the recipe renders {len(train.x)} training images, fewer than one batch")
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch,
                                                    pct_start=recipe.warmup_fraction)
        order = torch.Generator().manual_seed(recipe.init_seed)
        model.train()
        for _ in range(recipe.epochs):
            perm = torch.randperm(len(train.x), generator=order)
            for i in range(steps_per_epoch):  # the last partial batch is dropped: BN statistics stay well defined
                idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                feats, logits = model(train.x[idx])
                loss = F.cross_entropy(logits, train.classes[idx]) + heads.loss(feats, train.classes[idx],
                                                                                train.domains[idx], recipe)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        accuracy = _accuracy_report(model, holdout, recipe.domains)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return TrainedWeights(state, accuracy, len(train.x), len(holdout.x), time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------------------
# Cache: safetensors file with metadata, atomic write, lock on a miss
# --------------------------------------------------------------------------------------------------------------------


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else ``$KINDBENCH_CACHE_DIR/extractors``, else ``~/.cache/kindbench/extractors``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "kindbench") / "extractors"


def cache_path(cache_dir: str | os.PathLike | None = None, recipe: DomainRecipe | None = None) -> Path:
    """Where the weights for ``recipe`` (default recipe if None) live."""
    key = cache_key(recipe or DomainRecipe())
    return resolve_cache_dir(cache_dir) / f"{EXTRACTOR_NAME}-{key[:16]}.safetensors"


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, sorted by name (stored in the metadata)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".train.json")


def _save(path: Path, trained: TrainedWeights, key: str, recipe: DomainRecipe) -> None:
    """Weights + deterministic metadata (one JSON key: safetensors orders several keys randomly) + a timing sidecar.

    The weights file holds nothing time-dependent, so training twice gives a byte-identical file and the same
    sha256; when and how long it trained goes to ``<file>.train.json``, which nothing depends on.
    """
    from safetensors.torch import save_file

    metadata = {
        "format": FILE_FORMAT, "name": EXTRACTOR_NAME, "version": EXTRACTOR_VERSION, "cache_key": key,
        "arch": ARCH, "recipe": recipe.as_dict(), "generator_fingerprint": generator_fingerprint(recipe.data_seed),
        "working_size": WORKING_SIZE, "resize_rule": RESIZE_RULE,
        "accuracy": trained.accuracy["overall"], "accuracy_by": trained.accuracy,
        "n_train": trained.n_train, "n_holdout": trained.n_holdout, "train_threads": 1,
        "torch": torch.__version__, "numpy": np.__version__, "tensors_sha256": tensors_digest(trained.state_dict),
    }
    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        save_file(trained.state_dict, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    timing = {"created_at": utc_now(),
              "train_wall_s": round(trained.wall_s, 2), "host": platform.node(), "python": platform.python_version()}
    write_json_atomic(_sidecar(path), timing, overwrite=True)


def _read(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and metadata of a cached file; ``CorruptExtractorError`` if anything does not check out."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            state = {name: f.get_tensor(name) for name in f.keys()}
        metadata = json.loads(raw) if raw is not None else {}
    except Exception as err:  # safetensors raises its own error types for bad headers and truncated data
        reason = f"{type(err).__name__}: {err}"
        raise CorruptExtractorError(f"cached domain extractor {path} is unreadable ({reason})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FILE_FORMAT or metadata.get("cache_key") != key:
        found = metadata.get("cache_key", "") if isinstance(metadata, dict) else ""
        raise CorruptExtractorError(f"cached domain extractor {path} has foreign or missing metadata "
                                    f"(expected key {key[:16]}, found {str(found)[:16]!r})")
    if tensors_digest(state) != metadata.get("tensors_sha256"):
        raise CorruptExtractorError(f"cached domain extractor {path}: tensors do not match the stored digest")
    return state, metadata


@contextlib.contextmanager
def _miss_lock(path: Path) -> Iterator[None]:
    """Advisory lock serialising training of one cache entry; a no-op where the filesystem has no flock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass  # atomic rename alone keeps the file whole; two processes may then both train
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


class DomainExtractor:
    """A trained ``DomainCNN`` plus its provenance; ``features`` maps uint8 images to (features, logits)."""

    def __init__(self, model: DomainCNN, path: Path, metadata: dict):
        self.model = model.eval()
        self.path = path
        self.metadata = metadata
        self.name: str = metadata["name"]
        self.sha256: str = file_sha256(path)
        self.feature_dim: int = model.feature_dim
        self.num_classes: int = model.classifier.out_features
        self.accuracy: float = float(metadata["accuracy"])
        """Held-out accuracy over every domain and render size of the recipe, measured right after training."""
        self.accuracy_by: dict = metadata["accuracy_by"]
        self.resize_rule: str = metadata["resize_rule"]
        self.working_size: int = int(metadata["working_size"])
        self.device = torch.device("cpu")

    @property
    def train_info(self) -> dict:
        """When and how long the cached weights trained (``<file>.train.json``; empty if that file is gone)."""
        try:
            return json.loads(_sidecar(self.path).read_text())
        except (OSError, ValueError):
            return {}

    def to(self, device: str | torch.device) -> DomainExtractor:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def describe(self) -> dict:
        """Provenance for records: name, weights sha256 and path, accuracy, the torch it was trained with."""
        return {"name": self.name, "sha256": self.sha256, "path": str(self.path), "feature_dim": self.feature_dim,
                "num_classes": self.num_classes, "heldout_accuracy": self.accuracy, "accuracy_by": self.accuracy_by,
                "resize_rule": self.resize_rule, "working_size": self.working_size,
                "cache_key": self.metadata["cache_key"], "trained_with_torch": self.metadata["torch"]}

    def features(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(features float64 (N, feature_dim), logits float64 (N, classes)) of uint8 NHWC square RGB images."""
        validate_images(images, where="domain extractor input")
        if len(images) == 0:
            raise ValueError("domain extractor input is empty (0 images)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        feats, logits = [], []
        with torch.inference_mode(), strict_fp32():
            for start in range(0, len(images), batch_size):
                x = prepare_images(images[start:start + batch_size]).to(self.device)
                f, lg = self.model(x)
                feats.append(f.double().cpu().numpy())
                logits.append(lg.double().cpu().numpy())
        return np.concatenate(feats), np.concatenate(logits)


def _build(path: Path, key: str, device: str | torch.device) -> DomainExtractor:
    state, metadata = _read(path, key)
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG (sampling seeds)
        model = DomainCNN()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CorruptExtractorError(f"cached domain extractor {path} does not fit the network: {err}") from None
    return DomainExtractor(model, path, metadata).to(device)


def load_domain_extractor(cache_dir: str | os.PathLike | None = None, *, train_if_missing: bool = True,
                          recipe: DomainRecipe | None = None, device: str | torch.device = "cpu") -> DomainExtractor:
    """The cached extractor for ``recipe`` (default: the suite's), trained on a miss unless told not to.

    Raises ``FileNotFoundError`` on a miss with ``train_if_missing=False``; a corrupt file is retrained (with a
    warning) or, with ``train_if_missing=False``, raised as ``CorruptExtractorError``.
    """
    recipe = recipe or DomainRecipe()
    key = cache_key(recipe)
    path = resolve_cache_dir(cache_dir) / f"{EXTRACTOR_NAME}-{key[:16]}.safetensors"
    if path.is_file():
        try:
            return _build(path, key, device)
        except CorruptExtractorError as err:
            if not train_if_missing:
                raise
            warnings.warn(f"{err}; retraining it")
    elif not train_if_missing:
        raise FileNotFoundError(f"domain extractor {EXTRACTOR_NAME} not cached: expected {path} (train it with "
                                "load_domain_extractor(train_if_missing=True), or set the cache dir / "
                                f"${CACHE_ENV} to where it was trained)")
    with _miss_lock(path):
        if path.is_file():  # another process trained it while we waited for the lock
            with contextlib.suppress(CorruptExtractorError):
                return _build(path, key, device)
        _save(path, train_domain_cnn(recipe), key, recipe)
    return _build(path, key, device)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.metrics.networks.domain [--cache-dir DIR]``: train (or find) the extractor and print its
    provenance.

    Run it once before launching many jobs on a fresh cache, so they load the file instead of queueing on the lock.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.metrics.networks.domain", description=main.__doc__)
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV}/extractors or ~/.cache/kindbench")
    parser.add_argument("--no-train", action="store_true", help="fail instead of training on a cache miss")
    args = parser.parse_args(argv)
    extractor = load_domain_extractor(args.cache_dir, train_if_missing=not args.no_train)
    print(json.dumps({**extractor.describe(), "train_info": extractor.train_info}, indent=2))


if __name__ == "__main__":
    main()
