"""Run exports: the weights a training run leaves (``export.safetensors``), written once and checked on every use.

Every run exports; a downstream method transfers from the export of its ancestry run, and sampling rebuilds a run
from its own export. An export is ONE ``.safetensors`` file: the (EMA) weights of the model the run built, plus
JSON metadata saying how to rebuild that model (method, ``ArchSpec`` fields, number of classes, format version).
safetensors rather than pickle: loading never executes code, and the header says what the file is without
reading the weights. Released facebookresearch/DiT ``.pt`` checkpoints are read by ``load_released_dit`` and become
the same ``Export`` object (a dense ancestry of method ``scratch``).

``load_into`` copies an ancestry's tensors into a freshly built model with the key and shape checks of nanoGPT's
``from_pretrained``: every model key that is not explicitly skipped must be in the file with the same shape, and
the file may hold nothing the model lacks. Mismatches are reported all at once, in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bench.models.dit import DIT_FLAVOURS
from bench.records.hashing import file_sha256
from methods.base import ArchSpec, Export, Method, MethodError

EXPORT_FORMAT = "kindbench-export"
#: The format name exports had before they were called exports; read as the same format.
_LEGACY_FORMATS = ("kindbench-ancestry",)
EXPORT_FORMAT_VERSION = 1
#: Methods whose ancestry export is a plain dense DiT state dict (the DiT module names, nothing else).
DENSE_METHODS = ("scratch", "full")
_SHOWN = 5  # mismatches named per kind in one error line


# --------------------------------------------------------------------------------------------------------------
#                                          Writing and reading files
# --------------------------------------------------------------------------------------------------------------


def _plain_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views); clone those so each key stands alone.
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise MethodError(f"ancestry state entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_export(path: str | os.PathLike, model_state: Mapping[str, torch.Tensor], *, method: str, arch: ArchSpec,
                  num_classes: int, meta: Mapping[str, Any] | None = None) -> str:
    """Write a run export atomically (temp file + rename, so readers never see half a file); return its sha256.

    ``meta`` is free-form JSON-serialisable provenance (run id, step, ...), stored next to the fixed fields.
    """
    path = Path(path)
    if num_classes <= 0:
        raise MethodError(f"ancestry num_classes must be positive, got {num_classes}")
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": str(EXPORT_FORMAT_VERSION),
        "method": method,
        "arch": json.dumps(dataclasses.asdict(arch), sort_keys=True),
        "num_classes": str(int(num_classes)),
        "meta": json.dumps(dict(meta or {}), sort_keys=True),
    }
    tensors = _plain_tensors(model_state)
    metadata["tensors_sha256"] = tensors_sha256(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: written into an export's metadata
    and checked on every load, so a bit-rotted or edited export is an error instead of a silently different model."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        where = "a directory" if path.is_dir() else "missing"
        raise FileNotFoundError(f"{what} {path} is {where}: expected a file there (check the path, or run the "
                                f"run that exports it first)")


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error type (or OSError) for a bad header or short file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MethodError(f"export {path} is corrupt or truncated (not a readable safetensors file: "
                          f"{reason})") from None
    return metadata, state


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[str, ArchSpec, int, dict[str, Any]]:
    if metadata.get("format") not in (EXPORT_FORMAT, *_LEGACY_FORMATS):
        raise MethodError(f"{path} is a safetensors file but not a kindbench export (metadata format="
                          f"{metadata.get('format')!r}, expected {EXPORT_FORMAT!r})")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > EXPORT_FORMAT_VERSION:
        raise MethodError(f"export {path} has format version {version!r}; this kindbench reads versions up to "
                          f"{EXPORT_FORMAT_VERSION}")
    try:
        arch = ArchSpec(**json.loads(metadata["arch"]))
        num_classes = int(metadata["num_classes"])
        meta = json.loads(metadata.get("meta", "{}"))
        method = metadata["method"]
    except (KeyError, TypeError, ValueError) as err:
        raise MethodError(f"export {path} has malformed metadata ({type(err).__name__}: {err})") from None
    return method, arch, num_classes, meta


def load_export(path: str | os.PathLike) -> Export:
    """Read a run export (``.safetensors``; a released DiT ``.pt``/``.pth`` goes to ``load_released_dit``).

    Errors: ``FileNotFoundError`` naming the path; ``MethodError`` in one line for a corrupt or truncated file, a
    safetensors file that is not an export, or a newer format version.
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        return load_released_dit(path)
    _require_file(path, "export")
    sha256 = file_sha256(path)
    metadata, state = _read_safetensors(path)
    method, arch, num_classes, meta = _parse_metadata(path, metadata)
    recorded = metadata.get("tensors_sha256")  # absent in exports written before checksums: nothing to compare
    if recorded is not None and tensors_sha256(state) != recorded:
        raise MethodError(f"export {path} is corrupt: its tensors do not match the checksum written with them "
                          "(bit rot or an edit after export); re-run the run that exports it")
    return Export(method=method, arch=arch, num_classes=num_classes, state=state, sha256=sha256, path=str(path),
                    meta=meta)


# --------------------------------------------------------------------------------------------------------------
#                                   Loading an ancestry into a built model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What ``load_into`` did: model keys loaded and model keys skipped; file keys ignored because skipped."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _listing(label: str, items: list[str]) -> str:
    more = f", +{len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {label} ({', '.join(items[:_SHOWN])}{more})"


@torch.no_grad()
def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, skip: Iterable[str] = ()) -> LoadReport:
    """Copy ``state`` into ``model``: every model key outside the ``skip`` module paths must be in ``state`` with
    the same shape, and ``state`` may hold no extra key outside ``skip``; otherwise a ``MethodError`` lists all
    missing keys, shape mismatches and unexpected keys. Values are cast to the model's dtype.
    """
    skip = tuple(skip)
    target = model.state_dict()  # shares storage with the parameters and buffers, so copy_ writes into the model
    report = LoadReport()
    missing, mismatched = [], []
    for key, dest in target.items():
        if _is_under(key, skip):
            report.skipped.append(key)
        elif key not in state:
            missing.append(key)
        elif tuple(state[key].shape) != tuple(dest.shape):
            mismatched.append(f"{key}: file {tuple(state[key].shape)} vs model {tuple(dest.shape)}")
        else:
            report.loaded.append(key)
    unexpected = [k for k in state if k not in target and not _is_under(k, skip)]
    report.ignored = [k for k in state if _is_under(k, skip)]
    kinds = (("missing keys", missing), ("shape mismatches", mismatched), ("unexpected keys", unexpected))
    problems = [_listing(label, items) for label, items in kinds if items]
    if problems:
        raise MethodError(f"cannot load the ancestry into this {type(model).__name__}: {'; '.join(problems)}")
    for key in report.loaded:
        target[key].copy_(state[key])
    return report


def check_ancestry(method: Method, ancestry: Export | None, arch: ArchSpec) -> Export:
    """The ancestry ``method.build`` was given, checked: present, produced by one of ``method.ancestry_methods``,
    and of the same architecture (flavour, input size, channels, learned sigma) as ``arch``."""
    accepted = tuple(method.ancestry_methods)
    if ancestry is None:
        raise MethodError(f"method {method.name!r} needs an ancestry exported by one of {accepted}; got none")
    if ancestry.method not in accepted:
        raise MethodError(f"method {method.name!r} cannot build from an ancestry of method {ancestry.method!r} "
                          f"({ancestry.path or 'in memory'}); it needs one of {accepted}")
    fields = ("name", "input_size", "in_channels", "learn_sigma", "gelu")
    differ = [f"{f}: ancestry {getattr(ancestry.arch, f)!r} vs requested {getattr(arch, f)!r}"
              for f in fields if getattr(ancestry.arch, f) != getattr(arch, f)]
    if differ:
        raise MethodError(f"method {method.name!r} needs an ancestry of the same architecture; "
                          f"{ancestry.path or 'the ancestry'} differs in {'; '.join(differ)}")
    return ancestry


# --------------------------------------------------------------------------------------------------------------
#                                   Released facebookresearch/DiT checkpoints
# --------------------------------------------------------------------------------------------------------------


def _select_state_dict(path: Path, checkpoint: Any) -> dict[str, torch.Tensor]:
    # Released files are plain EMA state dicts; DiT's own training checkpoints hold {"model", "ema", "opt", "args"}:
    # prefer the EMA weights, which are the ones DiT samples with.
    if isinstance(checkpoint, dict):
        for key in ("ema", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise MethodError(f"{path} is not a DiT checkpoint: expected a state dict of tensors or a dict with an "
                          f"'ema' or 'model' state dict")
    return dict(checkpoint)


def infer_dit_arch(state: Mapping[str, torch.Tensor], where: str = "state dict") -> tuple[ArchSpec, int]:
    """The ``ArchSpec`` and number of classes of a dense DiT state dict, from tensor shapes alone.

    Depth, width and patch size are matched against ``DIT_FLAVOURS`` (heads are not visible in shapes). The class
    table is assumed to carry DiT's null-class row (every released DiT does), so ``num_classes = rows - 1``.
    """
    needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise MethodError(f"{where} is not a dense DiT state dict: no {', '.join(absent)}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    out_channels, remainder = divmod(state["final_layer.linear.weight"].shape[0], patch * patch)
    if grid * grid != tokens or remainder or out_channels not in (in_channels, 2 * in_channels):
        raise MethodError(f"{where}: inconsistent DiT shapes (pos_embed tokens {tokens}, patch {patch}, "
                          f"final_layer.linear out {state['final_layer.linear.weight'].shape[0]})")
    names = [n for n, f in DIT_FLAVOURS.items() if (f.depth, f.hidden_size, f.patch_size) == (depth, hidden, patch)]
    if not names:
        raise MethodError(f"{where}: no DiT flavour has depth {depth}, width {hidden}, patch {patch}")
    arch = ArchSpec(name=names[0], input_size=grid * patch, in_channels=in_channels,
                    learn_sigma=out_channels == 2 * in_channels, class_dropout_prob=0.1)
    return arch, state["y_embedder.embedding_table.weight"].shape[0] - 1


def load_released_dit(path: str | os.PathLike) -> Export:
    """A released facebookresearch/DiT ``.pt`` as a dense ancestry (method ``scratch``), arch inferred from shapes.

    Accepts a plain state dict or a training checkpoint dict with ``ema``/``model`` (``ema`` preferred); loaded
    with ``torch.load(weights_only=True)``, so a pickle that would run code is refused.
    """
    path = Path(path)
    _require_file(path, "DiT checkpoint")
    sha256 = file_sha256(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a non-torch file, or a pickle weights_only refuses
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MethodError(f"DiT checkpoint {path} cannot be read by torch.load(weights_only=True): {reason}") \
            from None
    state = _select_state_dict(path, checkpoint)
    arch, num_classes = infer_dit_arch(state, where=str(path))
    return Export(method="scratch", arch=arch, num_classes=num_classes, state=state, sha256=sha256,
                    path=str(path), meta={"source": "released-dit"})
