"""Offline weights and reference files: one directory, a fixed layout, a sha256 manifest (docs/metrics.md §10).

Resolution: ``--weights-dir DIR``, else ``$KINDBENCH_WEIGHTS_DIR`` (``$METRICS_WEIGHTS_DIR``, an older name, is
accepted too), else an error listing every expected file and where to get it. Nothing here ever downloads.

Trust on first use: the first time a file is opened its sha256 is pinned in ``MANIFEST.json``; every later open
re-hashes it and aborts on a mismatch. ``kindbench metrics weights verify --pin`` does the same for all files at
once. A file whose hash differs from the published one (e.g. random test weights under the real name) still
works, but every record says ``official: false``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from pathlib import Path

from bench.records.atomic import atomic_path
from bench.records.fields import utc_now
from bench.records.hashing import file_sha256

ENV_VARS = ("KINDBENCH_WEIGHTS_DIR", "METRICS_WEIGHTS_DIR")
MANIFEST = "MANIFEST.json"

DINOV2_FILES = {
    "vit_small_patch14_dinov2": "dinov2_vits14_pretrain.pth",
    "vit_base_patch14_dinov2": "dinov2_vitb14_pretrain.pth",
    "vit_large_patch14_dinov2": "dinov2_vitl14_pretrain.pth",
    "vit_giant_patch14_dinov2": "dinov2_vitg14_pretrain.pth",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file of the layout: where it lives (alternatives in order), what it is for, where to get it."""

    key: str
    paths: tuple[str, ...]
    purpose: str
    source: str
    published_sha256_prefix: str | None = None


def _dinov2_entry(arch: str) -> Entry:
    fb_name = DINOV2_FILES.get(arch)
    if fb_name is None:
        raise ValueError(f"unknown DINOv2 architecture {arch!r}; known: {sorted(DINOV2_FILES)}")
    tag = fb_name.split("_")[1]
    return Entry(
        key=f"dinov2:{arch}",
        paths=(f"dinov2/{fb_name}", f"dinov2/{arch}.lvd142m/model.safetensors"),
        purpose="FDD (DINOv2 CLS features)",
        source=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{tag}/{fb_name} or HF timm/{arch}.lvd142m",
    )


LAYOUT: dict[str, Entry] = {
    "inception": Entry(
        "inception",
        ("inception/pt_inception-2015-12-05-6726825d.pth",),
        "FID, sFID, IS, P/R (TF-2015 Inception, converted)",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        published_sha256_prefix="6726825d",  # torch.hub's hash-prefix naming convention
    ),
    "adm_ref": Entry(
        "adm_ref",
        ("refs/VIRTUAL_imagenet256_labeled.npz",),
        "ADM ImageNet-256 reference batch (mu, sigma, mu_s, sigma_s, 10k arr_0 images)",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz",
    ),
    "adm_ref_derived": Entry(
        "adm_ref_derived",
        ("refs/adm_imagenet256_stats.npz",),
        "ADM reference extract with cached 10k pool features",
        "produced by `kindbench metrics prepare-ref`",
    ),
    "fdd_ref": Entry(
        "fdd_ref",
        ("refs/fdd_imagenet256_train_dinov2_vitl14.npz",),
        "FDD reference statistics (ImageNet-256 train, DINOv2 ViT-L/14)",
        "produced by `kindbench metrics build-ref --extractor dinov2`",
    ),
    "cleanfid_inception": Entry(
        "cleanfid_inception",
        ("inception/inception-2015-12-05.pt",),
        "optional: clean-FID / KID columns through clean-fid's TorchScript Inception",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    ),
    "adm_graph": Entry(
        "adm_graph",
        ("inception/classify_image_graph_def.pb",),
        "optional: running the real ADM TF evaluator as an oracle",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb",
    ),
}
LAYOUT[_dinov2_entry("vit_large_patch14_dinov2").key] = _dinov2_entry("vit_large_patch14_dinov2")


def entry(key: str) -> Entry:
    if key.startswith("dinov2:"):
        return _dinov2_entry(key.split(":", 1)[1])
    if key not in LAYOUT:
        raise KeyError(f"unknown weights entry {key!r}; known: {sorted(LAYOUT)}")
    return LAYOUT[key]


class MissingWeightsError(FileNotFoundError):
    """A required offline file is absent; the message lists the layout and sources."""


class WeightsMismatchError(RuntimeError):
    """A file's sha256 differs from the one pinned in the manifest."""


def expected_files_text(root: str | os.PathLike | None, keys=None) -> str:
    where = str(root) if root else "<weights dir>"
    lines = [f"expected under {where} (set --weights-dir or ${ENV_VARS[0]}):"]
    for key in keys or list(LAYOUT):
        e = entry(key)
        lines.append(f"  {' or '.join(e.paths)}  [{e.purpose}]  from: {e.source}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class VerifiedFile:
    key: str
    path: Path
    relpath: str
    sha256: str
    bytes: int
    pinned_now: bool
    official: bool | None
    """Matches the published hash (None when none is published)."""

    def record(self) -> dict:
        return {"path": self.relpath, "sha256": self.sha256, "bytes": self.bytes, "official": self.official,
                "pinned_now": self.pinned_now}


def offline_environment(root: Path | None) -> None:
    """Make stray library calls fail fast instead of reaching the network (docs/metrics.md §10)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if root is not None:
        os.environ["TORCH_HOME"] = str(root / "torch_home")


class WeightsDir:
    """The resolved weights directory with its manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise MissingWeightsError(f"weights directory does not exist: {self.root}\n"
                                      + expected_files_text(self.root))

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {}
        with open(self.manifest_path) as f:
            return json.load(f)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / (MANIFEST + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # ranks pinning at once must not lose each other's entries
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_manifest(self, data: dict) -> None:
        with atomic_path(self.manifest_path) as tmp:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)

    def find(self, key: str) -> tuple[Path, str] | None:
        for rel in entry(key).paths:
            p = self.root / rel
            if p.is_file():
                return p, rel
        return None

    def path(self, key: str) -> Path:
        found = self.find(key)
        if found is None:
            raise MissingWeightsError(f"missing {key!r} in {self.root}\n" + expected_files_text(self.root, [key]))
        return found[0]

    def verified(self, key: str, *, pin: bool = True) -> VerifiedFile:
        """Locate ``key``, hash it, compare with (or pin into) the manifest."""
        found = self.find(key)
        if found is None:
            raise MissingWeightsError(f"missing {key!r} in {self.root}\n" + expected_files_text(self.root, [key]))
        path, rel = found
        digest = file_sha256(path)
        size = path.stat().st_size
        pinned_now = False
        with self._locked():
            data = self.manifest()
            if rel in data:
                if data[rel]["sha256"] != digest:
                    raise WeightsMismatchError(f"{path}: sha256 {digest} differs from the pinned "
                                               f"{data[rel]['sha256']} in {self.manifest_path}; "
                                               "restore the file or re-pin deliberately with `weights verify --repin`")
            elif pin:
                data[rel] = {"sha256": digest, "bytes": size, "url": entry(key).source,
                             "added": utc_now()}
                self._write_manifest(data)
                pinned_now = True
        prefix = entry(key).published_sha256_prefix
        official = None if prefix is None else digest.startswith(prefix)
        return VerifiedFile(key, path, rel, digest, size, pinned_now, official)

    def pin_file(self, path: str | os.PathLike) -> VerifiedFile:
        """Pin (or verify) any file inside the weights directory, e.g. a reference we just built."""
        path = Path(path).resolve()
        try:
            rel = str(path.relative_to(self.root))
        except ValueError:
            raise ValueError(f"{path} is not inside the weights directory {self.root}") from None
        digest, size = file_sha256(path), path.stat().st_size
        with self._locked():
            data = self.manifest()
            if rel in data and data[rel]["sha256"] != digest:
                raise WeightsMismatchError(f"{path}: sha256 {digest} differs from the pinned {data[rel]['sha256']}")
            pinned_now = rel not in data
            if pinned_now:
                data[rel] = {"sha256": digest, "bytes": size, "url": "built locally",
                             "added": utc_now()}
                self._write_manifest(data)
        return VerifiedFile("custom", path, rel, digest, size, pinned_now, None)

    def verify_all(self, *, pin: bool, repin: bool = False) -> list[dict]:
        """Status of every layout file present (and of DINOv2 files of any size)."""
        keys = list(LAYOUT) + [f"dinov2:{a}" for a in DINOV2_FILES if f"dinov2:{a}" not in LAYOUT]
        report = []
        if repin:
            with self._locked():
                self._write_manifest({})
        for key in keys:
            found = self.find(key)
            if found is None:
                report.append({"key": key, "status": "missing", "expected": list(entry(key).paths)})
                continue
            try:
                v = self.verified(key, pin=pin or repin)
                status = "pinned" if v.pinned_now else ("ok" if v.relpath in self.manifest() else "unpinned")
                report.append({"key": key, "status": status, **v.record()})
            except WeightsMismatchError as err:
                report.append({"key": key, "status": "MISMATCH", "error": str(err)})
        return report


def resolve_weights_dir(cli_value: str | os.PathLike | None = None) -> WeightsDir:
    """``--weights-dir`` > ``$KINDBENCH_WEIGHTS_DIR`` > ``$METRICS_WEIGHTS_DIR`` > error. Also enables offline mode."""
    value = cli_value
    if not value:
        value = next((os.environ[v] for v in ENV_VARS if os.environ.get(v)), None)
    if not value:
        offline_environment(None)
        raise MissingWeightsError("no weights directory given\n" + expected_files_text(None))
    wd = WeightsDir(value)
    offline_environment(wd.root)
    return wd


def load_torch_state(path: str | os.PathLike, what: str) -> dict:
    """A local ``torch.save``d state dict (``weights_only``: no code runs). A truncated or foreign file is a
    ``ValueError`` naming it (``what``: "Inception weights", ...) instead of a zip or pickle traceback."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{what} {path} are unreadable ({reason}): the file is truncated or corrupt; copy it again "
                         "(the weights dir's sha256 manifest pins the right bytes)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state
