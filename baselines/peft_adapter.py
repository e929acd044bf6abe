"""PEFT baselines through HF ``peft`` (docs/methods.md §6.2): LoRA, DoRA, PiSSA, VeRA, OFT, LoHa, LoKr.

BOFT is native (``baselines.boft``): peft forms its rotation as a dense matrix every forward, which costs several
times full fine-tuning.

One class hierarchy, not copies: ``PeftAdapterMethod`` (on ``baselines.adapters.AdapterMethod``) maps its Config
to a peft config (``peft_config``) and names peft's tuner-layer type (``tuner_layer``), which is how trainable
tensors are found (structurally, by ``adapter_layer_names`` on every tuner layer, as peft's own
``_mark_only_adapters_as_trainable`` does) and how ``merge`` finds what to fold.

peft injects its layers into any ``nn.Module`` with ``inject_adapter_in_model``, which keeps the DiT's class and
module names (a ``PeftModel`` wrapper would not); we use it rather than re-implement the methods. Tuners whose
state is shared across layers (VeRA's frozen random projections) are refused by ``inject_adapter_in_model``; for
those the tuner class itself does the same injection, and every layer keeps a reference to the shared buffers.

peft's own ``modules_to_save`` is not used for ``reinit``/``train_modules``: it wraps the module and renames its
parameters, so the merged model would no longer load with DiT's names. Where peft silently changes what was asked
for (OFT adjusts a block size that does not divide a layer) we check first and fail instead.
"""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import peft
import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.oft import OFTLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.tuners.vera import VeraLayer
from torch import nn

from baselines.adapters import AdapterConfig, AdapterMethod, check_dropout, check_positive_int
from baselines.vera_path import use_cheaper_path
from methods.base import MethodError
from methods.surgery import set_submodule

#: The one adapter every injected layer carries (peft supports several; a benchmark run trains one).
ADAPTER = "default"


def inject(peft_config: peft.PeftConfig, model: nn.Module) -> None:
    """Inject peft's layers for ``peft_config`` into ``model`` in place (module docstring: why two paths)."""
    tuner_cls = peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type]
    if tuner_cls.uses_shared_state:
        tuner_cls(model, peft_config, adapter_name=ADAPTER)
    else:
        peft.inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)


def tuner_layers(model: nn.Module, layer_type: type[BaseTunerLayer] = BaseTunerLayer) -> dict[str, BaseTunerLayer]:
    """Every peft tuner layer of ``layer_type`` in ``model``, by qualified name (found by type, never by name)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, layer_type)}


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every peft LoRA layer (LoRA, DoRA, PiSSA) in ``model``, by qualified name."""
    return tuner_layers(model, LoraLayer)


def layer_adapter_params(prefix: str, layer: BaseTunerLayer) -> dict[str, nn.Parameter]:
    """The trainable tensors of one tuner layer: peft lists each kind (``lora_A``, ``lora_magnitude_vector``,
    ``oft_R``, ...) on the layer class as ``adapter_layer_names``, each a dict keyed by adapter name."""
    params: dict[str, nn.Parameter] = {}
    for kind in dict.fromkeys(layer.adapter_layer_names):  # DoRA's layer lists the magnitude vector twice
        container = getattr(layer, kind, None)
        if container is None or ADAPTER not in container:
            continue
        entry = container[ADAPTER]
        if isinstance(entry, nn.Parameter):
            params[f"{prefix}.{kind}.{ADAPTER}"] = entry
        else:
            params.update({f"{prefix}.{kind}.{ADAPTER}.{n}": p for n, p in entry.named_parameters()})
    return params


# --------------------------------------------------------------------------------------------------------------
#                                             The generic wrapper
# --------------------------------------------------------------------------------------------------------------


class PeftAdapterMethod(AdapterMethod):
    """A peft method on a frozen dense DiT: subclasses set ``name``, ``Config``, ``tuner_layer`` and implement
    ``peft_config``; everything else (targets, trainability, saving, merge, accounting) is shared."""

    tuner_layer: ClassVar[type[BaseTunerLayer]] = BaseTunerLayer
    rank_option = "rank"

    @abc.abstractmethod
    def peft_config(self, targets: list[str]) -> peft.PeftConfig:
        """The peft config for this method's options, adapting exactly the Linears named in ``targets``."""

    def attach(self, model: nn.Module, targets: list[str]) -> None:
        inject(self.peft_config(targets), model)
        self.check_injected(model)

    def check_injected(self, model: nn.Module) -> None:
        """Verify peft built what was asked for (default: nothing to check)."""

    def rank_candidates(self, shapes: list[tuple[int, int]]) -> list[int]:
        """Values ``rank_option`` may take for Linears of these (out, in) shapes, ascending (``budget`` searches
        them). Default: 1 .. the smallest matrix rank, beyond which a low-rank update stops adding expressiveness."""
        return list(range(1, min(min(shape) for shape in shapes) + 1))

    def budget_options(self, value: int) -> dict[str, int]:
        """The options that set ``rank_option`` to ``value`` (``methods.budget`` rebuilds with them)."""
        return {self.rank_option: value}

    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for prefix, layer in tuner_layers(model, self.tuner_layer).items():
            params.update(layer_adapter_params(prefix, layer))
        return params

    def unwrap(self, model: nn.Module) -> None:
        for name, layer in tuner_layers(model, self.tuner_layer).items():
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])
            set_submodule(model, name, layer.get_base_layer())
        # peft records its config on the model it injected into; a merged DiT carries no adapter state.
        model.__dict__.pop("peft_config", None)


# --------------------------------------------------------------------------------------------------------------
#                                      LoRA and its variants (DoRA, PiSSA)
# --------------------------------------------------------------------------------------------------------------

#: ``init`` values that rewrite the frozen base weight (W_res = W0 - B A); their residuals are saved with the adapter.
_BASE_REWRITING_INIT = re.compile(r"^(pissa|pissa_niter_\d+|olora)$")
_INITS = "True, 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora'"


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: W = W0 + (alpha / rank) * B A with W0 frozen (Hu et al., arXiv 2106.09685)."""

    label = "lora"

    rank: int = 16
    """LoRA rank r; each PEFT runs at r = 16 and at a KIND-matched budget (docs/methods.md §6.4)."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. None means alpha = rank (docs/methods.md §6.2)."""
    dropout: float = 0.0
    """Dropout on the adapter input (peft ``lora_dropout``)."""
    init: bool | str = True
    """peft ``init_lora_weights``: True (A Kaiming-uniform, B = 0, the adapter starts as a no-op), 'gaussian',
    'pissa' / 'pissa_niter_<k>' (principal singular components; rewrites the frozen base) or 'olora'."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.label, "rank", self.rank)
        if self.alpha is None:
            self.alpha = float(self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise MethodError(f"{self.label} alpha must be positive, got {self.alpha!r}")
        check_dropout(self.label, "dropout", self.dropout)
        if not (self.init is True or self.init == "gaussian" or
                (isinstance(self.init, str) and _BASE_REWRITING_INIT.match(self.init))):
            raise MethodError(f"{self.label} init must be one of {_INITS}; got {self.init!r}")

    @property
    def rewrites_base(self) -> bool:
        return isinstance(self.init, str) and bool(_BASE_REWRITING_INIT.match(self.init))


class LoraMethod(PeftAdapterMethod):
    """LoRA adapters (peft) on a frozen dense DiT, plus re-initialised class embeddings and a trained final layer."""

    name = "lora"
    Config = LoraConfig
    tuner_layer = LoraLayer
    use_dora: ClassVar[bool] = False

    def peft_config(self, targets: list[str]) -> peft.PeftConfig:
        cfg = self.config
        return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                               init_lora_weights=cfg.init, use_dora=self.use_dora, target_modules=list(targets))

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if not self.config.rewrites_base:
            return {}
        # PiSSA/OLoRA subtract the initial adapter from the frozen base; the residual depends on the SVD/QR
        # backend, so it is stored rather than recomputed (exact reproduction at the cost of dense bytes).
        return {f"{prefix}.base_layer.weight": layer.get_base_layer().weight.detach()
                for prefix, layer in lora_layers(model).items()}


@dataclass
class DoraConfig(LoraConfig):
    """DoRA: W = m * (W0 + s B A) / ||W0 + s B A||_row with the magnitude m (one per output, init ||W0||_row)
    trained next to LoRA's A and B (Liu et al., arXiv 2402.09353); same rank as LoRA (docs/methods.md §6.2)."""

    label = "dora"


class DoraMethod(LoraMethod):
    """DoRA (peft ``use_dora``): LoRA plus a trained per-output magnitude vector."""

    name = "dora"
    Config = DoraConfig
    use_dora = True


@dataclass
class PissaConfig(LoraConfig):
    """PiSSA: LoRA whose A, B start at the top-r singular components of W0 (A = S_r^1/2 V_r^T, B = U_r S_r^1/2) and
    whose frozen base is the residual W0 - B A (Meng et al., arXiv 2404.02948)."""

    label = "pissa"

    init: bool | str = "pissa"
    """'pissa' (exact SVD, the paper's) or 'pissa_niter_<k>' (peft's randomised SVD with k subspace iterations,
    much faster to build on CPU for DiT-L/2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.init, str) and self.init.startswith("pissa")):
            raise MethodError(f"pissa init must be 'pissa' or 'pissa_niter_<k>', got {self.init!r}")


class PissaMethod(LoraMethod):
    """PiSSA (peft ``init_lora_weights='pissa'``): principal singular components trained, residual frozen."""

    name = "pissa"
    Config = PissaConfig


# --------------------------------------------------------------------------------------------------------------
#                                                     VeRA
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA: dW = diag(b) B diag(d) A with A (r x in) and B (out x r) frozen random matrices shared by all layers and
    the vectors d (r) and b (out) trained per layer (Kopiczko et al., arXiv 2310.11454)."""

    label = "vera"

    rank: int = 256
    """Width r of the shared random projections (docs/methods.md §6.2: 256)."""
    d_initial: float = 0.1
    """Initial value of every entry of d (b starts at 0, so the adapter starts as a no-op)."""
    projection_seed: int = 0
    """Seed of the shared random projections A and B (peft ``projection_prng_key``)."""
    save_projection: bool = True
    """Store A and B in ``state_to_save`` (one copy each; peft's default) rather than regenerating them."""
    dropout: float = 0.0
    """Dropout on the adapter input (peft ``vera_dropout``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.label, "rank", self.rank)
        check_dropout(self.label, "dropout", self.dropout)
        check_positive_int(self.label, "projection_seed", self.projection_seed, minimum=0)
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise MethodError(f"vera d_initial must be a number, got {self.d_initial!r}")


class VeraMethod(PeftAdapterMethod):
    """VeRA (peft): per-layer scaling vectors over frozen random projections shared across layers."""

    name = "vera"
    Config = VeraConfig
    tuner_layer = VeraLayer

    def peft_config(self, targets: list[str]) -> peft.PeftConfig:
        cfg = self.config
        return peft.VeraConfig(r=cfg.rank, d_initial=cfg.d_initial, projection_prng_key=cfg.projection_seed,
                               save_projection=cfg.save_projection, vera_dropout=cfg.dropout, bias="none",
                               target_modules=list(targets))

    def attach(self, model: nn.Module, targets: list[str]) -> None:
        super().attach(model, targets)
        # peft hands every layer the same BufferDict *module*. torch.func.functional_call (bench.models.accounting's
        # meta FLOP count) cannot restore a submodule reachable under several paths and would leave the projections on
        # the meta device; one BufferDict per layer holding the same two tensors behaves identically and does not.
        for layer in tuner_layers(model, VeraLayer).values():
            for attr in ("vera_A", "vera_B"):
                shared = getattr(layer, attr)
                setattr(layer, attr, BufferDict(dict(shared.items()), persistent=shared.persistent))
            use_cheaper_path(layer)

    def rank_candidates(self, shapes: list[tuple[int, int]]) -> list[int]:
        # r counts VeRA's frozen random rank-1 directions b_i a_i^T, each scaled by its own trained entry of d: past
        # the width they still add directions (the VeRA paper trains r = 1024 on 768-wide RoBERTa-base), up to out x in
        # of the smallest matrix. Capping r at the width, as for LoRA, left VeRA's KIND-budget row below its standard
        # r = 256 on 64-wide layers.
        return list(range(1, min(out * inp for out, inp in shapes) + 1))

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if not self.config.save_projection:
            return {}
        # Every layer references the same two buffers; named_buffers lists each once, under its first path.
        return {name: buf.detach() for name, buf in model.named_buffers()
                if name.endswith((f"vera_A.{ADAPTER}", f"vera_B.{ADAPTER}"))}


# --------------------------------------------------------------------------------------------------------------
#                                            Orthogonal fine-tuning: OFT
# --------------------------------------------------------------------------------------------------------------


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


@dataclass
class OftConfig(AdapterConfig):
    """OFT: W = W0 R with R block-diagonal orthogonal, each block the Cayley transform (I + Q)(I - Q)^-1 of a
    trained skew-symmetric Q (zero init, R = I) acting on the input features (Qiu et al., arXiv 2306.07280)."""

    label = "oft"

    block_size: int = 32
    """Size b of each orthogonal block (peft ``oft_block_size``; its default); must divide every adapted Linear's
    in_features. Trainable per layer: in * (b - 1) / 2. Set 0 to give ``blocks`` instead."""
    blocks: int = 0
    """Number of blocks per layer instead of a block size (peft ``r``; the OFT paper's "r = 4"), 0 = use
    ``block_size``. Exactly one of the two is non-zero."""
    coft: bool = False
    """Constrained OFT: project R back to within ``eps`` of the identity after every step."""
    eps: float = 6e-5
    """COFT's radius (peft's default)."""
    block_share: bool = False
    """Share one block across the whole layer."""
    cayley_neumann: bool = False
    """Approximate the Cayley inverse by a Neumann series (faster, inexact); the exact transform by default."""
    dropout: float = 0.0
    """Multiplicative block dropout (peft ``module_dropout``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.label, "block_size", self.block_size, minimum=0)
        check_positive_int(self.label, "blocks", self.blocks, minimum=0)
        if (self.block_size == 0) == (self.blocks == 0):
            raise MethodError(f"oft needs exactly one of block_size and blocks non-zero, got block_size="
                              f"{self.block_size}, blocks={self.blocks}")
        check_dropout(self.label, "dropout", self.dropout)


class OftMethod(PeftAdapterMethod):
    """OFT (peft): a trained block-diagonal orthogonal rotation of each adapted Linear's input."""

    name = "oft"
    Config = OftConfig
    tuner_layer = OFTLayer
    rank_option = "block_size"

    def peft_config(self, targets: list[str]) -> peft.PeftConfig:
        cfg = self.config
        return peft.OFTConfig(r=cfg.blocks, oft_block_size=cfg.block_size, coft=cfg.coft, eps=cfg.eps,
                              block_share=cfg.block_share, use_cayley_neumann=cfg.cayley_neumann,
                              module_dropout=cfg.dropout, bias="none", target_modules=list(targets))

    def check_targets(self, probe: nn.Module, targets: list[str]) -> None:
        # peft silently moves a block size (or count) that does not divide a layer to the nearest one that does.
        cfg = self.config
        for name in targets:
            width = probe.get_submodule(name).in_features
            size, what = (cfg.block_size, "block_size") if cfg.block_size else (cfg.blocks, "blocks")
            if width % size:
                raise MethodError(f"oft {what} = {size} does not divide in_features = {width} of {name}; choose "
                                  f"one of {_divisors(width)}")

    def budget_options(self, value: int) -> dict[str, int]:
        return {"block_size": value, "blocks": 0}

    def rank_candidates(self, shapes: list[tuple[int, int]]) -> list[int]:
        # Block sizes dividing every adapted input width (1 would train nothing: a 1x1 skew matrix is 0).
        common = math.gcd(*(width for _, width in shapes))
        return [b for b in _divisors(common) if b > 1]


# --------------------------------------------------------------------------------------------------------------
#                                          LyCORIS family: LoHa, LoKr
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LycorisConfig(AdapterConfig):
    """Options shared by LoHa and LoKr (peft's LyCORIS tuners)."""

    label = "lycoris"

    rank: int = 16
    """Rank r of the low-rank factors."""
    alpha: float | None = None
    """The update is scaled by alpha / rank; None means alpha = rank."""
    rank_dropout: float = 0.0
    """Dropout over the rank dimension during training."""
    module_dropout: float = 0.0
    """Probability of disabling the whole adapter for a training step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.label, "rank", self.rank)
        if self.alpha is None:
            self.alpha = float(self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise MethodError(f"{self.label} alpha must be positive, got {self.alpha!r}")
        check_dropout(self.label, "rank_dropout", self.rank_dropout)
        check_dropout(self.label, "module_dropout", self.module_dropout)


@dataclass
class LohaConfig(LycorisConfig):
    """LoHa: dW = (B1 A1) * (B2 A2), a Hadamard product of two rank-r products (Hyeon-Woo et al., FedPara,
    arXiv 2108.06098); trainable per layer 2 r (in + out)."""

    label = "loha"


class LohaMethod(PeftAdapterMethod):
    """LoHa (peft): Hadamard product of two low-rank updates."""

    name = "loha"
    Config = LohaConfig
    tuner_layer = LoHaLayer

    def peft_config(self, targets: list[str]) -> peft.PeftConfig:
        cfg = self.config
        return peft.LoHaConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.rank_dropout,
                               module_dropout=cfg.module_dropout, target_modules=list(targets))


@dataclass
class LokrConfig(LycorisConfig):
    """LoKr: dW = W1 (x) W2, a Kronecker product with out = a * b, in = c * d factorised near the square roots; W1
    (a x c) is dense, W2 (b x d) is a rank-r product B2 A2 while r < max(b, d) / 2 and dense beyond (Yeh et al.,
    LyCORIS, arXiv 2309.14859)."""

    label = "lokr"

    decompose_both: bool = False
    """Also factor W1 as a rank-r product."""
    decompose_factor: int = -1
    """Kronecker factorisation divider; -1 picks factors near the square root of each dimension."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or \
                (self.decompose_factor != -1 and self.decompose_factor < 1):
            raise MethodError(f"lokr decompose_factor must be -1 or a positive int, got {self.decompose_factor!r}")


class LokrMethod(PeftAdapterMethod):
    """LoKr (peft): Kronecker product of a dense small factor and a low-rank factor."""

    name = "lokr"
    Config = LokrConfig
    tuner_layer = LoKrLayer

    def peft_config(self, targets: list[str]) -> peft.PeftConfig:
        cfg = self.config
        return peft.LoKrConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.rank_dropout,
                               module_dropout=cfg.module_dropout, decompose_both=cfg.decompose_both,
                               decompose_factor=cfg.decompose_factor, target_modules=list(targets))
