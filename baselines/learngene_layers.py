"""Heur-LG and Auto-LG: a descendant DiT inherits k whole blocks of a dense ancestry and stacks random blocks.

**Heur-LG** (Wang et al., AAAI 2022, arXiv 2106.06788) takes as the learngene the layers whose gradients change
little across tasks. **Auto-LG** (Wang et al., arXiv 2305.02279) takes the integral layers most similar between the
ancestry and a briefly fine-tuned "pseudo descendant". DiT adaptation (docs/methods.md §5.3-§5.5): k = L_tgt / 3
inherited blocks (at least 1) keep their relative order and sit on top of the descendant; the blocks below are
DiT-initialised (adaLN-Zero, so each starts as the identity); the embedders and the final layer are copied
(``copy_outer``). The ranking is computed in ``build`` on a synthetic probe (``baselines.layer_probes``), or given
explicitly as ancestry block ids (``blocks``), e.g. ranked offline on real data. Everything trains afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from baselines.common import DenseMethod
from baselines.inheritance import OUTER_MODULES, check_size_ancestry, copy_prefix, param_names_under
from baselines.layer_probes import (
    block_cka_scores,
    block_gradient_scores,
    diffusion_for,
    make_probes,
    pseudo_descendant,
)
from bench.models.dit import DiT
from methods.base import ArchSpec, Export, MethodConfig, MethodError, Task
from methods.surgery import check_reinit_names
from methods.transfer import DENSE_METHODS, load_into

_PLACEMENTS = ("top", "bottom")


@dataclass
class LayerInheritConfig(MethodConfig):
    """Options shared by Heur-LG and Auto-LG; ``targets`` does not apply (whole blocks are inherited)."""

    reinit: tuple[str, ...] = ("y_embedder",)
    """Outer modules drawn fresh instead of copied: ``y_embedder`` (new label space), optionally ``final_layer``."""
    inherit_blocks: int = 0
    """k, the number of ancestry blocks inherited; 0 means max(1, L_tgt // 3) (ours, docs/methods.md §5.5)."""
    placement: str = "top"
    """Where the learngene blocks go: ``top`` (last k blocks, random ones below; our default) or ``bottom``."""
    copy_outer: bool = True
    """Copy the patch/timestep/class embedders and the final layer from the ancestry (except ``reinit``)."""
    blocks: tuple[int, ...] = ()
    """Explicit ancestry block ids to inherit (k of them, increasing), overriding the criterion: a ranking made
    elsewhere, e.g. on real held-out data. Empty: rank in ``build`` with ``criterion``."""
    probe_batches: int = 4
    """Synthetic probe batches ("tasks") the ranking is measured on [ours: build() gets no data]."""
    probe_batch_size: int = 8
    """Samples per probe batch."""
    probe_seed: int = 0
    """Seed of the probe batches (inputs, labels, timesteps, noise)."""
    probe_device: str = "cpu"
    """Device the ranking is computed on (``cpu`` or ``cuda``); the built model is returned on the CPU."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.blocks = tuple(self.blocks)
        if self.targets:
            raise MethodError(f"{type(self).__name__}: whole blocks are inherited, 'targets' does not apply")
        check_reinit_names(self.reinit)
        for name in ("probe_batches", "probe_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"{name} must be a positive int, got {value!r}")
        k = self.inherit_blocks
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise MethodError(f"inherit_blocks must be a non-negative int (0: L_tgt // 3), got {k!r}")
        if self.placement not in _PLACEMENTS:
            raise MethodError(f"placement must be one of {_PLACEMENTS}, got {self.placement!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.blocks) or \
                list(self.blocks) != sorted(set(self.blocks)):
            raise MethodError(f"blocks must be increasing, distinct ancestry block ids, got {self.blocks!r}")
        if self.inherit_blocks and self.blocks and len(self.blocks) != self.inherit_blocks:
            raise MethodError(f"blocks lists {len(self.blocks)} ids but inherit_blocks is {self.inherit_blocks}")
        if self.probe_device not in ("cpu", "cuda"):
            raise MethodError(f"probe_device must be 'cpu' or 'cuda', got {self.probe_device!r}")


def inherit_count(config: LayerInheritConfig, target_depth: int) -> int:
    """k for a descendant of ``target_depth`` blocks."""
    k = len(config.blocks) or config.inherit_blocks or max(1, target_depth // 3)
    if k > target_depth:
        raise MethodError(f"cannot inherit {k} blocks into a descendant of depth {target_depth}")
    return k


def learngene_slots(config: LayerInheritConfig, target_depth: int) -> list[int]:
    """Descendant block positions that receive the inherited blocks, in order."""
    k = inherit_count(config, target_depth)
    return list(range(target_depth - k, target_depth)) if config.placement == "top" else list(range(k))


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """The k blocks with the smallest scores (ties: the earlier block), in increasing block order."""
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


def best_window(scores: torch.Tensor, k: int) -> list[int]:
    """The k contiguous blocks with the largest summed score (ties: the earliest window)."""
    sums = torch.stack([scores[start:start + k].sum() for start in range(len(scores) - k + 1)])
    start = int(torch.argmax(sums))  # argmax returns the first maximum
    return list(range(start, start + k))


class LayerInheritMethod(DenseMethod):
    """Inherit k whole ancestry blocks (chosen by ``choose_blocks``) into a DiT of any depth and the same width."""

    family = "learngene"

    Config = LayerInheritConfig
    stages = frozenset({"transfer", "descend"})
    ancestry_methods = DENSE_METHODS

    def __init__(self, config=None):
        super().__init__(config)
        self.inherited: list[int] = []
        """Ancestry block ids inherited by the last ``build`` (provenance; the run log can report it)."""
        self.scores: torch.Tensor | None = None
        """The per-block scores the last ``build`` ranked by (None when ``blocks`` was given)."""

    def choose_blocks(self, ancestor: DiT, k: int) -> list[int]:
        """The k ancestry block ids to inherit, increasing, from the ancestry model itself."""
        raise NotImplementedError

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        ancestry, source, target = check_size_ancestry(self, ancestry, arch, task, same_width=True)
        cfg = self.config
        k = inherit_count(cfg, target.depth)
        if k > source.depth or any(b >= source.depth for b in cfg.blocks):
            raise MethodError(f"{self.name}: cannot inherit {k} blocks {list(cfg.blocks) or ''} from an ancestry of "
                              f"depth {source.depth}")
        if cfg.blocks:
            self.inherited, self.scores = list(cfg.blocks), None
        else:
            ancestor = ancestry.arch.build(ancestry.num_classes)
            load_into(ancestor, ancestry.state)
            self.inherited = self.choose_blocks(ancestor.to(cfg.probe_device), k)
        model = arch.build(task.num_classes)
        for slot, block in zip(learngene_slots(cfg, target.depth), self.inherited):
            copy_prefix(model, ancestry.state, f"blocks.{block}", f"blocks.{slot}")
        if cfg.copy_outer:
            for module in OUTER_MODULES:
                if module not in cfg.reinit:
                    copy_prefix(model, ancestry.state, module, module)
            # pos_embed is DiT's fixed sin-cos table, identical for the same width and input size.
            copy_prefix(model, ancestry.state, "pos_embed", "pos_embed")
        return model

    def new_param_names(self, model: nn.Module) -> set[str]:
        slots = set(learngene_slots(self.config, len(model.blocks)))
        fresh = [f"blocks.{i}" for i in range(len(model.blocks)) if i not in slots]
        fresh += list(self.config.reinit) if self.config.copy_outer else [*OUTER_MODULES, "pos_embed"]
        return param_names_under(model, fresh)


# --------------------------------------------------------------------------------------------------------------
#                                                   Heur-LG
# --------------------------------------------------------------------------------------------------------------


@dataclass
class HeurLGConfig(LayerInheritConfig):
    """Heur-LG: rank ancestry blocks by gradient stability."""

    criterion: str = "gradient"
    """``gradient``: the k blocks with the smallest mean normalised gradient norm ||g_b|| / ||theta_b|| of the
    diffusion loss over the probe batches (docs/methods.md §5.3); ``last``: the last k blocks (what the original CNN
    study found stable), no probe."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.criterion not in ("gradient", "last"):
            raise MethodError(f"heur_lg criterion must be 'gradient' or 'last', got {self.criterion!r}")


class HeurLGMethod(LayerInheritMethod):
    """Heur-LG on DiT: inherit the k most gradient-stable ancestry blocks, random blocks below."""

    name = "heur_lg"
    Config = HeurLGConfig

    def choose_blocks(self, ancestor: DiT, k: int) -> list[int]:
        depth = len(ancestor.blocks)
        if self.config.criterion == "last":
            self.scores = None
            return list(range(depth - k, depth))
        cfg = self.config
        probes = make_probes(ancestor, cfg.probe_batches, cfg.probe_batch_size, cfg.probe_seed,
                             diffusion_for(ancestor))
        self.scores = block_gradient_scores(ancestor, probes)
        return lowest(self.scores, k)


# --------------------------------------------------------------------------------------------------------------
#                                                   Auto-LG
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AutoLGConfig(LayerInheritConfig):
    """Auto-LG: rank ancestry blocks by similarity to a briefly fine-tuned pseudo-descendant."""

    finetune_steps: int = 20
    """AdamW steps that fine-tune the pseudo-descendant (a copy of the ancestry) on the probe batches [ours]."""
    finetune_lr: float = 1e-4
    """Learning rate of that fine-tuning (DiT's lr)."""
    contiguous: bool = True
    """Inherit the k contiguous blocks of highest summed CKA (docs/methods.md §5.4: "integral layers"); False: the k
    individually most similar blocks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        steps = self.finetune_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise MethodError(f"auto_lg finetune_steps must be a positive int, got {steps!r}")
        if not self.finetune_lr > 0:
            raise MethodError(f"auto_lg finetune_lr must be positive, got {self.finetune_lr!r}")


class AutoLGMethod(LayerInheritMethod):
    """Auto-LG on DiT: inherit the k blocks whose outputs the pseudo-descendant changed least (linear CKA)."""

    name = "auto_lg"
    Config = AutoLGConfig

    def choose_blocks(self, ancestor: DiT, k: int) -> list[int]:
        cfg = self.config
        probes = make_probes(ancestor, cfg.probe_batches + 1, cfg.probe_batch_size, cfg.probe_seed,
                             diffusion_for(ancestor))
        # The last probe is held out: similarity is measured on a batch the pseudo-descendant did not train on.
        descendant = pseudo_descendant(ancestor, probes[:-1], cfg.finetune_steps, cfg.finetune_lr)
        self.scores = block_cka_scores(ancestor, descendant, probes[-1])
        if cfg.contiguous:
            return best_window(self.scores, k)
        return lowest(-self.scores, k)
