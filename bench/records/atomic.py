"""Atomic file creation: write to a temp file in the target folder, then ``os.replace`` it into place.

Readers (other ranks, the pipeline, a crashed-and-restarted job) never see a half-written record, sample batch or
reference. The temp file gets the permissions a normally created file would get (mkstemp's 0600 would hide shared
results from other users).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temp path next to ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | os.PathLike, data: dict, *, overwrite: bool = False) -> Path:
    """Write ``data`` as a record's JSON (indent 2, NaN and inf refused, trailing newline) via ``atomic_path``;
    refuse to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"record already exists: {path} (records are immutable; pass --overwrite to replace)")
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
