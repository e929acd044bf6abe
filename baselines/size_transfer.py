"""Shared machinery of the learngene size-transfer baselines that pre-train a weight-generating auxiliary DiT
(TLEG, SWS; docs/methods.md §5.6-§5.8).

Both methods replace the auxiliary DiT's ``blocks`` by a ``GeneratedBlocks`` module: a small bank of block
parameters plus a rule that says which block weights layer ``l`` of a depth-``L`` model gets (TLEG: a linear
function of ``l``; SWS: the weights of ``l``'s stage). The same rule, asked for another depth, initialises a
descendant of any depth: ``expand_blocks`` writes it out as stock ``DiTBlock``\\ s, after which the descendant is a
plain DiT trained without the constraint.

The auxiliary model is trained by distilling a pre-trained dense DiT (the ``teacher`` of ``build_ancestry``):
``DistillationTeacher`` keeps that frozen DiT on the method object, never inside the trained model, so it is
neither trained, EMA-averaged nor exported.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from baselines.common import DenseMethod
from bench.models.dit import DiT, DiTBlock, parse_flavour
from methods.base import ArchSpec, Export, MethodConfig, MethodError, Task
from methods.surgery import check_reinit_names, module_param_names, reinit_modules
from methods.transfer import DENSE_METHODS, load_into

# --------------------------------------------------------------------------------------------------------------
#                                   The auxiliary model's generated blocks
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def dit_block_init(block: DiTBlock) -> DiTBlock:
    """DiT's initialisation of one block: Xavier-uniform Linears with zero bias, zeroed adaLN modulation."""
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.zeros_(block.adaLN_modulation[-1].weight)
    nn.init.zeros_(block.adaLN_modulation[-1].bias)
    return block


class GeneratedBlocks(nn.Module, abc.ABC):
    """Stands in for ``DiT.blocks``: iterating it yields ``depth`` callables ``(x, c) -> x``, one per layer, whose
    weights come from a shared parameter bank through ``layer_params``.

    ``DiT.forward`` only iterates ``self.blocks``, so the stock model runs unchanged around it.
    """

    def __init__(self, template: DiTBlock, depth: int):
        super().__init__()
        if depth < 1:
            raise MethodError(f"an auxiliary model needs at least one layer, got depth {depth}")
        self.depth = depth
        # A weightless copy of the block structure; descendants are expanded from it.
        self._template = [copy.deepcopy(template).to("meta")]  # a list: not a submodule, not in the state dict

    @abc.abstractmethod
    def layer_params(self, layer: int, depth: int) -> dict[str, torch.Tensor]:
        """The parameters of layer ``layer`` of a ``depth``-layer model, by ``DiTBlock`` parameter name."""

    @abc.abstractmethod
    def run_layer(self, layer: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Layer ``layer`` of this auxiliary model applied to tokens ``x`` under conditioning ``c``."""

    def __len__(self) -> int:
        return self.depth

    def __iter__(self) -> Iterator[Any]:
        for layer in range(self.depth):
            yield _Layer(self, layer)

    def forward(self, x: torch.Tensor, c: torch.Tensor, layer: int) -> torch.Tensor:
        return self.run_layer(layer, x, c)

    @torch.no_grad()
    def expand(self, depth: int) -> nn.ModuleList:
        """``depth`` stock ``DiTBlock``\\ s holding the generated weights: a descendant's blocks, or (at the auxiliary
        model's own depth) the exact dense equivalent of this module."""
        reference = next(self.parameters())
        blocks = []
        for layer in range(depth):
            block = copy.deepcopy(self._template[0]).to_empty(device=reference.device).to(reference.dtype)
            params = self.layer_params(layer, depth)
            for name, param in block.named_parameters():
                param.copy_(params[name])
            blocks.append(block)
        return nn.ModuleList(blocks)


def refuse_partitioned(module: nn.Module, what: str) -> None:
    """A one-line error instead of a deep DeepSpeed one: ``what`` reads tensors outside the forward of the module
    that owns them, which ZeRO-3's partitioned parameters (marked ``ds_status``) do not allow."""
    if hasattr(next(module.parameters()), "ds_status"):
        raise MethodError(f"{what} cannot run with DeepSpeed ZeRO-3 (partitioned parameters); set "
                          f"engine.zero_stage = 2 or lower for this run")


class _Layer:
    """One layer of a ``GeneratedBlocks``, callable as ``DiT.forward`` calls a block (through the module's
    ``__call__``, so module hooks still fire)."""

    def __init__(self, blocks: GeneratedBlocks, layer: int):
        self.blocks, self.layer = blocks, layer

    def __call__(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.blocks(x, c, layer=self.layer)


def generated_blocks(model: nn.Module) -> GeneratedBlocks | None:
    """The ``GeneratedBlocks`` of an auxiliary model, or None for a plain DiT."""
    blocks = getattr(model, "blocks", None)
    return blocks if isinstance(blocks, GeneratedBlocks) else None


def expand_to_dit(model: DiT, depth: int | None = None) -> DiT:
    """Replace an auxiliary model's generated blocks by ``depth`` stock blocks (default: its own depth), in place."""
    blocks = generated_blocks(model)
    if blocks is None:
        raise MethodError(f"expected an auxiliary model with generated blocks, got {type(model.blocks).__name__}")
    depth = blocks.depth if depth is None else depth
    model.blocks = blocks.expand(depth)
    model.depth = depth
    return model


# --------------------------------------------------------------------------------------------------------------
#                                        Distillation from a dense teacher
# --------------------------------------------------------------------------------------------------------------


class DistillationTeacher:
    """A frozen pre-trained dense DiT and the ε-distillation term: MSE between the student's and the teacher's
    noise predictions (the first ``in_channels`` output channels) on the same noised inputs and labels."""

    def __init__(self, ancestry: Export, arch: ArchSpec, num_classes: int):
        for field in ("input_size", "in_channels"):
            if getattr(ancestry.arch, field) != getattr(arch, field):
                raise MethodError(f"the teacher ({ancestry.path or 'in memory'}) has {field} "
                                  f"{getattr(ancestry.arch, field)} but the auxiliary model {getattr(arch, field)}")
        if ancestry.num_classes != num_classes:
            raise MethodError(f"the teacher was trained on {ancestry.num_classes} classes but the auxiliary model has "
                              f"{num_classes}: distillation needs the same label space")
        self.model = ancestry.arch.build(ancestry.num_classes)
        load_into(self.model, ancestry.state)
        self.model.eval().requires_grad_(False)
        self.in_channels = arch.in_channels

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x_t = batch["x_t"]
        # Moved lazily: the teacher is built on the CPU before the engine places the student (and takes the
        # inputs' dtype, so a student run in bf16 without autocast feeds it matching tensors).
        reference = next(self.model.parameters())
        if (reference.device, reference.dtype) != (x_t.device, x_t.dtype):
            self.model.to(device=x_t.device, dtype=x_t.dtype)
        with torch.no_grad():
            target = self.model(x_t, batch["t"], **batch["model_kwargs"])[:, :self.in_channels]
        student = batch["model_output"][:, :self.in_channels]
        return F.mse_loss(student.float(), target.float())


# --------------------------------------------------------------------------------------------------------------
#                                               The shared method
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SizeTransferConfig(MethodConfig):
    """Options shared by TLEG and SWS. They act on every block parameter, so ``targets`` does not apply."""

    reinit: tuple[str, ...] = ("y_embedder",)
    """Descendant modules re-initialised rather than inherited: ``y_embedder`` (a new label space), optionally
    ``final_layer``."""
    distill_weight: float = 1.0
    """Weight of the ε-distillation MSE added to the diffusion loss while the auxiliary model is pre-trained from
    a teacher (TLEG's and SWS's soft distillation used alpha = 1.0; here it adds to, never replaces, the diffusion
    loss)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets:
            raise MethodError("this method generates every block parameter: 'targets' does not apply")
        check_reinit_names(self.reinit)
        if isinstance(self.distill_weight, bool) or not isinstance(self.distill_weight, (int, float)) \
                or self.distill_weight < 0:
            raise MethodError(f"distill_weight must be a number >= 0, got {self.distill_weight!r}")
        self.distill_weight = float(self.distill_weight)


def _geometry(arch: ArchSpec) -> tuple:
    flavour = parse_flavour(arch.name)
    return (flavour.hidden_size, flavour.patch_size, flavour.num_heads, arch.input_size, arch.in_channels,
            arch.learn_sigma)


class SizeTransferMethod(DenseMethod):
    """A learngene method whose ancestry is an auxiliary DiT with generated blocks (subclasses say how) and whose
    descendants, of any depth, are plain DiTs initialised by expanding them and then trained in full."""

    family = "learngene"

    Config = SizeTransferConfig
    stages = frozenset({"ancestry", "transfer", "descend", "domain"})
    teacher_methods = DENSE_METHODS

    def __init__(self, config=None):
        super().__init__(config)
        self.teacher: DistillationTeacher | None = None

    @abc.abstractmethod
    def make_blocks(self, template: DiTBlock, depth: int, state: dict[str, torch.Tensor] | None) -> GeneratedBlocks:
        """The generated blocks of a ``depth``-layer auxiliary model, built from a DiT-initialised ``template``.

        ``state`` is an exported auxiliary model about to be loaded: its structure (recorded in buffers, e.g.
        SWS's stage split) then wins over this method's options, which only shape a fresh auxiliary model."""

    def auxiliary_model(self, arch: ArchSpec, num_classes: int, state: dict[str, torch.Tensor] | None = None) -> DiT:
        """A stock DiT of ``arch`` whose blocks are replaced by this method's generated blocks (fresh init, or
        shaped like the exported auxiliary model ``state``, which is not loaded here)."""
        model = arch.build(num_classes)
        model.blocks = self.make_blocks(model.blocks[0], model.depth, state)
        return model

    def build_ancestry(self, arch: ArchSpec, num_classes: int, teacher: Export | None = None, *,
                       label_space: str | None = None) -> DiT:
        self.require_stage("ancestry")
        self.teacher = None
        if teacher is not None:
            if teacher.method not in self.teacher_methods:
                raise MethodError(f"{self.name} distils a dense DiT (ancestry of {self.teacher_methods}); got a "
                                  f"teacher of method {teacher.method!r}")
            self.teacher = DistillationTeacher(teacher, arch, num_classes)
        return self.auxiliary_model(arch, num_classes)

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The ε-distillation term while an auxiliary model learns from a teacher; zero otherwise."""
        if self.teacher is None or self.config.distill_weight == 0 or generated_blocks(model) is None:
            return torch.zeros((), device=next(model.parameters()).device)
        return self.config.distill_weight * self.teacher.loss(batch)

    def check_ancestry(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> Export:
        self.require_stage(task.stage)
        if ancestry is None:
            raise MethodError(f"method {self.name!r} needs an ancestry exported by one of {self.ancestry_methods}; "
                              f"got none")
        if ancestry.method not in self.ancestry_methods:
            raise MethodError(f"method {self.name!r} cannot build from an ancestry of method {ancestry.method!r}; "
                              f"it needs one of {self.ancestry_methods}")
        if _geometry(ancestry.arch) != _geometry(arch):
            raise MethodError(f"{self.name} changes depth only: the ancestry {ancestry.arch} and the task's {arch} "
                              f"differ in width, heads, patch or input geometry")
        depths = parse_flavour(ancestry.arch.name).depth, parse_flavour(arch.name).depth
        if task.stage == "transfer" and depths[0] != depths[1]:
            raise MethodError(f"the ancestry has {depths[0]} layers and the task's model {depths[1]}: another depth "
                              f"is the 'descend' stage, not 'transfer'")
        if "y_embedder" not in self.config.reinit and task.num_classes != ancestry.num_classes:
            raise MethodError(f"task {task.name!r} has {task.num_classes} classes but the ancestry has "
                              f"{ancestry.num_classes}; add 'y_embedder' to {self.name}'s reinit")
        return ancestry

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        """A plain DiT of ``arch`` whose blocks are the ancestry's generated weights expanded to ``arch``'s depth."""
        ancestry = self.check_ancestry(arch, task, ancestry)
        auxiliary = self.auxiliary_model(ancestry.arch, ancestry.num_classes, ancestry.state)
        load_into(auxiliary, ancestry.state)
        expanded = expand_to_dit(auxiliary, parse_flavour(arch.name).depth)
        model = arch.build(task.num_classes)
        load_into(model, expanded.state_dict(), skip=self.config.reinit)
        reinit_modules(model, self.config.reinit)
        return model

    def merge(self, model: nn.Module) -> DiT:
        """An auxiliary model becomes the dense DiT it computes; a descendant is already a plain DiT."""
        if not isinstance(model, DiT):
            raise MethodError(f"{self.name}: expected a DiT to merge, got {type(model).__name__}")
        return expand_to_dit(model) if generated_blocks(model) is not None else model

    def new_param_names(self, model: nn.Module) -> set[str]:
        if generated_blocks(model) is not None:  # the auxiliary model starts from random init
            return {name for name, _ in model.named_parameters()}
        return module_param_names(model, self.config.reinit)
