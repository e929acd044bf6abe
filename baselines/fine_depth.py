"""Moving per-block tensors between DiTs of different depths (FINE and its "w/o factorize" ablation).

Block ``l`` of an ``L_new``-block model sits at relative depth ``l / (L_new - 1)`` and is matched with position
``p = l (L_old - 1) / (L_new - 1)`` of the ``L_old``-block source (a one-block model sits in the middle). At equal
depths ``p = l``: every rule reduces to a plain copy. Positions are computed with integers, so that copy is exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch

from bench.models.dit import parse_flavour
from methods.base import ArchSpec, Export, Method, MethodError

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def source_position(layer: int, new_depth: int, old_depth: int) -> Fraction:
    """Where block ``layer`` of a ``new_depth`` model falls in a ``old_depth`` model, as an exact fraction."""
    if new_depth == 1:
        return Fraction(old_depth - 1, 2)
    return Fraction(layer * (old_depth - 1), new_depth - 1)


def interpolate_layers(layers: Sequence[torch.Tensor], new_depth: int) -> list[torch.Tensor]:
    """Linear interpolation over relative depth of one tensor per source block (a copy at equal depth)."""
    out = []
    for layer in range(new_depth):
        pos = source_position(layer, new_depth, len(layers))
        low = int(pos)  # floor, pos >= 0
        weight = float(pos - low)
        if weight == 0:
            out.append(layers[low].clone())
        else:
            out.append(torch.lerp(layers[low], layers[low + 1], weight))
    return out


def nearest_layer(layer: int, new_depth: int, old_depth: int) -> int:
    """The source block nearest to block ``layer``'s relative depth (ties go to the deeper block)."""
    pos = source_position(layer, new_depth, old_depth)
    return min(int(pos + Fraction(1, 2)), old_depth - 1)


def split_blocks(state: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor], int]:
    """``state`` split into per-block tensors (``{"attn.qkv.bias": [block 0, block 1, ...]}``), the rest, and depth."""
    per_block: dict[str, dict[int, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            per_block.setdefault(match[2], {})[int(match[1])] = value
        else:
            rest[key] = value
    depth = 1 + max((i for layers in per_block.values() for i in layers), default=-1)
    incomplete = [name for name, layers in per_block.items() if sorted(layers) != list(range(depth))]
    if incomplete:
        raise MethodError(f"ancestry holds {incomplete[:3]} for only some of its {depth} blocks")
    return {name: [layers[i] for i in range(depth)] for name, layers in per_block.items()}, rest, depth


def check_depth_compatible(method: Method, ancestry: Export | None, arch: ArchSpec) -> Export:
    """The ancestry, checked: present, of one of ``method.ancestry_methods``, and of ``arch``'s width, heads, patch
    and input geometry. Only the depth may differ: these methods build descendants of other depths."""
    accepted = tuple(method.ancestry_methods)
    if ancestry is None:
        raise MethodError(f"method {method.name!r} needs an ancestry exported by one of {accepted}; got none")
    if ancestry.method not in accepted:
        raise MethodError(f"method {method.name!r} cannot build from an ancestry of method {ancestry.method!r} "
                          f"({ancestry.path or 'in memory'}); it needs one of {accepted}")
    old, new = parse_flavour(ancestry.arch.name), parse_flavour(arch.name)
    differ = [f"{f}: ancestry {getattr(old, f)} vs requested {getattr(new, f)}"
              for f in ("hidden_size", "num_heads", "patch_size") if getattr(old, f) != getattr(new, f)]
    differ += [f"{f}: ancestry {getattr(ancestry.arch, f)!r} vs requested {getattr(arch, f)!r}"
               for f in ("input_size", "in_channels", "learn_sigma") if getattr(ancestry.arch, f) != getattr(arch, f)]
    if differ:
        raise MethodError(f"method {method.name!r} builds descendants of another depth only (same width, heads, "
                          f"patch and input); {ancestry.path or 'the ancestry'} differs in {'; '.join(differ)}")
    return ancestry
