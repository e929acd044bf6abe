"""The method contract: one shape for every method (docs/methods.md §1.3).

A method acts once, when the model is built, by module surgery on a stock DiT (``bench.models.dit``); it never
edits the DiT file. The harness knows methods only through this class and the registry, so adding a method never
touches ``bench/``. Every registered method runs through the same parametrised contract test
(``tests/test_methods_contract.py``).

Checklist for a new method: a ``Config`` dataclass (fields with docstrings and defaults, validated in
``__post_init__``), ``name``, ``stages``, ``family``, ``build`` (and ``build_ancestry`` if it pre-trains its own
ancestry), structural ``mark_trainable``, ``state_to_save``/``load_state``, ``merge``, ``count``; a registry entry (or
a ``kindbench.methods`` entry point of your own package); contract-test rows; a README section. The full checklist:
docs/adding-a-method.md.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bench.models.dit import DiT, build_dit

#: Stages a method can support (docs/methods.md §1.4).
STAGES = ("ancestry", "transfer", "descend", "domain")


class MethodError(ValueError):
    """A method was asked for something it cannot do (unsupported stage, incompatible ancestry, bad targets)."""


# --------------------------------------------------------------------------------------------------------------
#                                       What a method is built from
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """Which DiT to build: a flavour name plus the input geometry. Carries no weights."""

    name: str = "DiT-T/2"
    input_size: int = 32
    in_channels: int = 4
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    gelu: str = "tanh"
    """The MLP's GELU (``bench.models.dit.GELU_FORMS``): ``tanh`` (DiT's) or ``exact``."""

    def build(self, num_classes: int, device: torch.device | str | None = None) -> DiT:
        """A freshly initialised stock DiT of this spec."""
        return build_dit(self.name, input_size=self.input_size, in_channels=self.in_channels,
                         num_classes=num_classes, learn_sigma=self.learn_sigma,
                         class_dropout_prob=self.class_dropout_prob, gelu=self.gelu, device=device)


@dataclass(frozen=True)
class Task:
    """The downstream problem a model is built for: its label space and kind of shift."""

    name: str
    num_classes: int
    stage: str = "transfer"
    """``transfer`` (new classes, same size), ``descend`` (other model size) or ``domain`` (large domain shift)."""
    label_space: str | None = None
    """Digest of which classes the task's labels name (``bench.data.identity.label_space``; exports record their
    run's as ``meta["label_space"]``), or None when unknown: a method may keep its ancestry's class table when the
    two are equal."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise MethodError(f"task stage must be one of {STAGES}, got {self.stage!r}")
        if self.num_classes <= 0:
            raise MethodError(f"task {self.name!r} needs a positive number of classes")


@dataclass
class Export:
    """The weights a run exported, with their provenance: what a downstream method transfers from (the export of
    its ancestry run, passed to ``build`` as ``ancestry``) and what sampling rebuilds a run from.

    ``state`` holds plain tensors (the EMA weights of the model as its method built it); ``method``,
    ``arch`` and ``num_classes`` say how to rebuild that model, so a consumer can check compatibility before use.
    """

    method: str
    arch: ArchSpec
    num_classes: int
    state: dict[str, torch.Tensor]
    sha256: str = ""
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Accounting:
    """Parameters and compute of a built model, in DiT's convention
    (GMACs: one image, forward only, no CFG doubling)."""

    params_total: int
    params_trainable: int
    params_inherited: int
    """Parameters whose values come from the ancestry (frozen or not)."""
    params_new: int
    """Parameters the method initialised fresh (adapters, new embeddings, re-initialised heads)."""
    stored_bytes: int
    """Bytes of ``state_to_save``: what must be stored on top of the ancestry to reproduce the model."""
    gmacs_fwd_trained: float
    """Forward GMACs per image of the model as trained (factorised/adapter path)."""
    gmacs_fwd_sampled: float
    """Forward GMACs per image of ``sampling_model`` (what sampling costs; the merged DiT for most methods)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MethodConfig:
    """Base of every method's ``Config``. Subclasses add fields, each with a docstring and a default."""

    targets: tuple[str, ...] = ()
    """DiT Linear layers the method decomposes or adapts, as module-name suffixes (``attn.qkv``, ``attn.proj``,
    ``mlp.fc1``, ``mlp.fc2``; ``adaLN_modulation.1`` and ``final_layer.linear`` are opt-in). A target matching no
    module is an error."""
    reinit: tuple[str, ...] = ()
    """Modules re-initialised and trained in full for a new label space (peft's ``modules_to_save``), e.g.
    ``y_embedder`` and ``final_layer``."""

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.reinit = tuple(self.reinit)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MethodConfig:
        """Build from a plain dict (a config file's ``method.options``); unknown keys are errors."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(names)})"
                raise MethodError(f"unknown option {key!r} for {cls.__qualname__}{hint}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
#                                                 The contract
# --------------------------------------------------------------------------------------------------------------


class Method(abc.ABC):
    """Base class of every method. Subclasses set ``name``, ``Config`` and ``stages`` and implement ``build``.

    Methods hold no device, dtype, optimizer or distributed logic: the engine owns those.
    """

    name: ClassVar[str] = ""
    """Registry key (lowercase, one word); also the prefix of tensors the method owns (``lora_``, ``kind_``)."""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    stages: ClassVar[frozenset[str]] = frozenset()
    """Stages the method supports, a subset of ``STAGES``."""
    family: ClassVar[str] = ""
    """Leaderboard family of the method's rows: ``pretrain``, ``full_ft``, ``peft``, ``learngene`` or ``init`` (a
    new family name is allowed). Every method declares one; the harness never guesses it from the name."""
    rank_option: ClassVar[str | None] = None
    """The option ``methods.budget.matched_rank`` varies to meet a parameter budget (None: the method has none);
    such a method also implements ``adapted_linears(model)`` (names of the Linears it adapts),
    ``rank_candidates(shapes)`` (the values the option may take for those Linears' (out, in) shapes, ascending)
    and ``budget_options(value)`` (the options that set it), as the PEFT adapters of ``baselines`` do."""
    ancestry_methods: ClassVar[tuple[str, ...]] = ()
    """Methods whose ancestry exports ``build`` accepts (``("scratch", "full")`` for a dense DiT, ``("kind",)``
    for KIND's own); empty means ``build`` starts from random weights and takes no ancestry. The contract test
    builds its random ancestry with the first entry's ``build_ancestry``."""

    def __init__(self, config: MethodConfig | dict[str, Any] | None = None):
        if config is None or isinstance(config, dict):
            config = self.Config.from_dict(config)
        if not isinstance(config, self.Config):
            raise MethodError(f"{type(self).__name__} needs a {self.Config.__qualname__}, got {type(config).__name__}")
        self.config = config

    # ---- building -------------------------------------------------------------------------------------------

    teacher_methods: ClassVar[tuple[str, ...]] = ()
    """Ancestry methods whose export ``build_ancestry`` accepts as a ``teacher`` (an ancestry pre-trained by
    distillation, as TLEG, SWS and WAVE do); empty means the ancestry stage takes no teacher."""

    def build_ancestry(self, arch: ArchSpec, num_classes: int, teacher: Export | None = None, *,
                       label_space: str | None = None) -> nn.Module:
        """The model this method pre-trains in the ``ancestry`` stage. Default: a stock DiT (dense ancestry).

        ``teacher`` (only for methods with ``teacher_methods``) is a pre-trained ancestry to learn from; a method
        keeps what it needs of it (e.g. a frozen teacher DiT used by ``extra_loss``) on itself, never inside the
        returned model, so it is neither trained, averaged by the EMA nor exported. ``label_space`` is the run's
        (``Task.label_space``), for a method whose ancestry run builds from a teacher on the teacher's classes."""
        self.require_stage("ancestry")
        if teacher is not None:
            raise MethodError(f"method {self.name!r} pre-trains its ancestry without a teacher")
        return arch.build(num_classes)

    @abc.abstractmethod
    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> nn.Module:
        """The downstream model for ``task``: a DiT of ``arch``
        with inherited tensors loaded and new ones initialised."""

    def require_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise MethodError(f"method {self.name!r} does not support stage {stage!r} "
                              f"(supports: {sorted(self.stages)})")

    # ---- training -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def mark_trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        """Freeze everything, then unfreeze what the method owns, found structurally (by layer type, not by name).

        The harness calls it once, on the model ``build``/``build_ancestry`` returned (they do not call it), and
        gives its groups to the optimizer; a model that has not been through it has no defined trainable set.

        Returns named param groups ``{"name": str, "params": [Tensor], "lr_scale": float}``; the trainer applies
        weight decay only to tensors with >= 2 dims.
        """

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """An optional regulariser added to the diffusion loss; zero by default.

        ``batch`` holds ``x`` (clean inputs), ``y`` (labels), ``x_t`` (noised inputs), ``t`` (timesteps),
        ``model_kwargs`` (what the model was called with besides x_t and t: labels after dropout, ...) and
        ``model_output`` (the model's raw output on them, differentiable): enough to distil a teacher's prediction
        on the same inputs without a second student forward."""
        return torch.zeros((), device=next(model.parameters()).device)

    # ---- saving ---------------------------------------------------------------------------------------------

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only the tensors that reproduce the trained model on top of its ancestry (the EMA tracks the same set).

        Default: every trainable parameter, by its module path.
        """
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loadable_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors ``load_state`` may fill, by name: the parameters (methods that save buffers add those)."""
        return dict(model.named_parameters())

    def load_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``state_to_save``: load those tensors into a model built by ``build``; every key must fit."""
        own = self.loadable_tensors(model)
        missing = [k for k in state if k not in own]
        if missing:
            raise MethodError(f"{self.name}: saved tensors not in the model: {missing[:5]}")
        with torch.no_grad():
            for key, value in state.items():
                if own[key].shape != value.shape:
                    raise MethodError(f"{self.name}: {key} has shape {tuple(value.shape)} in the file but "
                                      f"{tuple(own[key].shape)} in the model")
                own[key].copy_(value)

    # ---- inference ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def merge(self, model: nn.Module) -> DiT:
        """Fold the method back into a plain DiT for sampling; merged and unmerged outputs agree (tested)."""

    def sampling_model(self, model: nn.Module) -> nn.Module:
        """The model the sampler runs, made from ``model`` in place: ``merge(model)``, a plain DiT, unless a method
        keeps a form that is cheaper or the only exact one (KIND: a gated model stays unmerged, so every sample uses
        its own class's tailors). Whatever it returns computes, for every label, what ``merge`` computes for that
        label's gate (tested) and offers DiT's sampling interface (``forward_with_cfg``, ``num_classes``,
        ``in_channels``, ``input_size``, ``learn_sigma``)."""
        return self.merge(model)

    @abc.abstractmethod
    def count(self, model: nn.Module) -> Accounting:
        """Parameters and forward GMACs of ``model`` as trained and as sampled (``sampling_model``)."""
