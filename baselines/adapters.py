"""The shared shape of every parameter-efficient baseline: a frozen dense DiT plus a few tensors the method owns.

Every PEFT baseline (the HF ``peft`` wrappers in ``baselines.peft_adapter``, the native ``svdiff``, ``difffit`` and
``bitfit``) is built the same way, so the comparison differs only in the method itself:

1. target names are checked on a meta-device probe first, so an unmatched target fails in our words
   (``methods.surgery``) before any weights are loaded;
2. the dense ancestry (``scratch`` or ``full``) is loaded, the ``reinit`` modules (default: the class table for the
   new label space) are re-initialised;
3. the method ``attach``-es its own layers (module surgery; ``bench/models/dit.py`` is never edited);
4. ``mark_trainable`` freezes everything and unfreezes, found structurally, the method's own new tensors
   (``adapter``), any inherited tensors it tunes (``tuned``, e.g. BitFit's biases), the ``reinit`` modules and the
   ``train_modules`` (default: the final layer), each in its own param group.

``merge`` folds the method back into plain ``nn.Linear`` layers and returns a DiT with DiT's own state-dict keys.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from baselines.common import build_from_dense_ancestry
from bench.models.dit import DiT
from methods.accounting import method_accounting
from methods.base import Accounting, ArchSpec, Export, Method, MethodConfig, MethodError, Task
from methods.surgery import check_reinit_names, find_linears, freeze_all, matches_suffix, resolve_modules
from methods.transfer import DENSE_METHODS

#: The matrices KIND decomposes (docs/methods.md §2.2, §6.1): fused q/k/v, attention output, MLP fc1 and fc2.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
#: The blocks' adaLN modulation Linear, opt-in for every method that adapts target matrices.
ADALN = "adaLN_modulation.1"


def check_positive_int(label: str, name: str, value: Any, minimum: int = 1) -> None:
    """``MethodError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise MethodError(f"{label} {name} must be {kind}, got {value!r}")


def check_dropout(label: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise MethodError(f"{label} {name} must be in [0, 1), got {value!r}")


def check_lr_scale(label: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MethodError(f"{label} {name} must be a positive number, got {value!r}")


@dataclass
class AdapterConfig(MethodConfig):
    """Options every parameter-efficient baseline shares (docs/methods.md §6.1: same matrices as KIND, new class
    embeddings and the final layer trainable in every method)."""

    label = "adapter"  # the method name used in error messages (class attributes, not config fields)
    needs_targets = True  # False for methods that adapt no particular matrix (BitFit, DiffFit)

    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Linears the method adapts, as module-name suffixes: q/k/v (fused), o, fc1, fc2, the matrices KIND decomposes;
    add ``adaLN_modulation.1`` to adapt the blocks' adaLN modulation too."""
    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules re-initialised for the new label space and trained in full (default: the class table)."""
    train_modules: tuple[str, ...] = ("final_layer",)
    """Modules inherited from the ancestry and trained in full alongside the method (default: the final layer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.train_modules = tuple(self.train_modules)
        if self.needs_targets and not self.targets:
            raise MethodError(f"{self.label} needs at least one target Linear")
        if not self.needs_targets and self.targets:
            raise MethodError(f"{self.label} adapts no particular matrix: 'targets' does not apply (got "
                              f"{self.targets})")
        check_reinit_names(self.reinit)
        both = set(self.reinit) & set(self.train_modules)
        if both:
            raise MethodError(f"{self.label}: {sorted(both)} listed in both 'reinit' and 'train_modules'")


class AdapterMethod(Method):
    """Base of the parameter-efficient baselines: a frozen dense DiT plus method-owned tensors (module docstring).

    Subclasses implement ``attach`` (surgery on the loaded model), ``adapter_params`` (the new tensors, found by
    layer type) and ``unwrap`` (fold back into plain Linears); optionally ``tuned_params`` (inherited tensors the
    method trains), ``extra_state`` (tensors needed to reproduce the model that are not trained) and
    ``group_lr_scale``.
    """

    Config = AdapterConfig
    stages = frozenset({"transfer", "domain"})
    ancestry_methods = DENSE_METHODS
    family = "peft"

    # ---- building -------------------------------------------------------------------------------------------

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> nn.Module:
        self.require_stage(task.stage)
        # Validate names on a weightless probe before any weights are loaded: an unmatched target or module fails
        # fast and in our words, never as a library warning.
        probe = arch.build(task.num_classes, device="meta")
        targets = self.adapted_linears(probe)
        self.check_targets(probe, targets)
        model = build_from_dense_ancestry(self, arch, task, ancestry, self.config.reinit)
        self.attach(model, targets)
        return model

    def adapted_linears(self, model: nn.Module) -> list[str]:
        """Names of the Linears the method adapts: target matches outside the modules trained in full.

        A suffix such as ``adaLN_modulation.1`` also matches ``final_layer.adaLN_modulation.1``; when the final layer
        is trained in full an adapter there would be redundant, so it is left out. A target left with no Linear at
        all is an error, as is a target that matches nothing.
        """
        cfg = self.config
        full = tuple(cfg.reinit) + tuple(cfg.train_modules)
        resolve_modules(model, full)  # a missing module is an error here, before any weights are loaded
        if not cfg.targets:  # BitFit, DiffFit (the Config guarantees targets wherever the method needs them)
            return []
        found = find_linears(model, cfg.targets)
        kept = [n for n in found if not any(n.startswith(m + ".") for m in full)]
        for target in cfg.targets:
            if not any(matches_suffix(n, target) for n in kept):
                raise MethodError(f"{self.name} target {target!r} only matches Linears inside modules trained in "
                                  f"full {full}; drop it from 'targets' or the module from 'reinit'/'train_modules'")
        return kept

    def check_targets(self, probe: nn.Module, targets: list[str]) -> None:
        """Method-specific checks of the adapted Linears' shapes on the meta probe (default: none)."""

    @abc.abstractmethod
    def attach(self, model: nn.Module, targets: list[str]) -> None:
        """Add the method's layers to the loaded ``model`` in place (``targets``: the Linears to adapt)."""

    # ---- what the method owns -------------------------------------------------------------------------------

    @abc.abstractmethod
    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The tensors the method added (adapters, scales, shifts), by qualified name, found by layer type."""

    def tuned_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Inherited tensors the method trains in place (BitFit's biases); none by default."""
        return {}

    def group_lr_scale(self, group: str) -> float:
        """Learning-rate multiplier of a param group (``adapter``, ``tuned``, ``reinit``, ``trained``)."""
        return 1.0

    def owned(self, model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
        """Every parameter the method trains, by group, each parameter in exactly one group."""
        adapter = self.adapter_params(model)
        if not adapter and self.config.needs_targets:
            raise MethodError(f"{self.name}: the model has none of the method's layers; build it with "
                              f"{type(self).__name__}.build")
        taken = {id(p) for p in adapter.values()}
        in_full: dict[str, dict[str, nn.Parameter]] = {}
        for group, names in (("reinit", self.config.reinit), ("trained", self.config.train_modules)):
            in_full[group] = {}
            for prefix, module in resolve_modules(model, names).items():
                for name, param in module.named_parameters(prefix=prefix):
                    if id(param) not in taken:
                        in_full[group][name] = param
                        taken.add(id(param))
        # A bias inside a module trained in full belongs to that module's group, not to "tuned".
        tuned = {name: p for name, p in self.tuned_params(model).items() if id(p) not in taken}
        return {"adapter": adapter, "tuned": tuned, **in_full}

    # ---- training -------------------------------------------------------------------------------------------

    def mark_trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = self.owned(model)
        freeze_all(model)
        param_groups = []
        for group, params in groups.items():
            for param in params.values():
                param.requires_grad_(True)
            if params:
                param_groups.append({"name": group, "params": list(params.values()),
                                     "lr_scale": self.group_lr_scale(group)})
        return param_groups

    # ---- saving ---------------------------------------------------------------------------------------------

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Untrained tensors that ``state_to_save`` must still carry to reproduce the model exactly (none)."""
        return {}

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {name: p.detach() for params in self.owned(model).values() for name, p in params.items()}
        state.update(self.extra_state(model))
        return state

    def loadable_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Parameters and buffers: ``extra_state`` saves buffers too (VeRA's projections)."""
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    # ---- inference ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def unwrap(self, model: nn.Module) -> None:
        """Fold the method's layers into plain ``nn.Linear`` layers, in place."""

    def merge(self, model: nn.Module) -> DiT:
        """Fold the method into plain DiT Linears, in place; returns the model, a DiT with DiT's own keys."""
        self.unwrap(model)
        if not isinstance(model, DiT):
            raise MethodError(f"{self.name}: merged model is a {type(model).__name__}, not a DiT")
        return model

    def count(self, model: nn.Module) -> Accounting:
        groups = self.owned(model)
        return method_accounting(self, model, set(groups["adapter"]) | set(groups["reinit"]))
