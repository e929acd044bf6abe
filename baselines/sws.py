"""SWS, Stage-wise Weight Sharing (Xia et al., IJCAI 2024; official README; docs/methods.md §5.7).

The auxiliary DiT's layers are split into consecutive stages; all layers of a stage share one block of weights
(``sws_stages.<s>``). The learngene is those per-stage blocks.

* ``ancestry``: the auxiliary DiT (default 5 stages; fewer when the model has fewer than 5 layers: one layer per
  stage then), trained by the diffusion loss plus the distillation of a pre-trained dense DiT's ε-prediction.
* ``transfer`` / ``descend`` / ``domain``: a plain DiT of any depth L' >= number of stages whose layers repeat their
  stage's block (L' split over the stages as evenly as possible, the extra layers to the earliest stages: 12 layers
  over 5 stages is 3, 3, 2, 2, 2, the README's "0,0,0,1,1,1,2,2,3,3,4,4"), then trained in full without sharing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from baselines.size_transfer import GeneratedBlocks, SizeTransferConfig, SizeTransferMethod, dit_block_init
from bench.models.dit import DiTBlock
from methods.base import MethodError

SCHEDULE_KEY = "blocks.sws_layers_per_stage"


def even_split(depth: int, stages: int) -> tuple[int, ...]:
    """``depth`` layers over ``stages`` stages, as evenly as possible, the remainder to the first stages."""
    if stages < 1 or depth < stages:
        raise MethodError(f"cannot split {depth} layers into {stages} non-empty stages")
    base, extra = divmod(depth, stages)
    return tuple(base + (1 if s < extra else 0) for s in range(stages))


def spaced_stages(depth: int, stages: int) -> tuple[int, ...]:
    """Layers per stage when a descendant has fewer layers than stages: one layer for each of ``depth`` stages
    spaced evenly from the first to the last (2 of 5 stages: the first and the last), none for the others."""
    keep = {round(i * (stages - 1) / (depth - 1)) for i in range(depth)} if depth > 1 else {0}
    return tuple(1 if s in keep else 0 for s in range(stages))


def stage_of_layers(layers_per_stage: tuple[int, ...]) -> tuple[int, ...]:
    """The stage index of every layer: (3, 3, 2) -> (0, 0, 0, 1, 1, 1, 2, 2)."""
    return tuple(s for s, count in enumerate(layers_per_stage) for _ in range(count))


class StageSharedBlocks(GeneratedBlocks):
    """One ``DiTBlock`` per stage; every layer of a stage runs its stage's block."""

    def __init__(self, template: DiTBlock, layers_per_stage: tuple[int, ...], descend_layers: tuple[int, ...]):
        super().__init__(template, sum(layers_per_stage))
        self.layers_per_stage = tuple(layers_per_stage)
        # Recorded in the export: a descendant rebuilds the auxiliary model's stages from it.
        self.register_buffer("sws_layers_per_stage", torch.tensor(self.layers_per_stage))
        self.descend_layers = tuple(descend_layers)
        self.sws_stages = nn.ModuleList([template] + [dit_block_init(copy.deepcopy(template))
                                                      for _ in layers_per_stage[1:]])

    def schedule(self, depth: int) -> tuple[int, ...]:
        """Layers per stage of a ``depth``-layer model: the auxiliary model's own, an explicit descendant split,
        or an even split."""
        if depth == self.depth:
            return self.layers_per_stage
        if self.descend_layers:
            if sum(self.descend_layers) != depth:
                raise MethodError(f"descend_layers {self.descend_layers} sum to {sum(self.descend_layers)}, not to "
                                  f"the descendant's depth {depth}")
            return self.descend_layers
        stages = len(self.layers_per_stage)
        if depth < stages:  # fewer layers than stages: one layer from each of `depth` evenly spaced stages
            return spaced_stages(depth, stages)
        return even_split(depth, stages)

    def layer_params(self, layer: int, depth: int) -> dict[str, torch.Tensor]:
        stage = stage_of_layers(self.schedule(depth))[layer]
        return dict(self.sws_stages[stage].named_parameters())

    def run_layer(self, layer: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.sws_stages[stage_of_layers(self.layers_per_stage)[layer]](x, c)


@dataclass
class SwsConfig(SizeTransferConfig):
    """SWS's options. Unknowns of the DiT adaptation are ours (baselines/README.md)."""

    stages: int = 5
    """Number of weight-sharing stages of the auxiliary model (the README's schedules have 5); capped at the
    model's depth (a shallower model gets one layer per stage). ``stages`` and ``stage_layers`` shape a fresh
    auxiliary model; descendants follow the split recorded in their ancestry (``blocks.sws_layers_per_stage``)."""
    stage_layers: tuple[int, ...] = ()
    """Explicit layers per stage of the auxiliary model (e.g. ``[3, 3, 4, 3, 3]`` for the README's L16_33433); must
    sum to its depth. Empty: the depth split evenly over ``stages``, the remainder to the first stages."""
    descend_layers: tuple[int, ...] = ()
    """Explicit layers per stage of a descendant of another depth (0 skips a stage); empty: split evenly, the
    remainder to the first stages, or, for fewer layers than stages, one layer from each of evenly spaced stages."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.stage_layers = tuple(self.stage_layers)
        self.descend_layers = tuple(self.descend_layers)
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise MethodError(f"stages must be a positive int, got {self.stages!r}")
        for name, least in (("stage_layers", 1), ("descend_layers", 0)):
            counts = getattr(self, name)
            if any(isinstance(n, bool) or not isinstance(n, int) or n < least for n in counts):
                raise MethodError(f"{name} must list layer counts >= {least}, got {counts!r}")
        if self.stage_layers and self.descend_layers and len(self.stage_layers) != len(self.descend_layers):
            raise MethodError(f"descend_layers {self.descend_layers} must have one entry per stage "
                              f"({len(self.stage_layers)})")

    def layers_per_stage(self, depth: int) -> tuple[int, ...]:
        """The auxiliary model's split of ``depth`` layers into stages."""
        if self.stage_layers:
            if sum(self.stage_layers) != depth:
                raise MethodError(f"stage_layers {self.stage_layers} sum to {sum(self.stage_layers)}, not to the "
                                  f"model's depth {depth}")
            return self.stage_layers
        return even_split(depth, min(self.stages, depth))


class SwsMethod(SizeTransferMethod):
    """SWS: pre-train an auxiliary DiT whose stages share weights; descendants repeat each stage's block."""

    name = "sws"
    Config = SwsConfig
    ancestry_methods = ("sws",)

    def make_blocks(self, template: DiTBlock, depth: int, state: dict[str, torch.Tensor] | None) -> StageSharedBlocks:
        if state is None:
            stages = self.config.layers_per_stage(depth)
        elif SCHEDULE_KEY in state:
            stages = tuple(int(n) for n in state[SCHEDULE_KEY])
        else:
            raise MethodError(f"the ancestry has no {SCHEDULE_KEY!r}: not an exported SWS auxiliary model")
        if state is not None and self.config.descend_layers and len(self.config.descend_layers) != len(stages):
            raise MethodError(f"descend_layers {self.config.descend_layers} must have one entry per stage of the "
                              f"ancestry ({len(stages)} stages)")
        return StageSharedBlocks(template, stages, self.config.descend_layers)
