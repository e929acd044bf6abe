"""Sharded VAE latent cache: encode every image once, train on posterior samples drawn fresh at every access.

Layout of a cache directory:

    shard_00000.safetensors ...   shard k holds images [k * shard_size, min((k + 1) * shard_size, count))
    manifest.json                 written last, by rank 0, once every shard exists (`finalize_latent_cache`)

Each shard stores the posterior `mean` and `std` (unscaled VAE units) of every image and, with `flips=True`, of its
horizontal mirror (`mean_flip`, `std_flip`), plus `label` and the global `index`. Keeping moments instead of one
sample, and both flips, avoids fast-DiT's frozen sample and frozen flip (docs/harness.md §5.5); `LatentDataset`
draws `scale * (mean + std * eps - shift)` and a flip per access, seeded by (seed, index, epoch) so a resumed run sees
the same draws (or hands the scaled moments to a trainer that draws them itself: `LatentDataset.moments`).

Shard indices are global, and rank r of world_size writes shards k with k % world_size == r, so ranks never write
the same file. A shard is written to a temporary name and renamed, so an existing shard is complete; a rerun skips
every shard whose header matches (index range, image count, VAE weights hash, flips, storage dtype) and rewrites the
others. The manifest records count, shapes, dtype, VAE directory and weights sha256, scale and shift, per-shard
byte size and sha256, and the channel-wise mean/std of the scaled posterior means (LightningDiT's latent stats).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset

from bench.models.vae import (
    encode_moments,
    load_vae,
    resolve_vae_dir,
    vae_scale_factor,
    vae_shift_factor,
    vae_weights_file,
)
from bench.records.atomic import atomic_path
from bench.records.hashing import file_sha256  # also re-exported: callers use bench.data.latents.file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = "kindbench-latents/1"
MANIFEST_FILE = "manifest.json"
_STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Header fields that must match for an existing shard to be reused on resume.
# All our shard metadata lives as sorted JSON under this one key: safetensors writes its metadata map in hash order,
# so several keys would make two builds of the same shard differ byte for byte.
_HEADER_KEY = "kindbench"
_RESUME_KEYS = ("format", "start", "stop", "count", "shard_size", "flips", "vae_sha256", "storage_dtype")


def shard_file_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous global index range [start, stop) of every shard."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def _read_header(path: Path) -> dict:
    """The shard's own header (our JSON under one safetensors metadata key)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _HEADER_KEY not in metadata:
        raise ValueError(f"{path} is not a kindbench latent shard (no {_HEADER_KEY!r} metadata)")
    return json.loads(metadata[_HEADER_KEY])


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's when initialised, else a single process."""
    distributed = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


# --------------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LatentCacheBuild:
    """What one call of `build_latent_cache` did on this rank."""

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    manifest: Path | None = None


def build_latent_cache(
    dataset: Dataset,
    vae_dir: str | Path | None,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    shard_size: int = 4096,
    rank: int | None = None,
    world_size: int | None = None,
    flips: bool = True,
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype = torch.float32,
    storage_dtype: str = "float32",
    num_workers: int = 0,
) -> LatentCacheBuild:
    """Encode `dataset` (items `(image CHW in [-1, 1], label)`) into a sharded latent cache in `out_dir`.

    This rank writes shards k % world_size == rank that are missing or stale. When torch.distributed is initialised
    and `world_size` is its world size, all ranks meet at a barrier and rank 0 writes the manifest; in a single
    process (world_size 1) the manifest is written directly; otherwise call `finalize_latent_cache` once every rank
    is done. `vae_dir` None means `$KINDBENCH_VAE_DIR`.
    """
    rank, world_size = _resolve_rank(rank, world_size)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if storage_dtype not in _STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(_STORAGE_DTYPES)}, got {storage_dtype!r}")
    count = len(dataset)
    if count == 0:
        raise ValueError("cannot build a latent cache of an empty dataset")
    vae_dir = resolve_vae_dir(vae_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    header = {
        "format": CACHE_FORMAT,
        "count": count,
        "shard_size": shard_size,
        "flips": bool(flips),
        "vae_sha256": file_sha256(vae_weights_file(vae_dir)),
        "vae_dir": str(vae_dir.resolve()),
        "storage_dtype": storage_dtype,
    }
    result = LatentCacheBuild()
    vae = None  # loaded only if some shard has to be written, so a finished rerun costs no VAE load
    for k, (start, stop) in enumerate(shard_ranges(count, shard_size)):
        if k % world_size != rank:
            continue
        path = out_dir / shard_file_name(k)
        shard_header = {**header, "start": start, "stop": stop}
        if _shard_matches(path, shard_header):
            result.skipped.append(k)
            continue
        if vae is None:
            vae = load_vae(vae_dir, device=device, dtype=vae_dtype)
            # Any manifest from an earlier build no longer describes the shards.
            (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        _write_shard(vae, dataset, range(start, stop), path, shard_header, batch_size, flips, num_workers)
        result.written.append(k)
    log.info("latent cache %s rank %d/%d: wrote %s, kept %s", out_dir, rank, world_size, result.written,
             result.skipped)

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size:
        dist.barrier()
        failure: list[str | None] = [None]
        if rank == 0:
            try:
                finalize_latent_cache(out_dir)
            except Exception as err:
                failure[0] = f"{type(err).__name__}: {err}"
                dist.broadcast_object_list(failure, src=0)  # release the other ranks before raising
                raise
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise RuntimeError(f"rank 0 could not finalise latent cache {out_dir}: {failure[0]}")
        result.manifest = out_dir / MANIFEST_FILE
    elif world_size == 1:
        result.manifest = finalize_latent_cache(out_dir)
    return result


def _shard_matches(path: Path, expected: dict) -> bool:
    if not path.is_file():
        return False
    try:
        found = _read_header(path)
    except Exception:  # noqa: BLE001 - an unreadable header means a damaged file: rewrite it
        log.warning("latent shard %s has an unreadable header; rewriting it", path)
        return False
    if all(found.get(key) == expected[key] for key in _RESUME_KEYS):
        return True
    log.warning("latent shard %s was built with other settings; rewriting it", path)
    return False


def _write_shard(vae, dataset, indices: range, path: Path, header: dict, batch_size, flips, num_workers):
    scale, shift = vae_scale_factor(vae), vae_shift_factor(vae)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mean_flip": [], "std_flip": [], "label": []}
    for images, labels in loader:
        if images.min() < -1.001 or images.max() > 1.001:
            raise ValueError(
                f"dataset images must be floats in [-1, 1], got range [{images.min():.3f}, {images.max():.3f}]"
            )
        mean, std = encode_moments(vae, images)
        parts["mean"].append(mean.cpu())
        parts["std"].append(std.cpu())
        if flips:
            mean_flip, std_flip = encode_moments(vae, torch.flip(images, dims=[-1]))
            parts["mean_flip"].append(mean_flip.cpu())
            parts["std_flip"].append(std_flip.cpu())
        parts["label"].append(torch.as_tensor(labels, dtype=torch.int64))
    moments = {name: torch.cat(chunks) for name, chunks in parts.items() if chunks and name != "label"}
    storage = _STORAGE_DTYPES[header["storage_dtype"]]
    tensors = {name: value.to(storage).contiguous() for name, value in moments.items()}
    tensors["label"] = torch.cat(parts["label"])
    tensors["index"] = torch.arange(indices.start, indices.stop, dtype=torch.int64)

    # Channel sums of the scaled float32 means, in float64, so the manifest can merge shards into exact stats.
    scaled = (moments["mean"].double() - shift) * scale
    stats = {
        "sum": scaled.sum(dim=(0, 2, 3)).tolist(),
        "sumsq": scaled.square().sum(dim=(0, 2, 3)).tolist(),
        "n": scaled.shape[0] * scaled.shape[2] * scaled.shape[3],
    }
    full_header = {
        **header,
        "scale_factor": scale,
        "shift_factor": shift,
        "latent_shape": list(tensors["mean"].shape[1:]),
        "label_max": int(tensors["label"].max()),
        "stats": stats,
    }
    for leftover in path.parent.glob(f"{path.name}.*.tmp"):  # from a killed earlier attempt; only this rank owns k
        leftover.unlink(missing_ok=True)
    with atomic_path(path) as tmp:  # atomic: an existing shard file is always a complete one
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(full_header, sort_keys=True)})


# --------------------------------------------------------------------------------------------------------------------
# Finalising
# --------------------------------------------------------------------------------------------------------------------


def finalize_latent_cache(out_dir: str | Path) -> Path:
    """Check that all shards exist and agree, then write `manifest.json` atomically; returns its path."""
    out_dir = Path(out_dir)
    present = sorted(out_dir.glob("shard_*.safetensors"))
    if not present:
        raise FileNotFoundError(f"latent cache {out_dir} has no shard files (shard_*.safetensors)")
    headers = {}
    for p in present:
        try:
            headers[p.name] = _read_header(p)
        except Exception as err:  # noqa: BLE001 - name the file whatever safetensors raised
            raise ValueError(f"latent shard {p} is unreadable: {err}") from err
    reference = next(iter(headers.values()))
    for name, header in headers.items():
        for key in ("format", "count", "shard_size", "flips", "vae_sha256", "storage_dtype", "latent_shape"):
            if header.get(key) != reference.get(key):
                raise ValueError(
                    f"latent cache {out_dir}: {name} has {key}={header.get(key)!r} but {present[0].name} has "
                    f"{reference.get(key)!r}; delete stale shards and rebuild"
                )
    if reference.get("format") != CACHE_FORMAT:
        raise ValueError(f"latent cache {out_dir}: unknown shard format {reference.get('format')!r}")
    count, shard_size = reference["count"], reference["shard_size"]
    ranges = shard_ranges(count, shard_size)
    expected = {shard_file_name(k) for k in range(len(ranges))}
    missing = sorted(expected - headers.keys())
    if missing:
        raise FileNotFoundError(f"latent cache {out_dir} is incomplete: missing {missing} of {len(ranges)} shards")
    extra = sorted(headers.keys() - expected)
    if extra:
        raise ValueError(f"latent cache {out_dir} has shards beyond its {len(ranges)} ({extra}); delete them")

    shards = []
    channel_sum = channel_sumsq = 0.0
    values_per_channel = 0
    for k, (start, stop) in enumerate(ranges):
        name = shard_file_name(k)
        header = headers[name]
        if (header["start"], header["stop"]) != (start, stop):
            raise ValueError(
                f"latent cache {out_dir}: {name} covers {header['start']}..{header['stop']}, not {start}..{stop}"
            )
        stats = header["stats"]
        channel_sum = channel_sum + np.asarray(stats["sum"])
        channel_sumsq = channel_sumsq + np.asarray(stats["sumsq"])
        values_per_channel += stats["n"]
        path = out_dir / name
        shards.append(
            {"file": name, "start": start, "stop": stop, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        )
    channel_mean = channel_sum / values_per_channel
    channel_std = np.sqrt(np.maximum(channel_sumsq / values_per_channel - channel_mean**2, 0.0))

    manifest = {
        "format": CACHE_FORMAT,
        "count": count,
        "num_classes": max(h["label_max"] for h in headers.values()) + 1,
        "latent_shape": reference["latent_shape"],
        "storage_dtype": reference["storage_dtype"],
        "flips": reference["flips"],
        "shard_size": shard_size,
        "scale_factor": float(reference["scale_factor"]),
        "shift_factor": float(reference["shift_factor"]),
        "vae": {"dir": reference["vae_dir"], "weights_sha256": reference["vae_sha256"]},
        "latent_stats": {
            "of": "scaled posterior means of the unflipped images, per channel",
            "mean": channel_mean.tolist(),
            "std": channel_std.tolist(),
        },
        "shards": shards,
    }
    path = out_dir / MANIFEST_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"latent cache {cache_dir} is incomplete: {MANIFEST_FILE} missing "
            "(build_latent_cache writes it when all shards exist; after a manual multi-rank build call "
            "finalize_latent_cache)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: unknown latent cache format {manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
    return manifest


def verify_shards(cache_dir: str | Path, manifest: dict, verify: Literal["sha256", "size"] = "sha256") -> None:
    """Raise if a shard of the manifest is missing, has the wrong size or (verify='sha256') the wrong hash."""
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
    for shard in manifest["shards"]:
        path = Path(cache_dir) / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {cache_dir} is incomplete: shard {path} is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise ValueError(f"latent shard {path} is corrupt: {size} bytes, manifest says {shard['bytes']}")
        if verify == "sha256" and file_sha256(path) != shard["sha256"]:
            raise ValueError(f"latent shard {path} is corrupt: sha256 differs from the manifest")


def _item_seed(seed: int, index: int, epoch: int) -> int:
    state = np.random.SeedSequence([seed, index, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63, valid for torch.Generator.manual_seed


class LatentDataset(Dataset):
    """Items `(latent, label)`: a scaled latent CHW (float32) in the DiT's space and an int label.

    Args:
        cache_dir: a finalised cache (see module docstring).
        sample_posterior: draw `mean + std * eps` (True, as online VAE encoding does) or return the mean.
        random_flip: use the mirrored image's moments with probability 1/2 (the cache must have flips).
        seed: base seed; the draw for item i in epoch e depends only on (seed, i, e), so it is the same after a
            resume and in any DataLoader worker. Call `set_epoch` each epoch (before creating non-persistent workers).
        verify: 'sha256' hashes every shard at construction (reads the whole cache once); 'size' only checks
            file sizes, for caches too large to hash at every start.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        sample_posterior: bool = True,
        random_flip: bool = True,
        seed: int = 0,
        verify: Literal["sha256", "size"] = "sha256",
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        verify_shards(self.cache_dir, self.manifest, verify)
        if random_flip and not self.manifest["flips"]:
            raise ValueError(f"latent cache {cache_dir} was built with flips=False; use random_flip=False")
        self.sample_posterior = sample_posterior
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.scale_factor = float(self.manifest["scale_factor"])
        self.shift_factor = float(self.manifest["shift_factor"])
        self._shards: Sequence[dict] = self.manifest["shards"]
        self._shard_size = int(self.manifest["shard_size"])
        self._handles: dict[int, object] = {}
        self._handles_pid = os.getpid()
        self.labels = np.concatenate([self._open(k).get_tensor("label").numpy() for k in range(len(self._shards))])
        if len(self.labels) != self.manifest["count"]:
            raise ValueError(
                f"latent cache {cache_dir}: shards hold {len(self.labels)} labels, manifest says {len(self)}"
            )

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    @property
    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel mean and std of the scaled posterior means, shape (C,) each."""
        stats = self.manifest["latent_stats"]
        return torch.tensor(stats["mean"]), torch.tensor(stats["std"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _open(self, k: int):
        # safe_open handles map the file; reopen after a fork so DataLoader workers never share one.
        if self._handles_pid != os.getpid():
            self._handles, self._handles_pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.cache_dir / self._shards[k]["file"]), framework="pt")
        return self._handles[k]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    @property
    def latent_channels(self) -> int:
        return int(self.manifest["latent_shape"][0])

    @property
    def latent_size(self) -> int:
        return int(self.manifest["latent_shape"][-1])

    def moments(self, idx: int, *, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of item `idx` (of its mirror image when `flipped`), scaled into the DiT's space.

        For trainers that draw flips and noise themselves: `mean + std * eps` is a posterior sample.
        """
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a latent cache of {len(self)} items")
        if flipped and not self.manifest["flips"]:
            raise ValueError(f"latent cache {self.cache_dir} was built with flips=False; it has no mirrored moments")
        k = idx // self._shard_size
        row = idx - self._shards[k]["start"]
        suffix = "_flip" if flipped else ""
        handle = self._open(k)
        mean = handle.get_slice("mean" + suffix)[row : row + 1][0].float()
        std = handle.get_slice("std" + suffix)[row : row + 1][0].float()
        return (mean - self.shift_factor) * self.scale_factor, std * self.scale_factor

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a latent cache of {len(self)} items")
        generator = torch.Generator().manual_seed(_item_seed(self.seed, idx, self.epoch))
        flipped = self.random_flip and bool(torch.randint(0, 2, (), generator=generator))
        mean, std = self.moments(idx, flipped=flipped)
        latent = mean + std * torch.randn(mean.shape, generator=generator) if self.sample_posterior else mean
        return latent, int(self.labels[idx])
