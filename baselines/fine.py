"""FINE (Xie et al., CVPR 2026, arXiv 2409.19289): factorised knowledge for variable-sized diffusion models.

Every block matrix of type q/k/v, o, MLP-in, MLP-out and adaLN is ``U_type diag(σ^(l)_type) V_typeᵀ``: the
factors U, V (the learngene) are shared by all blocks and size-agnostic, σ is per block (``baselines/fine_layers.py``).

Stages and the two phases of a descendant (docs/methods.md §3.2, §3.3):

* ``ancestry``: a factorised DiT, initialised from DiT's own random init by SVD (shared bases of the stacked block
  weights, ``fine_layers.shared_bases``), every tensor pre-trained jointly ("reverse" factorisation).
* ``transfer`` / ``descend`` with ``train = "sigma"`` (phase 1): a factorised DiT of the task's depth. U, V, the
  block biases, the embedders and the final layer come from the ancestry and stay frozen; the per-block σ (and the
  re-initialised class table of a new label space) are trained, on a small data subset for a few hundred steps.
* the same with ``train = "all"`` (phase 2): the weights ``U diag(σ) Vᵀ`` materialised into a stock dense DiT and
  every tensor trained without the factorisation constraint. Built from a phase-1 export of the same task it
  continues that run (nothing re-initialised, σ as trained); built straight from a FINE ancestry it uses the
  ``sigma_init`` rule instead of trained σ (the rule-based rows of FINE's Table 5).

A suite chains the phases as two runs: phase 1 (``train = "sigma"``, fewer images per class, ~300 steps), either a
downstream run or an ancestry run of ``fine`` whose ``teacher`` is the FINE ancestry (``build_ancestry``), and
phase 2 (``train = "all"``) whose ancestry is phase 1's ``export.safetensors`` (``is_phase_one_export``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from baselines.common import fixed_dit_params
from baselines.fine_depth import check_depth_compatible, interpolate_layers, split_blocks
from baselines.fine_layers import (
    BLOCK_TYPES,
    SharedFactorLinear,
    factor_names,
    factorise,
    install_factors,
    materialise,
)
from bench.models.dit import DiT, parse_flavour
from methods.accounting import method_accounting
from methods.base import Accounting, ArchSpec, Export, Method, MethodConfig, MethodError, Task
from methods.surgery import check_reinit_names, freeze_all, module_param_names, reinit_modules
from methods.transfer import load_into

TRAIN_MODES = ("sigma", "all")
SIGMA_INITS = ("random", "identical", "interpolate", "copy")
CLASS_TABLES = ("auto", "inherit", "redraw")
_DOWNSTREAM = ("transfer", "descend", "domain")


@dataclass
class FineConfig(MethodConfig):
    """FINE's options. ``targets`` and ``rank`` shape the factorised ancestry; the rest shape a descendant."""

    targets: tuple[str, ...] = BLOCK_TYPES
    """Block matrix types factorised with shared U, V (FINE: all five). Only the ancestry stage uses it: a descendant
    factorises exactly what its ancestry factorised."""
    class_table: str = "auto"
    """The class embeddings of a descendant: ``auto`` keeps the ancestry's table when the task's label space is the
    ancestry's (``Task.label_space`` equal to the export's recorded one, as in FINE's ImageNet-1K depth protocol)
    and draws a new one otherwise (or when either is unknown); ``inherit`` always keeps it (same class count
    required); ``redraw`` always draws a new one. A drawn table is trained in phase 1 next to σ. Ignored when
    continuing from a phase-1 export of the same task."""
    reinit: tuple[str, ...] = ()
    """Other modules re-initialised in a descendant (and trained in phase 1 next to σ); the class table is
    ``class_table``'s. Ignored when continuing from a phase-1 export of the same task."""
    rank: int = 0
    """Rank r of the shared factors; 0 means r = d, the hidden size (ours, docs/methods.md §3.3; the paper is
    silent). Only the ancestry stage uses it: a descendant takes the rank of its ancestry's factors."""
    train: str = "sigma"
    """``sigma``: phase 1, factorised model, only σ (and ``reinit`` modules) trained. ``all``: phase 2, the
    materialised dense DiT trained in full (see the module docstring)."""
    sigma_init: str = "random"
    """σ of a descendant, at any depth: ``random`` (the paper's phase 1 starts from random σ; we draw each component
    from a normal with that component's mean and std over the ancestry's blocks, so the scale is the ancestry's),
    ``identical`` (the mean over blocks, for every block), ``interpolate`` (linear over relative depth; FINE's
    Table 5 "linear" rule), or ``copy`` (the ancestry's own σ at equal depth, interpolated at another depth: our
    addition, for same-size transfer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets:
            raise MethodError("fine needs at least one target matrix type")
        unknown = [t for t in self.targets if t not in BLOCK_TYPES]
        if unknown or len(set(self.targets)) != len(self.targets):
            raise MethodError(f"fine targets must be distinct block matrix types of {BLOCK_TYPES}; got {self.targets}")
        check_reinit_names(self.reinit)
        if "y_embedder" in self.reinit:
            raise MethodError("fine re-draws the class table through class_table = \"redraw\", not reinit")
        if self.class_table not in CLASS_TABLES:
            raise MethodError(f"fine class_table must be one of {CLASS_TABLES}; got {self.class_table!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise MethodError(f"fine rank must be a non-negative int (0 = hidden size); got {self.rank!r}")
        if self.train not in TRAIN_MODES:
            raise MethodError(f"fine train must be one of {TRAIN_MODES}; got {self.train!r}")
        if self.sigma_init not in SIGMA_INITS:
            raise MethodError(f"fine sigma_init must be one of {SIGMA_INITS}; got {self.sigma_init!r}")


def is_phase_one_export(ancestry: Export) -> bool:
    """True for the export of a phase-1 run (``train = "sigma"``): a downstream ``fine`` run, or an ancestry-stage
    ``fine`` run built from a teacher; false for FINE's pre-trained ancestry (an ancestry run without teacher)."""
    meta = ancestry.meta
    if (meta.get("method_options") or {}).get("train") != "sigma":
        return False
    return meta.get("stage") in _DOWNSTREAM or (meta.get("stage") == "ancestry" and bool(meta.get("ancestry")))


def _mark(model: nn.Module, phase: str, new: set[str], trained_modules: tuple[str, ...]) -> None:
    # Plain attributes on the DiT instance (survive deepcopy, absent from state_dict): what mark_trainable and
    # count need to know about how the model was built.
    model.fine_phase = phase
    model.fine_new_params = frozenset(new)
    model.fine_trained_modules = tuple(trained_modules)


class FineMethod(Method):
    """FINE: shared-factor learngene (U, V) pre-trained once; descendants of any depth get their own σ."""

    family = "learngene"

    name = "fine"
    Config = FineConfig
    stages = frozenset({"ancestry", "transfer", "descend"})
    ancestry_methods = ("fine",)
    teacher_methods = ("fine",)

    # ---- building -------------------------------------------------------------------------------------------

    def build_ancestry(self, arch: ArchSpec, num_classes: int, teacher: Export | None = None, *,
                       label_space: str | None = None) -> DiT:
        """Without ``teacher``: FINE's factorised DiT, to pre-train. With a ``fine`` ``teacher``: phase 1 of a
        descendant of ``arch`` (as ``build`` with ``train = "sigma"``), so a suite can run phase 1 as an ancestry
        job (``teacher`` = the pre-trained FINE ancestry, ``arch`` = the target size) and phase 2 as the
        ``[[methods]]`` entry built on it."""
        if teacher is not None:
            self.require_stage("ancestry")
            if self.config.train != "sigma":
                raise MethodError("a fine ancestry with a teacher is FINE's phase 1: it needs train = \"sigma\"")
            return self.build(arch, Task("fine-phase-1", num_classes, "descend", label_space), teacher)
        model = super().build_ancestry(arch, num_classes)  # DiT's init: the weights the SVD starts from
        factorise(model, self.config.targets, self.config.rank)
        _mark(model, "ancestry", {n for n, _ in model.named_parameters()}, ())
        return model

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        self.require_stage(task.stage)
        ancestry = check_depth_compatible(self, ancestry, arch)
        per_block, rest, old_depth = split_blocks(ancestry.state)
        targets = [t for t in BLOCK_TYPES if factor_names(t)[0] in rest]
        if not targets:
            raise MethodError(f"fine: ancestry {ancestry.path or '(in memory)'} holds no shared factors (an export "
                              f"of a 'train = \"all\"' run is a dense DiT: fine-tune it with 'full')")
        new_depth = parse_flavour(arch.name).depth
        continuing = is_phase_one_export(ancestry)
        if continuing and (new_depth != old_depth or task.num_classes != ancestry.num_classes):
            raise MethodError(f"fine: ancestry {ancestry.path or '(in memory)'} is a phase-1 (sigma) export; phase 2 "
                              f"continues it at the same depth and classes ({old_depth} blocks, "
                              f"{ancestry.num_classes} classes), got {new_depth} blocks and "
                              f"{task.num_classes} classes")
        reinit = () if continuing else self.config.reinit + (("y_embedder",) if self._redraws_classes(task, ancestry)
                                                             else ())
        if "y_embedder" not in reinit and task.num_classes != ancestry.num_classes:
            raise MethodError(f"task {task.name!r} has {task.num_classes} classes but the ancestry has "
                              f"{ancestry.num_classes}; a new label space needs class_table = \"auto\" or "
                              f"\"redraw\"")

        # σ as trained when continuing phase 1; otherwise by the sigma_init rule
        rule = "copy" if continuing else self.config.sigma_init
        block_state = self._descendant_blocks(per_block, targets, new_depth, rule)
        model = arch.build(task.num_classes)
        for target in targets:
            u_name, v_name = factor_names(target)
            install_factors(model, target, rest[u_name], rest[v_name],
                            [block_state[f"blocks.{i}.{target}.sigma"] for i in range(new_depth)],
                            [block_state.get(f"blocks.{i}.{target}.bias") for i in range(new_depth)])
        load_into(model, {**rest, **block_state}, skip=reinit)  # every key and shape checked
        reinit_modules(model, reinit)

        new = module_param_names(model, reinit)
        if rule != "copy" and self.config.train == "sigma":  # drawn by a rule, not taken from the ancestry
            new |= {n for n, _ in model.named_parameters() if n.endswith(".sigma")}
        if self.config.train == "all":
            materialise(model)  # the dense weights are functions of inherited U, V: they count as inherited
        _mark(model, self.config.train, new, reinit)
        return model

    def _redraws_classes(self, task: Task, ancestry: Export) -> bool:
        """Whether the descendant draws a new class table (``class_table``)."""
        rule = self.config.class_table
        if rule != "auto":
            return rule == "redraw"
        recorded = ancestry.meta.get("label_space") if isinstance(ancestry.meta, dict) else None
        same = bool(task.label_space) and task.label_space == recorded and task.num_classes == ancestry.num_classes
        return not same

    def _descendant_blocks(self, per_block: dict[str, list[torch.Tensor]], targets: list[str],
                           new_depth: int, rule: str) -> dict[str, torch.Tensor]:
        """Per-block tensors of the descendant: σ by ``rule`` (a ``sigma_init`` value), the rest (biases, and any block
        matrix FINE does not factorise) linearly interpolated over relative depth (copied at equal depth)."""
        sigma_keys = {f"{t}.sigma" for t in targets}
        out: dict[str, torch.Tensor] = {}
        for name, layers in per_block.items():
            if name in sigma_keys and rule != "copy":
                values = self._init_sigma(layers, new_depth, rule)
            else:
                values = interpolate_layers(layers, new_depth)
            out.update({f"blocks.{i}.{name}": value for i, value in enumerate(values)})
        return out

    def _init_sigma(self, layers: list[torch.Tensor], new_depth: int, rule: str) -> list[torch.Tensor]:
        if rule == "interpolate":
            return interpolate_layers(layers, new_depth)
        stack = torch.stack(layers).float()
        mean = stack.mean(dim=0)
        if rule == "identical":
            return [mean.to(layers[0].dtype).clone() for _ in range(new_depth)]
        std = stack.std(dim=0, unbiased=False)
        return [(mean + std * torch.randn_like(mean)).to(layers[0].dtype) for _ in range(new_depth)]

    # ---- training -------------------------------------------------------------------------------------------

    def mark_trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        phase = self._phase(model)
        freeze_all(model)
        sigmas = [m.sigma for m in model.modules() if isinstance(m, SharedFactorLinear)]
        if phase == "sigma":
            groups = {"sigma": sigmas,
                      "reinit": [p for name in model.fine_trained_modules
                                 for p in model.get_submodule(name).parameters()]}
        else:
            fixed = fixed_dit_params(model)
            factor_ids = {id(p) for p in sigmas} | {id(getattr(model, n)) for t in BLOCK_TYPES
                                                    for n in factor_names(t) if hasattr(model, n)}
            learngene = [getattr(model, n) for t in BLOCK_TYPES for n in factor_names(t) if hasattr(model, n)]
            groups = {"learngene": learngene, "sigma": sigmas,
                      "dense": [p for p in model.parameters() if id(p) not in factor_ids and id(p) not in fixed]}
        out = []
        for name, params in groups.items():
            for param in params:
                param.requires_grad_(True)
            if params:
                out.append({"name": name, "params": params, "lr_scale": 1.0})
        return out

    @staticmethod
    def _phase(model: nn.Module) -> str:
        phase = getattr(model, "fine_phase", None)
        if phase not in ("ancestry", *TRAIN_MODES):
            raise MethodError(f"fine: this {type(model).__name__} was not built by the fine method")
        return phase

    # ---- inference ------------------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> DiT:
        """Materialise ``U diag(σ) Vᵀ`` into plain Linears (a phase-2 model is already a plain DiT)."""
        self._phase(model)
        if not isinstance(model, DiT):
            raise MethodError(f"fine: expected a DiT to merge, got {type(model).__name__}")
        return materialise(model)

    def count(self, model: nn.Module) -> Accounting:
        self._phase(model)
        return method_accounting(self, model, model.fine_new_params)
