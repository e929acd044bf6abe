"""The identity of a run's data: its config section plus a hash of what names the classes and items, so a record
says which data trained the model and not only where it was read from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bench.config.schema import DataConfig
from bench.records.hashing import file_sha256


def _named_file_digest(text: str) -> str:
    """sha256 of the file a config setting names (``$VARS`` and ``~`` expanded); "" when it names none."""
    path = Path(os.path.expandvars(text)).expanduser() if text else None
    if path is None or not path.is_file():
        return ""
    return file_sha256(path)


def data_identity(data: DataConfig) -> dict[str, Any]:
    """``{"section": the data config, "resolved": its paths as found now, "sha256": what the data is}``.

    Synthetic data is a function of its settings and generator code (which the code fingerprint covers), so its
    hash covers the split's class ids; ImageFolder data is its class-list file plus the listing of the images it
    selects (relative path, size and label of each); a latent cache is its manifest (which pins every shard's
    sha256). The paths are not in the hash: the same data moved elsewhere is the same data."""
    section = dataclasses.asdict(data)
    if data.source == "synthetic":
        from bench.data.synthetic import synthetic_split

        payload = json.dumps({"classes": synthetic_split(data.split), **section}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()
    elif data.source == "imagefolder":
        digest = hashlib.sha256(f"{_named_file_digest(data.class_list)}\0{_listing_digest(data)}".encode()).hexdigest()
    else:
        digest = _named_file_digest(os.path.join(_expand(data.latent_dir), "manifest.json")) if data.latent_dir else ""
    resolved = {key: _expand(section[key]) for key in DATA_PATHS}
    return {"section": section, "resolved": resolved, "sha256": digest}


def label_space(data: DataConfig) -> str:
    """sha256 of which classes the data's labels name, in label order ("" when it cannot be told).

    Two runs with the same label space can share a class table (FINE's ``class_table = "auto"``). Synthetic data:
    its split's class ids (a shifted domain draws the same classes); ImageFolder: its class-list file, else its
    class folder names; a latent cache: its manifest (conservative: the very same cache)."""
    if data.source == "synthetic":
        from bench.data.synthetic import synthetic_split

        payload = json.dumps({"synthetic_classes": list(synthetic_split(data.split))})
    elif data.source == "imagefolder":
        listed = _named_file_digest(data.class_list)
        root = Path(os.path.expandvars(data.root)).expanduser()
        folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if not listed and root.is_dir() else []
        if not listed and not folders:
            return ""
        payload = json.dumps({"class_list": listed, "folders": folders})
    else:
        manifest = _named_file_digest(os.path.join(_expand(data.latent_dir), "manifest.json")) if data.latent_dir \
            else ""
        if not manifest:
            return ""
        payload = json.dumps({"latent_manifest": manifest})
    return hashlib.sha256(payload.encode()).hexdigest()


#: The settings that say where data is read from (not what it is).
DATA_PATHS = ("root", "latent_dir", "class_list")


def _expand(text: str) -> str:
    return str(Path(os.path.expandvars(text)).expanduser().resolve()) if text else ""


def _listing_digest(data: DataConfig) -> str:
    """sha256 of the images an ImageFolder config selects: each one's path relative to the root and its label (no
    per-file stat: on a cluster filesystem that would cost minutes for ImageNet; a file rewritten in place under the
    same name is not seen)."""
    from bench.data.imagefolder import ImageFolderDataset

    root = Path(os.path.expandvars(data.root)).expanduser()
    class_list = Path(os.path.expandvars(data.class_list)).expanduser()
    dataset = ImageFolderDataset(root, class_list, image_size=data.image_size)
    digest = hashlib.sha256()
    for path, label in dataset.samples:
        digest.update(f"{path.relative_to(root)}\0{label}\n".encode())
    return digest.hexdigest()


def same_data_place(recorded: dict[str, Any], data: DataConfig) -> bool:
    """Whether ``data`` reads from the very paths a recorded identity was computed from (then it is the same data
    unless someone rewrote it in place, which the content hashes of the latents and references catch)."""
    resolved = recorded.get("resolved")
    return isinstance(resolved, dict) and all(resolved.get(k) == _expand(getattr(data, k)) for k in DATA_PATHS)
