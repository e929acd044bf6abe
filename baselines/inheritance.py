"""Shared by the size-transfer initialisers (Heur-LG, Auto-LG, Weight Selection): accept a dense DiT ancestry of
another size, and copy tensors from its state dict into a freshly built DiT with shape checks.

These methods are initialisers: they choose which ancestry tensors start which part of the new model, then the
whole model trains (``DenseMethod``), so there is nothing to merge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from bench.models.dit import DiTFlavour, parse_flavour
from methods.base import ArchSpec, Export, Method, MethodError, Task

#: The modules around the blocks: patch, timestep and class embedders and the output head.
OUTER_MODULES = ("x_embedder", "t_embedder", "y_embedder", "final_layer")


def check_size_ancestry(method: Method, ancestry: Export | None, arch: ArchSpec, task: Task,
                        same_width: bool) -> tuple[Export, DiTFlavour, DiTFlavour]:
    """The ancestry, checked, with the (source, target) flavours.

    The ancestry must exist and come from one of ``method.ancestry_methods``; input geometry and learned sigma
    must match. Stage ``transfer`` means the same model size, so the flavour must match too; stage ``descend``
    allows another depth (and, unless ``same_width``, another width with the same head size and patch).
    """
    method.require_stage(task.stage)
    accepted = tuple(method.ancestry_methods)
    if ancestry is None:
        raise MethodError(f"method {method.name!r} needs an ancestry exported by one of {accepted}; got none")
    if ancestry.method not in accepted:
        raise MethodError(f"method {method.name!r} cannot build from an ancestry of method {ancestry.method!r} "
                          f"({ancestry.path or 'in memory'}); it needs one of {accepted}")
    where = ancestry.path or "the ancestry"
    fields = ("input_size", "in_channels", "learn_sigma") + (("name",) if task.stage == "transfer" else ())
    differ = [f"{f}: ancestry {getattr(ancestry.arch, f)!r} vs requested {getattr(arch, f)!r}"
              for f in fields if getattr(ancestry.arch, f) != getattr(arch, f)]
    if differ:
        hint = " (stage 'descend' builds another model size)" if task.stage == "transfer" else ""
        raise MethodError(f"method {method.name!r}: {where} differs in {'; '.join(differ)}{hint}")
    source, target = parse_flavour(ancestry.arch.name), parse_flavour(arch.name)
    head = (source.hidden_size // source.num_heads, target.hidden_size // target.num_heads)
    if source.patch_size != target.patch_size or head[0] != head[1]:
        raise MethodError(f"method {method.name!r}: {ancestry.arch.name} -> {arch.name} changes the patch size or "
                          f"the head size ({head[0]} -> {head[1]}); only depth and width can change")
    if same_width and source.hidden_size != target.hidden_size:
        raise MethodError(f"method {method.name!r} inherits whole blocks, so the width must stay "
                          f"{source.hidden_size}; {arch.name} has width {target.hidden_size}")
    if "y_embedder" not in getattr(method.config, "reinit", ()) and task.num_classes != ancestry.num_classes:
        raise MethodError(f"task {task.name!r} has {task.num_classes} classes but the ancestry has "
                          f"{ancestry.num_classes}; add 'y_embedder' to {method.name}'s reinit for a new label space")
    return ancestry, source, target


@torch.no_grad()
def copy_prefix(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, target: str,
                select: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> list[str]:
    """Copy every model tensor under the module path ``target`` from ``state``'s tensor under ``source`` (same
    suffix), after ``select(suffix, tensor)`` if given; every key must exist and fit. Returns the keys written."""
    written = []
    for key, dest in model.state_dict().items():
        if not (key == target or key.startswith(target + ".")):
            continue
        suffix = key[len(target):]
        source_key = source + suffix
        if source_key not in state:
            raise MethodError(f"ancestry has no tensor {source_key!r} for {key!r}")
        value = state[source_key]
        if select is not None:
            value = select(suffix.lstrip("."), value)
        if tuple(value.shape) != tuple(dest.shape):
            raise MethodError(f"cannot initialise {key} {tuple(dest.shape)} from ancestry {source_key} "
                              f"{tuple(value.shape)}")
        dest.copy_(value)
        written.append(key)
    if not written:
        raise MethodError(f"no model tensor under {target!r}")
    return written


def param_names_under(model: nn.Module, prefixes: list[str]) -> set[str]:
    """Names of the parameters at or under the module paths ``prefixes``."""
    return {name for name, _ in model.named_parameters()
            if any(name == p or name.startswith(p + ".") for p in prefixes)}
