"""Learngenes and tailors as files, and recombining them into models of other depth, rank or label space.

A KIND ancestry (the trainer's ``export.safetensors``) holds every component. ``extract`` splits it into two
self-describing files, both in the ancestry format of ``methods.transfer`` (so ``load_export`` reads either and
the trainer accepts either as ``run.ancestry``):

* ``learngenes.safetensors``: the learngene components of every decomposed matrix, plus every class-agnostic
  tensor outside them (patch and timestep embedders, adaLN, biases, final layer, position embedding);
* ``tailors.safetensors``: the tailor components, the class table and the class gate (the class-specific part).

Their metadata (``meta.kind``) names the part, the layout (blocks, decomposed paths, N_G, N_T, width), the gate
and a ``pair_id`` that ties the two halves of one extraction together. ``ancestry_from_components`` joins them back;
``learngenes.safetensors`` alone is a valid ancestry for the ``domain`` stage (learngenes + fresh tailors).

``map_components`` moves an ancestry's tensors onto a model with the same width and fewer blocks (kept by a block
list) and/or fewer tailors (a per-matrix selection); other widths, more blocks or other learngene ranks cannot fit
and fail with one line saying why.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kind.layers import CLASS_TABLE, LEARNGENE, QKV_PARTS, TAILOR, decomposed_targets, kind_layers, kind_ranks
from methods.base import ArchSpec, Export, MethodError
from methods.transfer import load_export, save_export

GATE_KEY = f"{CLASS_TABLE}.kind_gate"
CLASS_WEIGHT = f"{CLASS_TABLE}.weight"
LEARNGENES_FILE = "learngenes.safetensors"
TAILORS_FILE = "tailors.safetensors"
_FACTOR = re.compile(rf"^blocks\.(\d+)\.(.+)\.({LEARNGENE}|{TAILOR})_(U|sigma|V)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------------------------
#                                         What a state dict holds
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The KIND structure of a state dict, read from its keys and shapes alone."""

    depth: int
    width: int
    targets: tuple[str, ...]
    """Block-relative paths of the decomposed Linears (``attn.qkv``, ``mlp.fc1``, ...), sorted."""
    split: tuple[str, ...]
    """Those of ``targets`` decomposed as q, k, v parts."""
    n_learngenes: int
    n_tailors: int | None
    """None when the state holds no tailors (a learngenes file)."""
    has_gate: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _leaf_of(rest: str) -> tuple[str, str | None]:
    """``attn.qkv.q`` -> (``attn.qkv``, ``q``); ``mlp.fc1`` -> (``mlp.fc1``, None)."""
    head, _, last = rest.rpartition(".")
    return (head, last) if head and last in QKV_PARTS else (rest, None)


def infer_layout(state: Mapping[str, torch.Tensor], where: str = "the ancestry") -> Layout:
    """The ``Layout`` of a KIND state dict; a dense DiT or a tailors-only file is an error naming ``where``."""
    per_block: dict[int, set[str]] = {}
    split: set[str] = set()
    learngene_ranks: set[int] = set()
    tailor_ranks: set[int] = set()
    widths: set[int] = set()
    depth = 0
    for key, value in state.items():
        block = _BLOCK.match(key)
        if block:
            depth = max(depth, int(block.group(1)) + 1)
        factor = _FACTOR.match(key)
        if not factor:
            continue
        path, part = _leaf_of(factor.group(2))
        per_block.setdefault(int(factor.group(1)), set()).add(path)
        if part:
            split.add(path)
        if factor.group(4) == "U":
            (learngene_ranks if factor.group(3) == LEARNGENE else tailor_ranks).add(value.shape[1])
    if not learngene_ranks:
        hint = " (a tailors file: join it with its learngenes via ancestry_from_components)" if tailor_ranks else ""
        raise MethodError(f"{where} holds no KIND learngene components{hint}; it is not a KIND ancestry")
    if len(learngene_ranks) > 1 or len(tailor_ranks) > 1:
        raise MethodError(f"{where}: KIND layers disagree on their ranks (N_G {sorted(learngene_ranks)}, "
                          f"N_T {sorted(tailor_ranks)})")
    paths = {frozenset(p) for p in per_block.values()}
    if len(paths) != 1 or len(per_block) != depth:
        raise MethodError(f"{where}: blocks decompose different matrices or some blocks have no KIND layers")
    if "x_embedder.proj.weight" in state:
        widths.add(state["x_embedder.proj.weight"].shape[0])
    return Layout(depth=depth, width=widths.pop() if widths else -1, targets=tuple(sorted(next(iter(paths)))),
                  split=tuple(sorted(split)), n_learngenes=learngene_ranks.pop(),
                  n_tailors=tailor_ranks.pop() if tailor_ranks else None, has_gate=GATE_KEY in state)


def model_layout(model: nn.Module) -> Layout:
    """The ``Layout`` of a built KIND model (what ``map_components`` must produce for it)."""
    n_learngenes, n_tailors = kind_ranks(model)
    targets = {_BLOCK.match(name).group(2) for name in decomposed_targets(model)}
    split = {_leaf_of(_BLOCK.match(name).group(2))[0] for name in kind_layers(model) if _leaf_of(name)[1]}
    return Layout(depth=len(model.blocks), width=model.hidden_size, targets=tuple(sorted(targets)),
                  split=tuple(sorted(split)), n_learngenes=n_learngenes, n_tailors=n_tailors,
                  has_gate=GATE_KEY in model.state_dict())


def check_fits(source: Layout, model: Layout, blocks: Sequence[int], where: str) -> None:
    """Fail with one line when ``source``'s components cannot be mapped onto ``model`` through ``blocks``."""
    if source.width > 0 and source.width != model.width:
        raise MethodError(f"KIND components of {where} are {source.width} wide but the model is {model.width} wide: "
                          f"learngenes and tailors cannot change width (only the depth and the number of tailors "
                          f"can change)")
    if model.depth > source.depth:
        raise MethodError(f"the model has {model.depth} blocks but {where} has components for {source.depth}: KIND "
                          f"cannot add blocks")
    if len(blocks) != model.depth or any(not 0 <= b < source.depth for b in blocks):
        raise MethodError(f"block map {list(blocks)} does not pick {model.depth} of the {source.depth} blocks of "
                          f"{where}")
    if (source.targets, source.split) != (model.targets, model.split):
        raise MethodError(f"{where} decomposes {list(source.targets)} (split: {list(source.split)}) but the model "
                          f"decomposes {list(model.targets)} (split: {list(model.split)}); build with the same "
                          f"targets, decompose_adaln and split_qkv")
    if source.n_learngenes != model.n_learngenes:
        raise MethodError(f"{where} has N_G = {source.n_learngenes} learngenes per matrix but the model's layers "
                          f"have {model.n_learngenes}: learngenes are transferred whole")


# --------------------------------------------------------------------------------------------------------------
#                                  Selecting blocks and tailors, mapping keys
# --------------------------------------------------------------------------------------------------------------


def block_map(source_depth: int, depth: int, rule: str = "first") -> list[int]:
    """Which source blocks a ``depth``-block model keeps, in order: ``first`` k or ``even`` (evenly spaced)."""
    if not 1 <= depth <= source_depth:
        raise MethodError(f"cannot keep {depth} of {source_depth} blocks: KIND can only drop blocks")
    if rule == "first":
        return list(range(depth))
    if rule == "even":
        if depth == 1:
            return [0]
        return [round(i * (source_depth - 1) / (depth - 1)) for i in range(depth)]
    raise MethodError(f"block rule must be 'first' or 'even', got {rule!r}")


def tailor_leaves(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Paths of the KindLinear leaves holding tailors (``blocks.0.attn.qkv.q``, ``blocks.0.mlp.fc1``)."""
    suffix = f".{TAILOR}_U"
    return [key[: -len(suffix)] for key in state if key.endswith(suffix)]


def select_tailors(state: Mapping[str, torch.Tensor], count: int, rule: str = "norm",
                   classes: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """Per tailor leaf, the sorted indices of the tailors a smaller model keeps.

    ``norm``: the ``count`` largest rank-1 components by |sigma_i| ||u_i|| ||v_i|| (their Frobenius norms; U and V
    are not orthonormal after training). ``index``: the first ``count`` (largest initial singular values).
    ``classes``: the union of the ancestry's gate rows of ``classes`` (``count`` is then that union's size).
    """
    leaves = tailor_leaves(state)
    if not leaves:
        raise MethodError("the ancestry holds no tailors to select from")
    available = state[f"{leaves[0]}.{TAILOR}_U"].shape[1]
    if rule == "classes":
        if GATE_KEY not in state:
            raise MethodError("descend_select = 'classes' needs an ancestry trained with a class gate")
        gate = state[GATE_KEY]
        bad = [c for c in classes if not 0 <= c < gate.shape[0]]
        if bad:
            raise MethodError(f"descend_classes {bad} are not classes of the ancestry (0..{gate.shape[0] - 1})")
        union = gate[list(classes)].amax(dim=0).nonzero().flatten()
        return {leaf: union for leaf in leaves}
    if not 0 <= count <= available:
        raise MethodError(f"cannot keep {count} tailors per matrix: the ancestry has N_T = {available}")
    if rule == "index":
        return {leaf: torch.arange(count) for leaf in leaves}
    if rule != "norm":
        raise MethodError(f"tailor selection must be 'norm', 'index' or 'classes', got {rule!r}")
    chosen = {}
    for leaf in leaves:
        u, sigma, v = (state[f"{leaf}.{TAILOR}_{f}"].double() for f in ("U", "sigma", "V"))
        strength = sigma.abs() * u.norm(dim=0) * v.norm(dim=0)
        chosen[leaf] = strength.topk(count).indices.sort().values
    return chosen


def map_components(state: Mapping[str, torch.Tensor], blocks: Sequence[int], *, tailors: bool = True,
                   selection: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` renamed for a model built from source blocks ``blocks`` (in that order).

    Blocks not in ``blocks`` are dropped; ``tailors=False`` drops every tailor factor; ``selection`` (source leaf
    path -> indices) keeps only those tailor components. The gate table is never mapped (a downstream model
    installs its own gate, if any).
    """
    position = {source: target for target, source in enumerate(blocks)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == GATE_KEY:
            continue
        factor = _FACTOR.match(key)
        if factor and factor.group(3) == TAILOR:
            if not tailors:
                continue
            if selection is not None:
                leaf = key.rsplit(".", 1)[0]
                index = selection[leaf]
                value = value[index] if factor.group(4) == "sigma" else value[:, index]
        block = _BLOCK.match(key)
        if block:
            source = int(block.group(1))
            if source not in position:
                continue
            key = f"blocks.{position[source]}.{block.group(2)}"
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
#                                   Learngene and tailor files
# --------------------------------------------------------------------------------------------------------------


def _is_tailor_key(key: str) -> bool:
    factor = _FACTOR.match(key)
    return bool(factor and factor.group(3) == TAILOR) or key in (GATE_KEY, CLASS_WEIGHT)


def _source_of(source: nn.Module | Export) -> tuple[dict[str, torch.Tensor], ArchSpec, int, dict[str, Any], str]:
    if isinstance(source, Export):
        return dict(source.state), source.arch, source.num_classes, dict(source.meta), source.method
    if isinstance(source, nn.Module):
        arch = ArchSpec(name=source.arch, input_size=source.input_size, in_channels=source.in_channels,
                        learn_sigma=source.learn_sigma, class_dropout_prob=source.y_embedder.dropout_prob,
                        gelu=source.gelu)
        state = {k: v.detach() for k, v in source.state_dict().items()}
        return state, arch, source.num_classes, {}, "kind"
    raise MethodError(f"extract needs a KIND model or Export, got {type(source).__name__}")


def pair_id(state: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of a model's learngenes (their names and sigmas), shared by both files of one extraction."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.endswith(f"{LEARNGENE}_sigma")):
        digest.update(key.encode())
        digest.update(state[key].detach().to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ComponentFiles:
    learngenes: Path
    tailors: Path


def extract(source: nn.Module | Export, out_dir: str | os.PathLike) -> ComponentFiles:
    """Write ``learngenes.safetensors`` and ``tailors.safetensors`` for a KIND model or ancestry into ``out_dir``."""
    state, arch, num_classes, meta, method = _source_of(source)
    layout = infer_layout(state, where="the extraction source")
    if layout.n_tailors is None:
        raise MethodError("the extraction source holds no tailors; it is already a learngenes file")
    common = {"layout": layout.to_dict(), "pair_id": pair_id(state), "source_method": method,
              "source_options": meta.get("method_options"), "source_run": meta.get("run_id"),
              "source_sha256": getattr(source, "sha256", "") or None}
    if GATE_KEY in state:
        common["gate_active_per_class"] = state[GATE_KEY].sum(dim=1).tolist()
    out = Path(out_dir)
    files = ComponentFiles(out / LEARNGENES_FILE, out / TAILORS_FILE)
    for path, part, keep in ((files.learngenes, "learngenes", False), (files.tailors, "tailors", True)):
        part_state = {k: v for k, v in state.items() if _is_tailor_key(k) == keep}
        save_export(path, part_state, method="kind", arch=arch, num_classes=num_classes,
                      meta={"kind": {**common, "part": part}})
    return files


def _part(ancestry: Export, expected: str) -> dict[str, Any]:
    info = ancestry.meta.get("kind") if isinstance(ancestry.meta, dict) else None
    if not isinstance(info, dict) or info.get("part") != expected:
        got = info.get("part") if isinstance(info, dict) else "a whole ancestry"
        raise MethodError(f"{ancestry.path} is not a KIND {expected} file (it holds {got})")
    return info


def ancestry_from_components(learngenes: str | os.PathLike,
                             tailors: str | os.PathLike | None = None) -> Export:
    """An ``Export`` (method ``kind``) from a learngenes file and, optionally, the tailors file extracted with it.

    Without tailors the result only serves the ``domain`` stage (learngenes + fresh tailors). Files from two
    different extractions are refused (their ``pair_id`` differ).
    """
    genes = load_export(learngenes)
    info = _part(genes, "learngenes")
    state = dict(genes.state)
    meta = {"kind": {**info, "part": "learngenes" if tailors is None else "joined"}, "components": [genes.path]}
    if tailors is not None:
        extra = load_export(tailors)
        tailor_info = _part(extra, "tailors")
        if tailor_info.get("pair_id") != info.get("pair_id"):
            raise MethodError(f"{extra.path} was extracted from another model than {genes.path} (pair_id "
                              f"{tailor_info.get('pair_id')} vs {info.get('pair_id')})")
        state.update(extra.state)
        meta["components"].append(extra.path)
    return Export(method="kind", arch=genes.arch, num_classes=genes.num_classes, state=state,
                    sha256=genes.sha256, path=genes.path, meta=meta)


def component_bytes(model: nn.Module) -> dict[str, int]:
    """Parameters and bytes of a KIND model's learngenes, tailors and everything else (dense)."""
    counts = {"learngene_params": 0, "tailor_params": 0, "dense_params": 0}
    seen: set[int] = set()
    for layer in kind_layers(model).values():
        for group, label in ((LEARNGENE, "learngene"), (TAILOR, "tailor")):
            for param in layer.group_parameters(group).values():
                seen.add(id(param))
                counts[f"{label}_params"] += param.numel()
                counts[f"{label}_bytes"] = counts.get(f"{label}_bytes", 0) + param.numel() * param.element_size()
    dense = [p for p in model.parameters() if id(p) not in seen]
    counts["dense_params"] = sum(p.numel() for p in dense)
    counts["dense_bytes"] = sum(p.numel() * p.element_size() for p in dense)
    return counts

