"""Helpers shared by the baselines: building from a dense DiT ancestry and training a DiT in full."""

from __future__ import annotations

from typing import Any

from torch import nn

from bench.models.dit import DiT
from methods.accounting import method_accounting
from methods.base import Accounting, ArchSpec, Export, Method, MethodError, Task
from methods.surgery import freeze_all, reinit_modules
from methods.transfer import check_ancestry, load_into


def fixed_dit_params(model: nn.Module) -> set[int]:
    """Ids of the parameters the stock DiT never trains (its sin-cos ``pos_embed``), found by identity, not name."""
    pos_embed = getattr(model, "pos_embed", None)
    return {id(pos_embed)} if isinstance(pos_embed, nn.Parameter) else set()


def build_from_dense_ancestry(method: Method, arch: ArchSpec, task: Task, ancestry: Export | None,
                              reinit: tuple[str, ...]) -> DiT:
    """A stock DiT for ``task`` holding the ancestry's weights, with the ``reinit`` modules freshly initialised.

    The reinit modules are skipped when loading (so a new label space may have any number of classes) and then
    re-initialised with DiT's init even when their shapes would have allowed loading them.
    """
    method.require_stage(task.stage)
    ancestry = check_ancestry(method, ancestry, arch)
    if "y_embedder" not in reinit and task.num_classes != ancestry.num_classes:
        raise MethodError(f"task {task.name!r} has {task.num_classes} classes but the ancestry has "
                          f"{ancestry.num_classes}; add 'y_embedder' to {method.name}'s reinit for a new label space")
    model = arch.build(task.num_classes)
    load_into(model, ancestry.state, skip=reinit)
    reinit_modules(model, reinit)
    return model


class DenseMethod(Method):
    """A method that trains every parameter of a stock DiT (``scratch``, ``full``). Nothing to merge."""

    def new_param_names(self, model: nn.Module) -> set[str]:
        """Parameters this method initialised fresh rather than took from the ancestry."""
        raise NotImplementedError

    def mark_trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        freeze_all(model)
        fixed = fixed_dit_params(model)
        params = [p for p in model.parameters() if id(p) not in fixed]
        for param in params:
            param.requires_grad_(True)
        return [{"name": "dense", "params": params, "lr_scale": 1.0}]

    def merge(self, model: nn.Module) -> DiT:
        """The model itself: a dense method leaves a plain DiT."""
        if not isinstance(model, DiT):
            raise MethodError(f"{self.name}: expected a DiT to merge, got {type(model).__name__}")
        return model

    def count(self, model: nn.Module) -> Accounting:
        return method_accounting(self, model, self.new_param_names(model))

