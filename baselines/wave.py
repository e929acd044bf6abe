"""WAVE (Feng, Xie, Wang, Geng, CVPR 2025, arXiv 2406.17503): weight templates for variable-sized models, on DiT.

Every target Linear of type ``t`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) is generated as

    W = sum_k  S_k (x) T_k        (Kronecker product; k = 1..num_templates)

from ``num_templates`` shared **weight templates** ``T_k`` (template_size x template_size, one set per target type,
the learngene) and the layer's own **weight scalers** ``S_k`` ((out/w) x (in/w), a few dozen numbers). The operand
order S (x) T reads the abstract's "concatenating and weighting": W is tiled by w x w blocks and block (a, b) is
``sum_k S_k[a, b] T_k`` (the paper leaves the order open, docs/methods.md §4.1; the two orders differ by a fixed
permutation).
Templates are size-agnostic, so a descendant of another depth (another number of scaler sets) or width (other
scaler shapes) is built from the same templates with fresh scalers.

Stages (docs/methods.md §4.2, our defaults §4.3):

* ``ancestry``: template consolidation. With a dense ``teacher`` (``scratch``/``full``) the WAVE model is trained by
  the diffusion loss plus ``distill_weight * ||eps_student - eps_teacher||^2`` (``extra_loss``); templates and
  scalers start from the best shared-template fit of the teacher's weights (``teacher_init = "fit"``), the other
  tensors from the teacher. With a ``wave`` teacher it is WAVE's initialisation phase for another size (below).
* ``descend``: the task's DiT differs from the ancestry's in depth and/or width. Only the templates transfer;
  scalers and every non-templated tensor are fresh (DiT's init, scalers variance-matched to Xavier).
* ``transfer``: same size, new classes: every tensor loads, ``reinit`` modules are re-initialised.

``train`` picks what trains: ``"scalers"`` keeps the model in WAVE form with the templates frozen (WAVE's
initialisation phase; the scalers and the non-templated tensors train), ``"all"`` folds the model into a plain
dense DiT at build time and trains every weight ("then train the target model normally").

Templates are Parameters of the root DiT itself (``wave_template_attn_qkv``, ...), not of a submodule: DeepSpeed
ZeRO-3 gathers a module's own parameters around that module's forward and backward, and the root's forward encloses
every block, so the templates are whole wherever a block composes its weights, without relying on ZeRO-3's implicit
detection of parameters used outside their module (which, in the DeepSpeed we pin, also copes with a separate
template module; the root keeps that from mattering). The layers reach them through a plain (unregistered)
reference to the root, so they are stored once and counted once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from baselines.common import fixed_dit_params
from bench.models.dit import DiT
from methods.accounting import method_accounting
from methods.base import Accounting, ArchSpec, Export, Method, MethodConfig, MethodError, Task
from methods.surgery import (
    check_reinit_names,
    find_linears,
    freeze_all,
    matches_suffix,
    module_param_names,
    plain_linear,
    reinit_modules,
    set_submodule,
)
from methods.transfer import DENSE_METHODS, load_into

TRAIN_MODES = ("scalers", "all")
TEACHER_INITS = ("fit", "random")
_TEMPLATE_PREFIX = "wave_template_"


def template_name(target: str) -> str:
    """Root-level parameter name of the templates of ``target`` (``attn.qkv`` -> ``wave_template_attn_qkv``)."""
    return _TEMPLATE_PREFIX + target.replace(".", "_")


def compose_weight(scalers: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """``sum_k kron(scalers[k], templates[k])``: (N, a, b) scalers and (N, w, w) templates -> (a*w, b*w) weight.

    A loop of Kronecker products (elementwise multiplies) rather than one einsum: autograd keeps only the small
    factors, and no matmul is counted as per-image compute (the weight is formed once per forward, for the batch).
    """
    weight = torch.kron(scalers[0], templates[0])
    for k in range(1, scalers.shape[0]):
        weight = weight + torch.kron(scalers[k], templates[k])
    return weight


class WaveLinear(nn.Module):
    """y = x W^T + b with W = sum_k ``wave_scalers[k]`` (x) T_k; the templates T live on ``owner`` (the root DiT)."""

    def __init__(self, owner: nn.Module, target: str, in_features: int, out_features: int, num_templates: int,
                 template_size: int, bias: nn.Parameter | None):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # deliberately not a submodule: the templates have one owner
        self.target = target
        self.in_features, self.out_features = in_features, out_features
        like = owner.pos_embed
        self.wave_scalers = nn.Parameter(torch.zeros(num_templates, out_features // template_size,
                                                     in_features // template_size, dtype=like.dtype,
                                                     device=like.device))
        self.bias = bias

    def templates(self) -> torch.Tensor:
        return getattr(self._owner, template_name(self.target))

    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight this layer applies."""
        return compose_weight(self.wave_scalers, self.templates())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with exactly the weight this layer composes (and its bias)."""
        return plain_linear(self.weight().detach(), self.bias)

    def extra_repr(self) -> str:
        return f"target={self.target}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"scalers={tuple(self.wave_scalers.shape)}"


def wave_layers(model: nn.Module) -> dict[str, WaveLinear]:
    """Every ``WaveLinear`` in ``model`` by qualified name (found by type)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WaveLinear)}


def template_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The template Parameters the model's ``WaveLinear`` layers use, by root-level name."""
    return {template_name(layer.target): layer.templates() for layer in wave_layers(model).values()}


# --------------------------------------------------------------------------------------------------------------
#                                                  Config
# --------------------------------------------------------------------------------------------------------------


@dataclass
class WaveConfig(MethodConfig):
    """WAVE on DiT (docs/methods.md §4; our defaults §4.3)."""

    targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    """Linears generated from templates (one template set per target); ``adaLN_modulation.1`` is opt-in."""
    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules re-initialised rather than loaded when building from an ancestry of the same size (a new label space):
    ``y_embedder``, optionally ``final_layer``. The class table is kept, not redrawn, when the task's label space is
    the ancestry's (``Task.label_space`` equal to the export's recorded one): WAVE's second phase ("then train the
    target model normally") continues its initialisation phase on the same classes, whose class table that phase
    trained. In ``descend`` every non-templated tensor is fresh anyway."""
    template_size: int = 128
    """Largest side w of the square templates (ours, docs/methods.md §4.3: 128, which divides every DiT width and
    its 3d/4d/6d). The side used is the largest power of two <= this dividing every target's widths (64 on the
    tiny DiT-T). Applies where templates are created (the ancestry stage); downstream builds take count and side
    from the ancestry."""
    num_templates: int = 8
    """Templates per target type (N_star; unknown for DiT, our default 8). Ancestry stage only, as above."""
    train: str = "scalers"
    """``scalers``: WAVE form, templates frozen, scalers and non-templated tensors trained (WAVE's initialisation
    phase); ``all``: folded into a dense DiT at build time and trained in full (WAVE's "then train normally")."""
    distill_weight: float = 1.0
    """Weight of the eps-distillation term during template consolidation with a dense teacher (0 turns it off)."""
    teacher_init: str = "fit"
    """How consolidation starts from a dense teacher of the same flavour: ``fit`` (templates and scalers from the
    best shared-template least-squares fit of the teacher's weights, other tensors copied) or ``random``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets:
            raise MethodError("wave needs at least one target")
        check_reinit_names(self.reinit)
        for name in ("template_size", "num_templates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"wave {name} must be a positive int, got {value!r}")
        if self.train not in TRAIN_MODES:
            raise MethodError(f"wave train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.teacher_init not in TEACHER_INITS:
            raise MethodError(f"wave teacher_init must be one of {TEACHER_INITS}, got {self.teacher_init!r}")
        if not self.distill_weight >= 0:
            raise MethodError(f"wave distill_weight must be >= 0, got {self.distill_weight!r}")


# --------------------------------------------------------------------------------------------------------------
#                                  Turning a stock DiT into its WAVE form
# --------------------------------------------------------------------------------------------------------------


def _rearranged(weight: torch.Tensor, w: int) -> torch.Tensor:
    """(a*w, b*w) -> (a*b, w*w): row (a, b) is block (a, b) flattened (Van Loan's rearrangement: kron -> rank 1)."""
    a, b = weight.shape[0] // w, weight.shape[1] // w
    return weight.reshape(a, w, b, w).permute(0, 2, 1, 3).reshape(a * b, w * w)


def fit_templates(weights: list[torch.Tensor], num_templates: int, w: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Templates (N, w, w) and per-layer scalers minimising sum_l ||W_l - sum_k S_lk (x) T_k||_F (float64 SVD).

    Stacking every layer's rearranged weight gives one matrix whose top-N right singular vectors are the shared
    templates; singular values are split evenly between templates and scalers. Beyond the matrix's rank the
    templates are random with zero scalers, so they still receive gradients.
    """
    stacked = torch.cat([_rearranged(wt.detach().double(), w) for wt in weights])
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    k = min(num_templates, s.numel())
    root = s[:k].sqrt()
    templates = torch.randn(num_templates, w * w, dtype=torch.float64) / w
    templates[:k] = root[:, None] * vh[:k]
    coeffs = torch.zeros(stacked.shape[0], num_templates, dtype=torch.float64)
    coeffs[:, :k] = u[:, :k] * root
    scalers, start = [], 0
    for wt in weights:
        a, b = wt.shape[0] // w, wt.shape[1] // w
        scalers.append(coeffs[start:start + a * b].T.reshape(num_templates, a, b))
        start += a * b
    return templates.reshape(num_templates, w, w), scalers


def fresh_scalers(templates: torch.Tensor, out_features: int, in_features: int, zero: bool) -> torch.Tensor:
    """Random scalers whose composed weight has Xavier-uniform variance 2/(in+out) under ``templates`` (zero where
    DiT zero-initialises the layer, so adaLN-Zero still starts every block as the identity)."""
    w = templates.shape[-1]
    shape = (templates.shape[0], out_features // w, in_features // w)
    if zero:
        return torch.zeros(shape, dtype=templates.dtype)
    energy = templates.detach().float().square().mean(dim=(1, 2)).sum().clamp_min(1e-12)
    std = math.sqrt(2.0 / (in_features + out_features) / float(energy))
    return torch.randn(shape).to(templates.dtype) * std


def template_side(model: nn.Module, config: WaveConfig) -> int:
    """The template side for ``model``: the largest power of two <= ``config.template_size`` that divides every
    target's input and output width (128 for DiT-S/B/L/XL, 64 for the tiny DiT-T)."""
    widths = [d for lin in find_linears(model, config.targets).values() for d in (lin.in_features, lin.out_features)]
    side = 1 << (config.template_size.bit_length() - 1)
    while side > 1 and any(d % side for d in widths):
        side //= 2
    return side


def to_wave(model: DiT, config: WaveConfig, *, templates: dict[str, torch.Tensor] | None = None,
            fit: bool = False) -> DiT:
    """Replace the target Linears of a stock DiT by ``WaveLinear``s, in place, and register the templates on it.

    ``templates`` (by target, each (N, w, w)) are used as given; otherwise ``config.num_templates`` templates of
    side ``template_side`` are fitted to the model's current weights (``fit``) or drawn N(0, 1). Scalers are fitted
    along with fitted templates, else fresh (``fresh_scalers``). Biases stay the Linears' own Parameters.
    """
    linears = find_linears(model, config.targets)
    side = template_side(model, config)
    for target in config.targets:
        names = [name for name in linears if matches_suffix(name, target)]
        layers = [linears[name] for name in names]
        scalers: list[torch.Tensor | None] = [None] * len(layers)
        if templates is not None:
            tmpl = templates[target]
        elif fit:
            tmpl, scalers = fit_templates([lin.weight for lin in layers], config.num_templates, side)
        else:
            tmpl = torch.randn(config.num_templates, side, side)
        n, w = tmpl.shape[0], tmpl.shape[-1]
        bad = [f"{name} ({lin.out_features}x{lin.in_features})" for name, lin in zip(names, layers)
               if lin.out_features % w or lin.in_features % w]
        if bad:
            raise MethodError(f"wave templates of side {w} must divide the shape of every target: "
                              f"{', '.join(bad[:3])}")
        model.register_parameter(template_name(target), nn.Parameter(tmpl.to(model.pos_embed)))
        for name, lin, fitted in zip(names, layers, scalers):
            layer = WaveLinear(model, target, lin.in_features, lin.out_features, n, w, lin.bias)
            if fitted is None:
                fitted = fresh_scalers(layer.templates(), lin.out_features, lin.in_features,
                                       zero=not bool(lin.weight.detach().any()))
            with torch.no_grad():
                layer.wave_scalers.copy_(fitted)
            set_submodule(model, name, layer)
    return model


def merge_wave(model: nn.Module) -> DiT:
    """Fold every ``WaveLinear`` into an ``nn.Linear`` and drop the templates: a plain DiT with DiT's keys."""
    names = list(template_params(model))
    for name, layer in wave_layers(model).items():
        set_submodule(model, name, layer.to_linear())
    for name in names:
        delattr(model, name)
    return model


# --------------------------------------------------------------------------------------------------------------
#                                                 The method
# --------------------------------------------------------------------------------------------------------------


class WaveMethod(Method):
    """WAVE: shared Kronecker weight templates (the learngene) and per-layer scalers; see the module docstring."""

    family = "learngene"

    name = "wave"
    Config = WaveConfig
    stages = frozenset({"ancestry", "transfer", "descend"})
    ancestry_methods = ("wave",)
    teacher_methods = DENSE_METHODS + ("wave",)

    def __init__(self, config: WaveConfig | dict[str, Any] | None = None):
        super().__init__(config)
        self.teacher: DiT | None = None
        """Frozen dense teacher of template consolidation (never part of the trained model)."""

    # ---- building -------------------------------------------------------------------------------------------

    def build_ancestry(self, arch: ArchSpec, num_classes: int, teacher: Export | None = None, *,
                       label_space: str | None = None) -> nn.Module:
        """Template consolidation (dense ``teacher``, or none: random templates trained by the diffusion loss), or
        with a ``wave`` teacher WAVE's initialisation phase: that ancestry's templates at this ``arch``."""
        self.require_stage("ancestry")
        if teacher is not None and teacher.method == "wave":
            return self._from_wave_ancestry(arch, num_classes, teacher)
        model = arch.build(num_classes)
        fit = False
        if teacher is not None:
            self.teacher = self._dense_teacher(arch, num_classes, teacher)
            if self.config.teacher_init == "fit" and teacher.arch.name == arch.name:
                load_into(model, self.teacher.state_dict())
                fit = True
        to_wave(model, self.config, fit=fit)
        return self._finish(model, train_templates=True, new=None if fit else "all", fold=False)

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> nn.Module:
        self.require_stage(task.stage)
        if ancestry is None:
            raise MethodError(f"method 'wave' needs an ancestry exported by one of {self.ancestry_methods}; got none")
        if ancestry.arch.name != arch.name and task.stage != "descend":
            raise MethodError(f"wave: the ancestry is a {ancestry.arch.name} and the task asks for {arch.name}; "
                              f"another model size is the 'descend' stage")
        return self._from_wave_ancestry(arch, task.num_classes, ancestry, task.label_space)

    def _dense_teacher(self, arch: ArchSpec, num_classes: int, teacher: Export) -> DiT:
        if teacher.method not in DENSE_METHODS:
            raise MethodError(f"wave distils a dense teacher (one of {DENSE_METHODS}), got {teacher.method!r}")
        self._check_geometry(arch, teacher)
        if teacher.num_classes != num_classes:
            raise MethodError(f"wave: the teacher knows {teacher.num_classes} classes, the ancestry run has "
                              f"{num_classes}; distillation needs the same labels")
        model = teacher.arch.build(teacher.num_classes)
        load_into(model, teacher.state)
        freeze_all(model)
        return model.eval()

    @staticmethod
    def _check_geometry(arch: ArchSpec, ancestry: Export) -> None:
        fields = ("input_size", "in_channels", "learn_sigma")
        differ = [f"{f}: {getattr(ancestry.arch, f)!r} vs {getattr(arch, f)!r}" for f in fields
                  if getattr(ancestry.arch, f) != getattr(arch, f)]
        if differ:
            raise MethodError(f"wave: ancestry {ancestry.path or '(in memory)'} has another input geometry: "
                              f"{'; '.join(differ)}")

    def _from_wave_ancestry(self, arch: ArchSpec, num_classes: int, ancestry: Export,
                            label_space: str | None = None) -> nn.Module:
        if ancestry.method not in self.ancestry_methods:
            raise MethodError(f"method 'wave' cannot build from an ancestry of method {ancestry.method!r}; it needs "
                              f"a 'wave' ancestry (template consolidation)")
        self._check_geometry(arch, ancestry)
        model = arch.build(num_classes)
        if ancestry.arch.name == arch.name:  # same size: every tensor transfers, the reinit modules are redrawn
            recorded = ancestry.meta.get("label_space") if isinstance(ancestry.meta, dict) else None
            same_classes = bool(label_space) and label_space == recorded and num_classes == ancestry.num_classes
            reinit = tuple(r for r in self.config.reinit if not (same_classes and r == "y_embedder"))
            if "y_embedder" not in reinit and num_classes != ancestry.num_classes:
                raise MethodError(f"wave: {num_classes} classes but the ancestry has {ancestry.num_classes}; add "
                                  f"'y_embedder' to reinit for a new label space")
            to_wave(model, self.config, templates=self._inherited_templates(ancestry))
            load_into(model, ancestry.state, skip=reinit)
            reinit_modules(model, reinit)
            new = module_param_names(model, reinit)
        else:  # another depth and/or width: only the templates transfer; fresh scalers on them
            to_wave(model, self.config, templates=self._inherited_templates(ancestry))
            new = {n for n in dict(model.named_parameters()) if n not in template_params(model)}
        return self._finish(model, train_templates=False, new=new)

    def _inherited_templates(self, ancestry: Export) -> dict[str, torch.Tensor]:
        """The ancestry's templates of every target; their count and side come from the file, not the config."""
        found = sorted(k for k in ancestry.state if k.startswith(_TEMPLATE_PREFIX))
        templates = {}
        for target in self.config.targets:
            key = template_name(target)
            if key not in ancestry.state:
                raise MethodError(f"wave: ancestry {ancestry.path or '(in memory)'} has no templates for {target!r} "
                                  f"(templated there: {found}); use the ancestry run's targets")
            templates[target] = ancestry.state[key]
        return templates

    def _finish(self, model: DiT, *, train_templates: bool, new: set[str] | str | None,
                fold: bool | None = None) -> nn.Module:
        """Record what trains and what is new (bookkeeping read by ``mark_trainable``/``count``); fold the model
        into a dense DiT for ``train = "all"`` (never during consolidation, which exists to train templates)."""
        new = set(dict(model.named_parameters())) if new == "all" else set(new or ())
        if (self.config.train == "all") if fold is None else fold:
            merge_wave(model)
            # Scalers vanish into the folded weights, which count as inherited: they carry the ancestry's templates.
            new &= set(dict(model.named_parameters()))
        model.wave_train_templates = train_templates
        model.wave_new_params = frozenset(new)
        return model

    # ---- training -------------------------------------------------------------------------------------------

    def mark_trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        freeze_all(model)
        fixed = fixed_dit_params(model)
        templates = {id(p) for p in template_params(model).values()}
        scalers = [layer.wave_scalers for layer in wave_layers(model).values()]
        scaler_ids = {id(p) for p in scalers}
        groups = []
        if templates and getattr(model, "wave_train_templates", False):
            groups.append({"name": "templates", "params": list(template_params(model).values()), "lr_scale": 1.0})
        if scalers:
            groups.append({"name": "scalers", "params": scalers, "lr_scale": 1.0})
        rest = [p for p in model.parameters() if id(p) not in fixed | templates | scaler_ids]
        groups.append({"name": "dense", "params": rest, "lr_scale": 1.0})
        for group in groups:
            for param in group["params"]:
                param.requires_grad_(True)
        return groups

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """``distill_weight * MSE(eps_student, eps_teacher)`` on the eps channels, during consolidation only."""
        if self.teacher is None or self.config.distill_weight == 0:
            return super().extra_loss(model, batch)
        x_t = batch["x_t"]
        teacher = self.teacher
        if teacher.pos_embed.device != x_t.device or teacher.pos_embed.dtype != x_t.dtype:
            self.teacher = teacher = teacher.to(device=x_t.device, dtype=x_t.dtype)
        channels = teacher.in_channels
        with torch.no_grad():
            target = teacher(x_t, batch["t"], **batch["model_kwargs"])[:, :channels]
        student = batch["model_output"][:, :channels]
        return self.config.distill_weight * F.mse_loss(student.float(), target.float())

    # ---- inference ------------------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> DiT:
        if not isinstance(model, DiT):
            raise MethodError(f"wave: expected a DiT to merge, got {type(model).__name__}")
        merged = merge_wave(model)
        for attr in ("wave_train_templates", "wave_new_params"):
            merged.__dict__.pop(attr, None)
        return merged

    def count(self, model: nn.Module) -> Accounting:
        return method_accounting(self, model, getattr(model, "wave_new_params", frozenset()))
