"""Sharded feature extraction over a sample source (docs/metrics.md §12).

Each rank reads only its contiguous index range, runs the extractors in strict float32, accumulates float64
moments per feature space (``pool`` 2048, ``spatial`` 2023, ``dinov2`` D) and keeps per-sample ``pool`` and
``logits`` for IS and P/R. Moments are merged with all_reduce; per-sample arrays are all-gathered in global index
order, so every rank ends with identical inputs to IS and P/R whatever the world size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import torch

from bench.metrics import distributed as D
from bench.metrics.networks import dinov2 as dino
from bench.metrics.networks.inception import InceptionV3TF
from bench.metrics.networks.numerics import strict_fp32
from bench.metrics.sample_io import SampleSource, open_samples
from bench.metrics.scores.stats import MomentAccumulator, Moments
from bench.progress import progress_bar


@dataclasses.dataclass
class FeatureSet:
    n: int
    moments: dict[str, Moments]
    pool: np.ndarray | None = None
    """(n, 2048) float32 in global order, when kept."""
    logits: np.ndarray | None = None
    """(n, 1008) float32 in global order, when kept."""
    digests: np.ndarray | None = None
    """(n,) int64 content hash of every image, for the duplicate diagnostic."""

    def duplicates(self) -> int | None:
        return None if self.digests is None else int(self.n - len(np.unique(self.digests)))


class _Batches(torch.utils.data.Dataset):
    """Item i = the i-th batch of a rank's range; each worker process reads through its own fresh reader."""

    def __init__(self, source: SampleSource, ranges, fdd_resize: str | None, fdd_size: int):
        self.proto, self.ranges, self.fdd_resize, self.fdd_size = source, ranges, fdd_resize, fdd_size
        self._source, self._pid = source, os.getpid()

    def __len__(self):
        return len(self.ranges)

    def __getitem__(self, i):
        if self._pid != os.getpid():
            self._source, self._pid = self.proto.fresh(), os.getpid()
        a, b = self.ranges[i]
        images = self._source.read(a, b)
        dino_in = dino.preprocess(images, self.fdd_resize, self.fdd_size) if self.fdd_resize else torch.empty(0)
        return a, torch.from_numpy(images), dino_in, torch.from_numpy(image_digests(images))


def image_digests(images: np.ndarray) -> np.ndarray:
    """64-bit BLAKE2 digest of each image's bytes (exact duplicates only)."""
    return np.array([int.from_bytes(hashlib.blake2b(im.tobytes(), digest_size=8).digest(), "little", signed=True)
                     for im in images], dtype=np.int64)


def source_name(source) -> str:
    """What a progress bar calls a sample source: its file or folder name, else its type."""
    path = getattr(source, "path", None)
    return os.path.basename(os.fspath(path)) if path is not None else type(source).__name__


def rank0_bar(description: str, count: int, rank: int, world: int) -> tuple[int, str]:
    """(total, description) of a sharded pass's bar: rank 0 shows its own shard, the other ranks none."""
    return (count if rank == 0 else 0), (description if world == 1 else f"{description} (rank 0 of {world})")


def _batch_ranges(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)]


def extract_features(
    source: SampleSource | str | os.PathLike,
    *,
    inception: InceptionV3TF | None = None,
    dinov2: torch.nn.Module | None = None,
    fdd_resize: str = "pil_bicubic_uint8",
    batch_size: int = 100,
    num_workers: int = 0,
    keep_per_sample: bool = True,
    limit: int | None = None,
) -> FeatureSet:
    """Features of the first ``limit`` (default all) samples of ``source``, sharded over the process group."""
    if inception is None and dinov2 is None:
        raise ValueError("give at least one extractor (inception and/or dinov2)")
    if not isinstance(source, SampleSource):
        source = open_samples(source)
    n = len(source) if limit is None else min(limit, len(source))
    rank, world = D.rank_and_world()
    start, stop = D.shard_range(n, rank, world, align=batch_size)  # whole batches: W-independent features
    device = (inception or dinov2).parameters().__next__().device
    acc: dict[str, MomentAccumulator] = {}
    if inception is not None:
        acc["pool"] = MomentAccumulator(2048, device)
        acc["spatial"] = MomentAccumulator(2023, device)
    if dinov2 is not None:
        acc["dinov2"] = MomentAccumulator(dinov2.num_features, device)
    pools, logits, digests = [], [], []
    fdd_size = dinov2.patch_embed.img_size[0] if dinov2 is not None else 0
    dataset = _Batches(source, _batch_ranges(start, stop, batch_size), fdd_resize if dinov2 is not None else None,
                       fdd_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)
    total, description = rank0_bar(f"features: {source_name(source)}", stop - start, rank, world)
    with strict_fp32(), torch.no_grad(), progress_bar(total, description) as advance:
        for _, images, dino_in, digest in loader:
            digests.append(digest)
            if inception is not None:
                out = inception(images.to(device))
                acc["pool"].update(out.pool)
                acc["spatial"].update(out.spatial)
                if keep_per_sample:
                    pools.append(out.pool.cpu())
                    logits.append(out.logits_unbiased.cpu())
            if dinov2 is not None:
                acc["dinov2"].update(dinov2(dino_in.to(device)).float())
            advance(len(images))
    moments = {name: a.all_reduce_().moments() for name, a in acc.items()}
    result = FeatureSet(n=n, moments=moments)
    result.digests = _gather(digests, (), n, batch_size, torch.int64).numpy()
    if inception is not None and keep_per_sample:
        result.pool = _gather(pools, (2048,), n, batch_size).numpy()
        result.logits = _gather(logits, (1008,), n, batch_size).numpy()
    return result


def _gather(parts: list[torch.Tensor], shape: tuple, n: int, align: int, dtype=torch.float32) -> torch.Tensor:
    local = torch.cat(parts) if parts else torch.empty((0,) + shape, dtype=dtype)
    return D.all_gather_rows(local, n, align)
