"""Direct pretraining ("scratch"): a stock DiT from DiT's random initialisation, every parameter trained.

The reference point of every learngene comparison (docs/methods.md §5.1) and the method that produces dense ancestries:
its ``ancestry`` stage pre-trains the DiT that ``full`` and the PEFT baselines later transfer from. It supports
every stage because training from scratch needs nothing from an ancestry; passing one is an error, since silently
ignoring it would mislabel a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from baselines.common import DenseMethod
from bench.models.dit import DiT
from methods.base import STAGES, ArchSpec, Export, MethodConfig, MethodError, Task


@dataclass
class ScratchConfig(MethodConfig):
    """Scratch has no hyperparameters: it adapts no layer (``targets``) and has nothing to re-initialise."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets or self.reinit:
            raise MethodError("scratch trains a stock DiT from random init: 'targets' and 'reinit' do not apply")


class ScratchMethod(DenseMethod):
    """Train a freshly initialised DiT of the requested size in full."""

    family = "pretrain"

    name = "scratch"
    Config = ScratchConfig
    stages = frozenset(STAGES)
    ancestry_methods = ()

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        self.require_stage(task.stage)
        if ancestry is not None:
            raise MethodError(f"scratch builds from random init and takes no ancestry; got one of method "
                              f"{ancestry.method!r} ({ancestry.path or 'in memory'}); use 'full' to fine-tune it")
        model = arch.build(task.num_classes)
        return model

    def new_param_names(self, model: nn.Module) -> set[str]:
        # Nothing is inherited: every parameter, the fixed position embedding included, was made by this build.
        return {name for name, _ in model.named_parameters()}
