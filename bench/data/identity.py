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
    """``{"section": the data config, "sha256": hash of the class list / latent manifest / synthetic split}``.

    Synthetic data is a function of its settings and generator code (which the code fingerprint covers), so its
    hash covers the split's class ids; ImageFolder data is named by its class-list file; a latent cache by its
    manifest (which pins every shard's sha256)."""
    section = dataclasses.asdict(data)
    if data.source == "synthetic":
        from bench.data.synthetic import synthetic_split

        payload = json.dumps({"classes": synthetic_split(data.split), **section}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()
    elif data.source == "imagefolder":
        digest = _named_file_digest(data.class_list)
    else:
        digest = _named_file_digest(os.path.join(data.latent_dir, "manifest.json")) if data.latent_dir else ""
    return {"section": section, "sha256": digest}
