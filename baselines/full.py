"""Full fine-tuning ("Pre-Fin", docs/methods.md §5.2): load a dense pre-trained DiT and train every parameter.

The upper bound on trainable parameters in the PEFT comparison. The ancestry must be a dense DiT of the same
flavour and input geometry (exported by ``scratch`` or ``full``). The modules in ``reinit`` are re-initialised
with DiT's init instead of loaded: by default the class table ``y_embedder``, because a downstream task has a new
label space. The table is redrawn even when the task happens to have as many classes as the ancestry (its rows
would mean other classes); drop ``y_embedder`` from ``reinit`` to keep the ancestry's table for the same labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from baselines.common import DenseMethod, build_from_dense_ancestry
from bench.models.dit import DiT
from methods.base import ArchSpec, Export, MethodConfig, MethodError, Task
from methods.surgery import check_reinit_names, module_param_names
from methods.transfer import DENSE_METHODS


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning adapts no particular layer; only ``reinit`` applies."""

    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules re-initialised rather than loaded: ``y_embedder`` (new label space), optionally ``final_layer``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets:
            raise MethodError("full fine-tuning trains every layer: 'targets' does not apply")
        check_reinit_names(self.reinit)


class FullMethod(DenseMethod):
    """Fine-tune every parameter of a dense pre-trained DiT on the downstream task."""

    family = "full_ft"

    name = "full"
    Config = FullConfig
    stages = frozenset({"transfer", "domain"})
    ancestry_methods = DENSE_METHODS

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        model = build_from_dense_ancestry(self, arch, task, ancestry, self.config.reinit)
        return model

    def new_param_names(self, model: nn.Module) -> set[str]:
        return module_param_names(model, self.config.reinit)
