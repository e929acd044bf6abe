"""LiGO (Wang et al., "Learning to Grow Pretrained Models for Efficient Transformer Training", ICLR 2023,
arXiv 2303.00980; docs/methods.md §5.10): grow a small pre-trained DiT into a larger one with a learned linear
operator.

The operator is factorised as in the paper into width expansion and depth expansion:

* **width**: every weight becomes ``A_out W A_in^T`` (biases ``A_out b``), with one pair of expansion matrices per
  kind of dimension: the residual stream (shared by every layer, embedders and head, because the residual
  connections tie it), the attention inner dimension (q, k, v outputs and the output projection's input) and the
  MLP hidden dimension. Our simplification: the attention and MLP pairs are shared by all layers too (the paper
  may give each layer its own; per-layer pairs would multiply the operator's size by the depth).
* **depth**: each grown layer's tensor of each module kind (qkv, proj, fc1, fc2, adaLN) is a learned linear
  combination of the width-grown source layers of that kind (an ``L' x L`` matrix per kind).

Stages, expressed with the plan's teacher mechanism (``[ancestries.grown] method = "ligo", teacher = "small"``):

* ``ancestry`` (the operator phase): ``build_ancestry(arch, n, teacher=small dense DiT)`` returns a ``GrownDiT``
  of ``arch`` whose weights are the operator applied to the frozen small model; only the operator trains, on the
  ancestry run's data and loss (LiGO trains it on the pre-training objective for a few hundred steps: set the
  ancestry run's ``schedule.steps`` accordingly). Without a teacher the source is a freshly initialised DiT of
  ``arch`` itself (identity growth; what the contract test exercises).
* ``transfer`` / ``descend`` / ``domain``: the exported grown model is materialised into a plain DiT of the same
  ``arch`` and trained in full.

Operator init (ours; the paper learns from an init it describes only loosely): width matrices duplicate source
units (Net2Net: the first units copied in order, the extra ones drawn at random, whole heads for attention; the
input side divides by the copy counts, so a grown Linear reads duplicated inputs exactly once); depth matrices
are one-hot, ``stack`` (grown layer l' = source layer l' mod L, StackBERT) or ``repeat`` (l' -> floor(l' L / L')).
The grown (frozen) position embedding is the width-expanded source one, not the sin-cos table of the wider DiT.
With the same depth and an integer width multiple the growth is exactly function-preserving at init (tested);
otherwise the extra layers and unevenly duplicated channels (LayerNorm statistics) change the function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from baselines.common import DenseMethod
from baselines.size_transfer import refuse_partitioned
from bench.models.dit import DiT, parse_flavour
from methods.base import ArchSpec, Export, MethodConfig, MethodError, Task
from methods.surgery import check_reinit_names, freeze_all, module_param_names, reinit_modules
from methods.transfer import DENSE_METHODS, load_into

DEPTH_INITS = ("stack", "repeat")
#: Block module kinds, each with its own depth-combination matrix.
KINDS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "adaLN": "adaLN_modulation.1"}
SIZE_KEY = "ligo_source_size"


def duplication(source: int, target: int, unit: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Net2Net-style expansion of ``source`` units to ``target`` (in groups of ``unit``): the out-matrix copies
    unit i to i for the first ones and cycles through a random permutation of the units for the rest (so an
    integer multiple copies every unit equally often, which leaves LayerNorm statistics unchanged); the in-matrix
    is it divided by the copy counts, so ``in^T @ out`` is the identity."""
    if target < source or source % unit or target % unit:
        raise MethodError(f"cannot grow {source} units to {target} in groups of {unit}")
    units, extra = source // unit, (target - source) // unit
    cycle = torch.randperm(units).repeat(extra // units + 1)[:extra]
    groups = torch.cat([torch.arange(units), cycle])
    index = (groups[:, None] * unit + torch.arange(unit)).flatten()
    out = torch.zeros(target, source)
    out[torch.arange(target), index] = 1.0
    return out, out / out.sum(0, keepdim=True)


def depth_combination(source: int, target: int, rule: str) -> torch.Tensor:
    """One-hot ``target x source`` layer map: ``stack`` (l' mod L) or ``repeat`` (floor(l' L / L'))."""
    if target < source:
        raise MethodError(f"LiGO grows: the grown model has {target} layers, fewer than the source's {source}")
    if rule not in DEPTH_INITS:
        raise MethodError(f"unknown depth init {rule!r}; valid: {DEPTH_INITS}")
    layers = torch.arange(target)
    picks = layers % source if rule == "stack" else layers * source // target
    return nn.functional.one_hot(picks, source).float()


def block_diagonal(matrix: torch.Tensor, copies: int) -> torch.Tensor:
    return torch.block_diag(*[matrix] * copies)


class GrowthOperator(nn.Module):
    """The trainable LiGO operator: width expansion pairs and per-kind depth combinations."""

    def __init__(self, width: tuple[int, int], hidden: tuple[int, int], head_size: int, depth: tuple[int, int],
                 depth_init: str):
        super().__init__()
        pairs = {"embed": duplication(*width), "attn": duplication(*width, unit=head_size),
                 "mlp": duplication(*hidden)}
        for name, (out, inp) in pairs.items():
            setattr(self, f"{name}_out", nn.Parameter(out))
            setattr(self, f"{name}_in", nn.Parameter(inp))
        self.depth = nn.ParameterDict({kind: nn.Parameter(depth_combination(*depth, depth_init)) for kind in KINDS})

    def expansions(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(out-expansion, in-expansion) of a block module kind."""
        e_out, e_in = self.embed_out, self.embed_in
        return {"qkv": (block_diagonal(self.attn_out, 3), e_in), "proj": (e_out, self.attn_in),
                "fc1": (self.mlp_out, e_in), "fc2": (e_out, self.mlp_in),
                "adaLN": (block_diagonal(e_out, 6), e_in)}[kind]


class GrownDiT(nn.Module):
    """A DiT of ``arch`` whose parameters are ``GrowthOperator`` applied to a frozen source DiT (``ligo_source``).

    Called like a DiT; ``grown_state`` is the state dict of the plain DiT it computes (``merge`` loads it)."""

    def __init__(self, source: DiT, arch: ArchSpec, num_classes: int, depth_init: str):
        super().__init__()
        target = parse_flavour(arch.name)
        if (source.hidden_size // source.num_heads) != target.hidden_size // target.num_heads \
                or source.patch_size != target.patch_size:
            raise MethodError("LiGO grows width by whole heads: source and grown model need the same head size "
                              "and patch size")
        self.arch_spec, self.num_classes = arch, num_classes
        self.input_size, self.in_channels = arch.input_size, arch.in_channels
        self.ligo_source = source.requires_grad_(False)
        self.register_buffer(SIZE_KEY, torch.tensor([source.depth, source.hidden_size]))
        hidden = source.blocks[0].mlp.fc1.out_features
        self.ligo_operator = GrowthOperator(
            (source.hidden_size, target.hidden_size), (hidden, hidden * target.hidden_size // source.hidden_size),
            target.hidden_size // target.num_heads, (source.depth, target.depth), depth_init)
        self._template = [arch.build(num_classes, device="meta")]  # structure only; not a submodule

    def grown_state(self) -> dict[str, torch.Tensor]:
        """Every parameter of the grown DiT, computed from the source and the operator (differentiable)."""
        op, src = self.ligo_operator, dict(self.ligo_source.named_parameters())
        e_out, e_in = op.embed_out, op.embed_in
        final_out = block_diagonal(e_out, 2)
        state = {
            # Grown like any residual-stream tensor (so growth preserves the function); it stays frozen later.
            "pos_embed": src["pos_embed"] @ e_out.T,
            "x_embedder.proj.weight": torch.einsum("oi,ichw->ochw", e_out, src["x_embedder.proj.weight"]),
            "x_embedder.proj.bias": e_out @ src["x_embedder.proj.bias"],
            "t_embedder.mlp.0.weight": e_out @ src["t_embedder.mlp.0.weight"],
            "t_embedder.mlp.0.bias": e_out @ src["t_embedder.mlp.0.bias"],
            "t_embedder.mlp.2.weight": e_out @ src["t_embedder.mlp.2.weight"] @ e_in.T,
            "t_embedder.mlp.2.bias": e_out @ src["t_embedder.mlp.2.bias"],
            "y_embedder.embedding_table.weight": src["y_embedder.embedding_table.weight"] @ e_out.T,
            "final_layer.adaLN_modulation.1.weight": final_out @ src["final_layer.adaLN_modulation.1.weight"] @ e_in.T,
            "final_layer.adaLN_modulation.1.bias": final_out @ src["final_layer.adaLN_modulation.1.bias"],
            "final_layer.linear.weight": src["final_layer.linear.weight"] @ e_in.T,
            "final_layer.linear.bias": src["final_layer.linear.bias"],
        }
        depth = self.ligo_source.depth
        for kind, module in KINDS.items():
            out, inp = op.expansions(kind)
            weights = torch.stack([src[f"blocks.{i}.{module}.weight"] for i in range(depth)])
            biases = torch.stack([src[f"blocks.{i}.{module}.bias"] for i in range(depth)])
            grown_w = torch.einsum("ml,loi->moi", op.depth[kind], out @ weights @ inp.T)
            grown_b = op.depth[kind] @ (biases @ out.T)
            for layer in range(grown_w.shape[0]):
                state[f"blocks.{layer}.{module}.weight"] = grown_w[layer]
                state[f"blocks.{layer}.{module}.bias"] = grown_b[layer]
        return state

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        refuse_partitioned(self, "LiGO's operator-phase model")
        template = self._template[0]
        template.train(self.training)  # label dropout follows this module's mode
        return functional_call(template, self.grown_state(), (x, t, y, force_drop_ids))

    @torch.no_grad()
    def materialise(self) -> DiT:
        """The plain DiT this module computes, on its device and dtype."""
        reference = self.ligo_operator.embed_out
        model = self.arch_spec.build(self.num_classes, device=reference.device).to(reference.dtype)
        load_into(model, self.grown_state())
        return model.train(self.training)


@dataclass
class LigoConfig(MethodConfig):
    """LiGO's options (our choices where the paper is silent: see the module docstring and baselines/README.md)."""

    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules of the grown DiT re-initialised for the task rather than inherited (``y_embedder`` for a new label
    space; optionally ``final_layer``)."""
    depth_init: str = "stack"
    """Initial depth operator: ``stack`` (grown layer l' starts as source layer l' mod L) or ``repeat``
    (floor(l' L / L'), each source layer repeated in place)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets:
            raise MethodError("LiGO grows every parameter: 'targets' does not apply")
        check_reinit_names(self.reinit)
        if self.depth_init not in DEPTH_INITS:
            raise MethodError(f"depth_init must be one of {DEPTH_INITS}, got {self.depth_init!r}")


class LigoMethod(DenseMethod):
    """LiGO: learn a growth operator from a small dense DiT (ancestry stage), then train the grown DiT in full."""

    family = "init"

    name = "ligo"
    Config = LigoConfig
    stages = frozenset({"ancestry", "transfer", "descend", "domain"})
    ancestry_methods = ("ligo",)
    teacher_methods = DENSE_METHODS

    def build_ancestry(self, arch: ArchSpec, num_classes: int, teacher: Export | None = None, *,
                       label_space: str | None = None) -> GrownDiT:
        """The operator phase: a ``GrownDiT`` of ``arch`` grown from ``teacher`` (the small dense DiT)."""
        self.require_stage("ancestry")
        if teacher is None:
            source = arch.build(num_classes)
        else:
            if teacher.method not in self.teacher_methods:
                raise MethodError(f"ligo grows a dense DiT (ancestry of {self.teacher_methods}); got one of method "
                                  f"{teacher.method!r}")
            fields = ("input_size", "in_channels", "learn_sigma")
            if any(getattr(teacher.arch, f) != getattr(arch, f) for f in fields) or teacher.num_classes != num_classes:
                raise MethodError(f"ligo: the source {teacher.arch} ({teacher.num_classes} classes) and the grown "
                                  f"{arch} ({num_classes} classes) need the same input geometry and label space")
            source = teacher.arch.build(teacher.num_classes)
            load_into(source, teacher.state)
        model = GrownDiT(source, arch, num_classes, self.config.depth_init)
        return model

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        """The grown DiT of a ``ligo`` ancestry (operator already trained), materialised and trained in full."""
        self.require_stage(task.stage)
        if ancestry is None:
            raise MethodError(f"method 'ligo' needs an ancestry exported by one of {self.ancestry_methods}; got none")
        if ancestry.method not in self.ancestry_methods:
            raise MethodError(f"method 'ligo' cannot build from an ancestry of method {ancestry.method!r}: grow it "
                              f"first in a ligo ancestry run whose teacher is that model")
        if _shape(ancestry.arch) != _shape(arch):
            raise MethodError(f"ligo grows in its ancestry stage: the ancestry is a {ancestry.arch.name} but the task "
                              f"asks for {arch.name}; grow a ligo ancestry of the task's size")
        if "y_embedder" not in self.config.reinit and task.num_classes != ancestry.num_classes:
            raise MethodError(f"task {task.name!r} has {task.num_classes} classes but the ancestry has "
                              f"{ancestry.num_classes}; add 'y_embedder' to ligo's reinit")
        if SIZE_KEY not in ancestry.state:
            raise MethodError(f"the ancestry has no {SIZE_KEY!r}: not an exported LiGO grown model")
        depth, width = (int(v) for v in ancestry.state[SIZE_KEY])
        grown = GrownDiT(_source_shell(ancestry.arch, depth, width, ancestry.num_classes), ancestry.arch,
                         ancestry.num_classes, self.config.depth_init)
        load_into(grown, ancestry.state)
        model = arch.build(task.num_classes)
        load_into(model, grown.materialise().state_dict(), skip=self.config.reinit)
        reinit_modules(model, self.config.reinit)
        return model

    def mark_trainable(self, model: nn.Module) -> list[dict]:
        if isinstance(model, GrownDiT):  # operator phase: the source stays frozen, only the operator learns
            freeze_all(model)
            params = list(model.ligo_operator.parameters())
            for param in params:
                param.requires_grad_(True)
            return [{"name": "ligo_operator", "params": params, "lr_scale": 1.0}]
        return super().mark_trainable(model)

    def merge(self, model: nn.Module) -> DiT:
        if isinstance(model, GrownDiT):
            return model.materialise()
        return super().merge(model)

    def new_param_names(self, model: nn.Module) -> set[str]:
        if isinstance(model, GrownDiT):  # the operator is new; the source comes from the teacher ancestry
            return {f"ligo_operator.{n}" for n, _ in model.ligo_operator.named_parameters()}
        return module_param_names(model, self.config.reinit)


def _shape(arch: ArchSpec) -> tuple:
    """What fixes a DiT's tensor shapes (label dropout only adds the null row, present in every kindbench DiT)."""
    return parse_flavour(arch.name), arch.input_size, arch.in_channels, arch.learn_sigma


def _source_shell(arch: ArchSpec, depth: int, width: int, num_classes: int) -> DiT:
    """A DiT with the source's shape (its weights are loaded from the ancestry), same head size as ``arch``."""
    target = parse_flavour(arch.name)
    head_size = target.hidden_size // target.num_heads
    return DiT(input_size=arch.input_size, patch_size=target.patch_size, in_channels=arch.in_channels,
               hidden_size=width, depth=depth, num_heads=width // head_size,
               class_dropout_prob=arch.class_dropout_prob, num_classes=num_classes, learn_sigma=arch.learn_sigma,
               gelu=arch.gelu)
