"""FINE's "w/o factorize" ablation (FINE Table 4; docs/methods.md §3.4): per-layer SVD instead of shared factors.

Each block matrix of a pre-trained dense DiT is decomposed on its own (thin SVD); the top-r singular triplets of
the source block initialise the matching block of the target, which is then trained in full as a plain DiT.
Nothing is shared across blocks, which is exactly what the ablation removes from FINE.

A target of another depth takes, for each of its blocks, the source block nearest in relative depth
(``fine_depth.nearest_layer``), with that block's biases.

The rank is the ablation's budget. At r = d every component is kept and the "ablation" is a plain copy of the
depth-mapped dense weights (transfer initialisation, another baseline). By default (``rank = 0``) the ablation
transfers as many numbers as FINE does: FINE's shared factors at its default rank d hold d(m + n) numbers per matrix
type for all blocks together, so each of the L target blocks keeps r = round(d / L) components (d(m + n) / L each).
What differs from FINE is then only the sharing, which is what the ablation isolates (docs/methods.md §3.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from baselines.common import DenseMethod
from baselines.fine_depth import check_depth_compatible, nearest_layer, split_blocks
from baselines.fine_layers import BLOCK_TYPES
from bench.models.dit import DiT, parse_flavour
from methods.base import ArchSpec, Export, MethodConfig, MethodError, Task
from methods.decomposed import svd_factors
from methods.surgery import check_reinit_names, module_param_names, reinit_modules
from methods.transfer import DENSE_METHODS, load_into


@dataclass
class FineNoFactorConfig(MethodConfig):
    """Which block matrices are SVD-truncated, at which rank, and what is re-initialised."""

    targets: tuple[str, ...] = BLOCK_TYPES
    """Block matrix types initialised from their top-r singular triplets (FINE's five types); other block tensors
    are copied from the depth-mapped source block."""
    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules re-initialised for a new label space; ``[]`` for a descendant on the ancestry's own classes."""
    rank: int = 0
    """Singular triplets kept per matrix; 0 means FINE's budget, r = round(d / target depth) (see the module
    docstring; ours, docs/methods.md §3.4); d keeps them all (a plain weight copy)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets or any(t not in BLOCK_TYPES for t in self.targets) or \
                len(set(self.targets)) != len(self.targets):
            raise MethodError(f"fine_nofactor targets must be distinct block matrix types of {BLOCK_TYPES}; "
                              f"got {self.targets}")
        check_reinit_names(self.reinit)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise MethodError(f"fine_nofactor rank must be a non-negative int (0 = hidden size); got {self.rank!r}")


class FineNoFactorMethod(DenseMethod):
    """Initialise each block of a (possibly shallower or deeper) DiT from one source block's top-r SVD; train all."""

    family = "learngene"

    name = "fine_nofactor"
    Config = FineNoFactorConfig
    stages = frozenset({"transfer", "descend"})
    ancestry_methods = DENSE_METHODS

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        self.require_stage(task.stage)
        ancestry = check_depth_compatible(self, ancestry, arch)
        reinit = self.config.reinit
        if "y_embedder" not in reinit and task.num_classes != ancestry.num_classes:
            raise MethodError(f"task {task.name!r} has {task.num_classes} classes but the ancestry has "
                              f"{ancestry.num_classes}; add 'y_embedder' to fine_nofactor's reinit for a new label "
                              f"space")
        per_block, rest, old_depth = split_blocks(ancestry.state)
        new_depth = parse_flavour(arch.name).depth
        weights = {f"{t}.weight" for t in self.config.targets}
        state = dict(rest)
        for layer in range(new_depth):
            source = nearest_layer(layer, new_depth, old_depth)
            for name, layers in per_block.items():
                value = layers[source]
                state[f"blocks.{layer}.{name}"] = self._truncate(value, new_depth) if name in weights \
                    else value.clone()
        model = arch.build(task.num_classes)
        load_into(model, state, skip=reinit)
        reinit_modules(model, reinit)
        return model

    def _truncate(self, weight: torch.Tensor, depth: int) -> torch.Tensor:
        full = min(weight.shape)  # the hidden size d for every block matrix of a DiT
        rank = self.config.rank or max(1, round(full / depth))
        if rank > full:
            raise MethodError(f"fine_nofactor rank {rank} exceeds {full} for a {tuple(weight.shape)} matrix")
        u, sigma, v = svd_factors(weight, rank)
        return (u * sigma) @ v.T

    def new_param_names(self, model: nn.Module) -> set[str]:
        return module_param_names(model, self.config.reinit)
