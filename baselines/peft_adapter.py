"""PEFT baselines through HF ``peft`` (methods.md §6): LoRA on the DiT's attention and MLP Linears.

peft injects its adapter layers into any ``nn.Module`` with ``inject_adapter_in_model``, which keeps the DiT's
class and module names (a ``PeftModel`` wrapper would not); we use that rather than re-implement LoRA. Around it
this module adds what the benchmark needs: our target check first (an unmatched target is our ``MethodError``,
never a peft warning), re-initialised class embeddings and a fully trained final layer ("new class embeddings and
the final layer trainable in every method"), structural trainability by peft's tuner-layer type, and a merge that
hands back a plain DiT.

peft's own ``modules_to_save`` is not used for ``reinit``/``train_modules``: it wraps the module and renames its
parameters, so the merged model would no longer load with DiT's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from baselines.common import build_from_dense_ancestry
from bench.models.dit import DiT
from methods.accounting import method_accounting
from methods.base import Accounting, Ancestry, ArchSpec, Method, MethodConfig, MethodError, Task
from methods.surgery import (check_reinit_names, find_linears, freeze_all, matches_suffix, resolve_modules,
                             set_submodule)
from methods.transfer import DENSE_METHODS

#: The one adapter every injected layer carries (peft supports several; a benchmark run trains one).
ADAPTER = "default"
#: ``init`` values that rewrite the frozen base weight (W_res = W0 - B A); their residuals are saved with the adapter.
_BASE_REWRITING_INIT = re.compile(r"^(pissa|pissa_niter_\d+|olora)$")
_INITS = "True, 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora'"


@dataclass
class LoraConfig(MethodConfig):
    """LoRA: W = W0 + (alpha / rank) * B A with W0 frozen (Hu et al., arXiv 2106.09685)."""

    targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    """Linears that get an adapter: q/k/v (fused), o, fc1, fc2, the same matrices KIND decomposes (methods.md §6)."""
    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules re-initialised for the new label space and trained in full (default: the class table)."""
    rank: int = 16
    """LoRA rank r; methods.md §6 reports each PEFT at r = 16 and at a KIND-matched budget."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. None means alpha = rank (methods.md §6)."""
    dropout: float = 0.0
    """Dropout on the adapter input (peft ``lora_dropout``)."""
    init: bool | str = True
    """peft ``init_lora_weights``: True (A Kaiming-uniform, B = 0, the adapter starts as a no-op), 'gaussian',
    'pissa' / 'pissa_niter_<k>' (principal singular components; rewrites the frozen base) or 'olora'."""
    train_modules: tuple[str, ...] = ("final_layer",)
    """Modules inherited from the ancestry and trained in full alongside the adapters (default: the final layer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.train_modules = tuple(self.train_modules)
        if not self.targets:
            raise MethodError("lora needs at least one target Linear")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise MethodError(f"lora rank must be a positive int, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not self.alpha > 0:
            raise MethodError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MethodError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not (self.init is True or self.init == "gaussian" or
                (isinstance(self.init, str) and _BASE_REWRITING_INIT.match(self.init))):
            raise MethodError(f"lora init must be one of {_INITS}; got {self.init!r}")
        check_reinit_names(self.reinit)

    @property
    def rewrites_base(self) -> bool:
        return isinstance(self.init, str) and bool(_BASE_REWRITING_INIT.match(self.init))


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every peft LoRA layer in ``model``, by qualified name (found by type, never by name)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _adapter_params(prefix: str, layer: LoraLayer) -> dict[str, nn.Parameter]:
    # peft keeps each kind of adapter tensor (lora_A, lora_B, DoRA magnitude, ...) in a dict keyed by adapter name;
    # the kinds are listed structurally on the layer class as adapter_layer_names.
    params: dict[str, nn.Parameter] = {}
    for kind in layer.adapter_layer_names:
        container = getattr(layer, kind, None)
        if container is None or ADAPTER not in container:
            continue
        entry = container[ADAPTER]
        if isinstance(entry, nn.Parameter):
            params[f"{prefix}.{kind}.{ADAPTER}"] = entry
        else:
            params.update({f"{prefix}.{kind}.{ADAPTER}.{n}": p for n, p in entry.named_parameters()})
    return params


class LoraMethod(Method):
    """LoRA adapters (peft) on a frozen dense DiT, plus re-initialised class embeddings and a trained final layer."""

    name = "lora"
    Config = LoraConfig
    stages = frozenset({"transfer", "domain"})
    ancestry_methods = DENSE_METHODS

    # ---- building -------------------------------------------------------------------------------------------

    def build(self, arch: ArchSpec, task: Task, ancestry: Ancestry | None) -> nn.Module:
        cfg = self.config
        self.require_stage(task.stage)
        # Validate names before any weights are loaded: an unmatched target or module fails fast and in our words.
        probe = arch.build(task.num_classes, device="meta")
        targets = self._adapted_linears(probe)
        model = build_from_dense_ancestry(self, arch, task, ancestry, cfg.reinit)
        peft_config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                                      init_lora_weights=cfg.init, target_modules=list(targets))
        peft.inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
        self.mark_trainable(model)
        return model

    def _adapted_linears(self, model: nn.Module) -> list[str]:
        """Names of the Linears that get an adapter: target matches outside the modules trained in full.

        A suffix such as ``adaLN_modulation.1`` also matches ``final_layer.adaLN_modulation.1``; when the final layer
        is trained in full an adapter there would be redundant, so it is left out. A target left with no Linear at
        all is an error, as is a target that matches nothing.
        """
        full = tuple(self.config.reinit) + self.config.train_modules
        resolve_modules(model, full)  # a missing module is an error here, before any weights are loaded
        found = find_linears(model, self.config.targets)
        kept = [n for n in found if not any(n.startswith(m + ".") for m in full)]
        for target in self.config.targets:
            if not any(matches_suffix(n, target) for n in kept):
                raise MethodError(f"lora target {target!r} only matches Linears inside modules trained in full "
                                  f"{full}; drop it from 'targets' or the module from 'reinit'/'train_modules'")
        return kept

    # ---- training -------------------------------------------------------------------------------------------

    def _owned(self, model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
        """Parameters this method owns, by group: adapter tensors, re-initialised modules, inherited-but-trained."""
        layers = lora_layers(model)
        if not layers:
            raise MethodError("lora: the model has no LoRA layers; build it with LoraMethod.build")
        adapter: dict[str, nn.Parameter] = {}
        for prefix, layer in layers.items():
            adapter.update(_adapter_params(prefix, layer))
        groups = {"adapter": adapter, "reinit": {}, "trained": {}}
        for group, names in (("reinit", self.config.reinit), ("trained", self.config.train_modules)):
            for prefix, module in resolve_modules(model, names).items():
                for name, param in module.named_parameters(prefix=prefix):
                    if not any(name in g for g in groups.values()):
                        groups[group][name] = param
        return groups

    def mark_trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        freeze_all(model)
        param_groups = []
        for group, params in self._owned(model).items():
            for param in params.values():
                param.requires_grad_(True)
            if params:
                param_groups.append({"name": group, "params": list(params.values()), "lr_scale": 1.0})
        return param_groups

    # ---- saving ---------------------------------------------------------------------------------------------

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {name: p.detach() for params in self._owned(model).values() for name, p in params.items()}
        if self.config.rewrites_base:
            # PiSSA/OLoRA subtract the initial adapter from the frozen base; the residual depends on the SVD/QR
            # backend, so it is stored rather than recomputed (exact reproduction at the cost of dense bytes).
            for prefix, layer in lora_layers(model).items():
                state[f"{prefix}.base_layer.weight"] = layer.get_base_layer().weight.detach()
        return state

    # ---- inference ------------------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> DiT:
        """Fold every adapter into its base weight and put the plain ``nn.Linear`` back, in place; returns a DiT."""
        for name, layer in lora_layers(model).items():
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])
            set_submodule(model, name, layer.get_base_layer())
        # peft records its config on the model it injected into; a merged DiT carries no adapter state.
        model.__dict__.pop("peft_config", None)
        if not isinstance(model, DiT):
            raise MethodError(f"lora: merged model is a {type(model).__name__}, not a DiT")
        return model

    def count(self, model: nn.Module) -> Accounting:
        groups = self._owned(model)
        return method_accounting(self, model, set(groups["adapter"]) | set(groups["reinit"]))
