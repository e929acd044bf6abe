"""KIND as a kindbench method: pre-train a decomposable, class-gated DiT; transfer, descend and domain-shift from it.

Stages (docs/methods.md §2.7-§2.8; our reading, the authors' code is not public):

* ``ancestry`` (integration and diversion): a stock DiT whose target Linears are SVD-decomposed into learngenes and
  tailors (``kind.layers``), gated by class (``kind.gate``), every component trained with the trainer's standard DiT
  loss; a tailor only receives gradient from the classes whose gate switches it on.
* ``transfer`` (novel classes): learngenes frozen, every pre-trained tailor on and trained, new class embeddings,
  final layer trained; no gate by default, so ``merge`` is exact for every class.
* ``domain`` (large shift): learngenes frozen plus fresh tailors (SVD components of a new random DiT).
* ``descend`` (resource-constrained deployment): learngenes plus a chosen number of tailors per matrix (lower
  rank), optionally fewer blocks, same width.

Registered variants (ablations, ``kind/README.md``): ``kind_nogate`` (pre-training without the gate) and
``kind_fulltransfer`` (the domain stage transfers the whole model instead of learngenes only).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from bench.models.accounting import forward_gmacs
from bench.models.dit import DiT, parse_flavour
from kind.config import KindConfig, KindFullTransferConfig, KindNoGateConfig
from kind.gate import build_gate_table
from kind.layers import (
    LEARNGENE,
    TAILOR,
    decompose_dit,
    gate_table,
    install_gate,
    kind_layers,
    merge_to_dit,
    tailor_mask_for,
)
from kind.recombine import (
    Layout,
    block_map,
    check_fits,
    component_bytes,
    infer_layout,
    map_components,
    model_layout,
    select_tailors,
)
from methods.accounting import method_accounting
from methods.base import STAGES, Accounting, ArchSpec, Export, Method, MethodError, Task
from methods.surgery import freeze_all, module_param_names, reinit_modules, resolve_modules
from methods.transfer import check_ancestry, load_into

#: Every KIND variant builds downstream models from any KIND-family ancestry.
KIND_FAMILY = ("kind", "kind_nogate", "kind_fulltransfer")


def _flavour(name: str):
    try:
        return parse_flavour(name)
    except ValueError as err:
        raise MethodError(str(err)) from None


class KindMethod(Method):
    """KIND: learngenes (class-agnostic components) and class-gated tailors in every decomposed DiT matrix."""

    family = "learngene"

    name = "kind"
    Config = KindConfig
    stages = frozenset(STAGES)
    ancestry_methods = KIND_FAMILY

    # ---- ancestry: integration and diversion ------------------------------------------------------------------

    def build_ancestry(self, arch: ArchSpec, num_classes: int, teacher: Export | None = None, *,
                       label_space: str | None = None) -> nn.Module:
        """The decomposable, class-gated DiT that the ancestry stage pre-trains (all components trainable)."""
        self.require_stage("ancestry")
        if teacher is not None:
            raise MethodError(f"{self.name} pre-trains its ancestry from the DiT initialisation, without a teacher")
        cfg = self.config
        model = arch.build(num_classes)
        n_learngenes, n_tailors = cfg.ancestry_ranks(model.hidden_size)
        decompose_dit(model, cfg.all_targets, n_learngenes, n_tailors, split_qkv=cfg.split_qkv)
        if cfg.gate != "none":
            has_null = model.y_embedder.embedding_table.num_embeddings > num_classes
            install_gate(model, self._gate_table(cfg.gate, num_classes, n_tailors, cfg.class_groups, has_null),
                         cfg.tailor_compute)
        model.kind_role = "ancestry"
        return model

    def _gate_table(self, policy: str, num_classes: int, n_tailors: int, class_groups: tuple[int, ...],
                    has_null: bool) -> torch.Tensor:
        cfg = self.config
        try:
            return build_gate_table(policy, num_classes, n_tailors, active=cfg.gate_active, seed=cfg.gate_seed,
                                    class_groups=class_groups, null=cfg.null_gate, null_row=has_null)
        except ValueError as err:
            raise MethodError(f"kind gate: {err}") from None

    # ---- downstream -------------------------------------------------------------------------------------------

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> nn.Module:
        cfg = self.config
        self.require_stage(task.stage)
        if task.stage == "ancestry":
            raise MethodError("use build_ancestry for the ancestry stage")
        ancestry = self._check_ancestry(ancestry, arch, task.stage)
        where = ancestry.path or "the ancestry"
        source = infer_layout(ancestry.state, where=where)
        self._check_ranks(source, task.stage)
        if "y_embedder" not in cfg.reinit and task.num_classes != ancestry.num_classes:
            raise MethodError(f"task {task.name!r} has {task.num_classes} classes but the ancestry has "
                              f"{ancestry.num_classes}; keep 'y_embedder' in kind's reinit for a new label space")
        blocks = self._blocks(arch, source, task.stage)
        n_tailors, selection, load_tailors = self._tailor_plan(ancestry, source, task.stage)
        fresh_tailors = task.stage == "domain" and cfg.domain_tailors == "fresh"

        model = arch.build(task.num_classes)
        if len(blocks) < len(model.blocks):
            model.blocks = nn.ModuleList(model.blocks[i] for i in range(len(blocks)))
            model.depth = len(blocks)
        decompose_dit(model, cfg.all_targets, source.n_learngenes, n_tailors, split_qkv=cfg.split_qkv,
                      svd_init=fresh_tailors)
        check_fits(source, model_layout(model), blocks, where)
        mapped = map_components(ancestry.state, blocks, tailors=load_tailors, selection=selection)
        load_into(model, mapped, skip=self._fresh_keys(model, task.stage))
        reinit_modules(model, cfg.reinit)
        if task.stage == "transfer" and cfg.transfer_gate == "classes":
            if cfg.gate == "none":
                raise MethodError("kind transfer_gate = 'classes' needs a gate policy (gate is 'none')")
            has_null = model.y_embedder.embedding_table.num_embeddings > task.num_classes
            install_gate(model, self._gate_table(cfg.gate, task.num_classes, n_tailors, (), has_null),
                         cfg.tailor_compute)
        model.kind_role = task.stage
        return model

    def _check_ancestry(self, ancestry: Export | None, arch: ArchSpec, stage: str) -> Export:
        if stage != "descend" or ancestry is None or ancestry.method not in self.ancestry_methods:
            return check_ancestry(self, ancestry, arch)
        # A deployed model may have another depth; everything else that shapes a weight must agree.
        ours, theirs = _flavour(arch.name), _flavour(ancestry.arch.name)
        if ours.hidden_size != theirs.hidden_size:
            raise MethodError(f"kind cannot descend from {ancestry.arch.name} (width {theirs.hidden_size}) to "
                              f"{arch.name} (width {ours.hidden_size}): learngenes and tailors are factors of "
                              f"{theirs.hidden_size}-wide matrices; only the depth (descend_depth) and the number of "
                              f"tailors (descend_tailors) can change")
        fields = ("input_size", "in_channels", "learn_sigma")
        differ = [f"{f}: ancestry {getattr(ancestry.arch, f)!r} vs requested {getattr(arch, f)!r}"
                  for f in fields if getattr(ancestry.arch, f) != getattr(arch, f)]
        if (ours.patch_size, ours.num_heads) != (theirs.patch_size, theirs.num_heads):
            differ.append(f"patch/heads: ancestry {theirs.patch_size}/{theirs.num_heads} vs requested "
                          f"{ours.patch_size}/{ours.num_heads}")
        if differ:
            raise MethodError(f"kind cannot descend from {ancestry.path or 'the ancestry'}: {'; '.join(differ)}")
        return ancestry

    def _check_ranks(self, source: Layout, stage: str) -> None:
        cfg = self.config
        if cfg.n_learngenes is not None and cfg.n_learngenes != source.n_learngenes:
            raise MethodError(f"kind n_learngenes = {cfg.n_learngenes} but the ancestry's learngenes have N_G = "
                              f"{source.n_learngenes}; learngenes are transferred whole (leave n_learngenes unset)")
        keeps_tailors = stage == "transfer" or (stage == "domain" and cfg.domain_tailors == "inherit")
        if keeps_tailors and cfg.n_tailors is not None and cfg.n_tailors != source.n_tailors:
            raise MethodError(f"kind n_tailors = {cfg.n_tailors} but the ancestry has N_T = {source.n_tailors}; stage "
                              f"{stage!r} transfers every tailor (use stage 'descend' to keep fewer)")
        needs_tailors = keeps_tailors or stage == "descend"
        if needs_tailors and source.n_tailors is None:
            raise MethodError(f"stage {stage!r} needs the ancestry's tailors, but it holds learngenes only; join it "
                              f"with its tailors file (kind.recombine.ancestry_from_components) or use stage 'domain'")

    def _blocks(self, arch: ArchSpec, source: Layout, stage: str) -> list[int]:
        depth = _flavour(arch.name).depth
        if stage == "descend":
            return block_map(source.depth, self.config.descend_depth or depth, self.config.descend_blocks)
        if depth != source.depth:
            raise MethodError(f"{arch.name} has {depth} blocks but the ancestry has {source.depth}")
        return list(range(depth))

    def _tailor_plan(self, ancestry: Export, source: Layout,
                     stage: str) -> tuple[int, dict[str, torch.Tensor] | None, bool]:
        """(N_T of the new model, per-leaf tailor selection or None for all, whether tailors are loaded)."""
        cfg = self.config
        if stage == "descend":
            count = source.n_tailors // 2 if cfg.descend_tailors is None else cfg.descend_tailors
            selection = select_tailors(ancestry.state, count, cfg.descend_select, cfg.descend_classes)
            return len(next(iter(selection.values()))), selection, True
        if stage == "domain" and cfg.domain_tailors == "fresh":
            # A learngenes file holds no tailors; its metadata still records the N_T they were trained with.
            kind_meta = ancestry.meta.get("kind") if isinstance(ancestry.meta, dict) else None
            recorded = kind_meta.get("layout", {}).get("n_tailors") if isinstance(kind_meta, dict) else None
            count = cfg.n_tailors or source.n_tailors or recorded
            if not count:
                raise MethodError(f"kind stage 'domain' with fresh tailors: {ancestry.path or 'the ancestry'} holds "
                                  f"learngenes only and records no N_T, so the number of fresh tailors is unknown; "
                                  f"set method.options.n_tailors")
            return count, None, False
        return source.n_tailors, None, True

    def _fresh_keys(self, model: nn.Module, stage: str) -> list[str]:
        """Model keys the ancestry does not provide: re-initialised modules, fresh tailors, fresh dense tensors."""
        cfg = self.config
        keys = list(cfg.reinit)
        if stage != "domain":
            return keys
        factors = {f"{path}.{name}": group for path, layer in kind_layers(model).items()
                   for group in (LEARNGENE, TAILOR) for name in layer.group_parameters(group)}
        if cfg.domain_tailors == "fresh":
            keys += [key for key, group in factors.items() if group == TAILOR]
        if cfg.domain_dense == "fresh":
            keys += [key for key in model.state_dict() if key not in factors]
        return keys

    # ---- training ---------------------------------------------------------------------------------------------

    def _factor_params(self, model: nn.Module, group: str) -> list[nn.Parameter]:
        return [p for layer in kind_layers(model).values() for p in layer.group_parameters(group).values()]

    def _groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameter groups this method trains for the model's role, each parameter in exactly one group."""
        role = getattr(model, "kind_role", None)
        if role is None:
            raise MethodError(f"{type(model).__name__} was not built by kind (no KIND role); use build/build_ancestry")
        cfg = self.config
        learngenes, tailors = self._factor_params(model, LEARNGENE), self._factor_params(model, TAILOR)
        factor_ids = {id(p) for p in learngenes + tailors}
        fixed = {id(model.pos_embed)}  # DiT's sin-cos position embedding is never trained
        dense = [p for p in model.parameters() if id(p) not in factor_ids and id(p) not in fixed]
        if role == "ancestry":
            return {"learngenes": learngenes, "tailors": tailors, "dense": dense}
        groups: dict[str, list[nn.Parameter]] = {"tailors": tailors}
        if cfg.train_learngene_sigma:
            groups["learngene_sigma"] = [layer.kind_learngene_sigma for layer in kind_layers(model).values()]
        taken = {id(p) for ps in groups.values() for p in ps}
        for label, names in (("reinit", cfg.reinit), ("trained", cfg.train_modules)):
            params = [p for module in resolve_modules(model, names).values() for p in module.parameters()]
            groups[label] = [p for p in params if id(p) not in taken]
            taken.update(id(p) for p in params)
        if cfg.train_dense:
            groups["dense"] = [p for p in dense if id(p) not in taken]
        return {label: params for label, params in groups.items() if params}

    def mark_trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = self._groups(model)
        freeze_all(model)
        for params in groups.values():
            for param in params:
                param.requires_grad_(True)
        return [{"name": label, "params": params, "lr_scale": 1.0} for label, params in groups.items()]

    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``ortho_reg`` x mean over decomposed matrices of ||U^T U - I||^2_F + ||V^T V - I||^2_F (0 by default)."""
        layers = list(kind_layers(model).values())
        device = next(model.parameters()).device
        if not self.config.ortho_reg or not layers:
            return torch.zeros((), device=device)
        if any(hasattr(p, "ds_id") for p in layers[0].parameters()):
            raise MethodError("kind ortho_reg > 0 reads whole factors outside the forward, which ZeRO-3 partitions; "
                              "use engine.zero_stage <= 2 with ortho_reg")
        total = torch.zeros((), device=device)
        for layer in layers:
            u, _, v = layer.factors()
            for factor in (u.float(), v.float()):
                gram = factor.T @ factor
                total = total + (gram - torch.eye(gram.shape[0], device=gram.device)).square().sum()
        return self.config.ortho_reg * total / len(layers)

    # ---- inference and accounting -------------------------------------------------------------------------------

    def merge(self, model: nn.Module, gate: int | str | torch.Tensor | None = None) -> DiT:
        """Fold the model into a plain DiT, in place. Ungated models (every downstream default) merge exactly for
        every class; a gated one needs ``gate``: a class id, ``'null'``, ``'all'``, ``'learngenes'`` or an (N_T,)
        {0, 1} tensor, and the result is exact for that gate only."""
        mask = tailor_mask_for(model, gate)
        merge_to_dit(model, mask)
        model.__dict__.pop("kind_role", None)
        if not isinstance(model, DiT):
            raise MethodError(f"kind: merged model is a {type(model).__name__}, not a DiT")
        return model

    def _new_param_names(self, model: nn.Module) -> set[str]:
        role = getattr(model, "kind_role", None)
        if role == "ancestry":
            return {name for name, _ in model.named_parameters()}
        new = module_param_names(model, self.config.reinit)
        if role == "domain":
            fresh = set(self._fresh_keys(model, "domain"))
            new |= {name for name, _ in model.named_parameters() if name in fresh}
        return new

    def sampling_model(self, model: nn.Module) -> nn.Module:
        """A gated model stays unmerged: a merge is exact for one gate only, while the unmerged model applies each
        sample's own gate row (the null label's row under classifier-free guidance), exactly what a model merged
        for that sample's class computes. An ungated model runs factorised where that costs fewer forward GMACs
        than the merged DiT (the ``paper`` preset downstream: 45.06 against 80.70 on DiT-L/2), merged otherwise
        (full rank: r(m + n) > mn)."""
        if gate_table(model) is not None:
            return model
        merged_gmacs = forward_gmacs(self.merge(copy.deepcopy(model)))
        return model if forward_gmacs(model) < merged_gmacs else self.merge(model)

    def count(self, model: nn.Module) -> Accounting:
        return method_accounting(self, model, self._new_param_names(model))

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """KIND's own numbers: learngene/tailor/dense parameters and bytes, N_G, N_T, and forward GMACs per image
        factorised (as trained, gate compute included), merged (dense DiT) and as sampled (``sampling_model``)."""
        info: dict[str, Any] = dict(component_bytes(model))
        layout = model_layout(model)
        info.update(n_learngenes=layout.n_learngenes, n_tailors=layout.n_tailors, depth=layout.depth,
                    gated=gate_table(model) is not None, gmacs_fwd_factorised=forward_gmacs(model))
        merged = self.merge(copy.deepcopy(model), gate=None if gate_table(model) is None else "all")
        info["gmacs_fwd_merged"] = forward_gmacs(merged)
        info["gmacs_fwd_sampled"] = self.count(model).gmacs_fwd_sampled
        return info


class KindNoGateMethod(KindMethod):
    """Ablation: KIND pre-trained without the class gate (every tailor sees every class)."""

    name = "kind_nogate"
    Config = KindNoGateConfig


class KindFullTransferMethod(KindMethod):
    """Ablation: KIND whose ``domain`` stage transfers the whole pre-trained model (learngenes and tailors)."""

    name = "kind_fulltransfer"
    Config = KindFullTransferConfig
