"""BitFit and DiffFit: train the bias terms (DiffFit: plus learnable branch scales) of a frozen dense DiT.

**BitFit** (Ben Zaken et al., arXiv 2106.10199) trains only the bias terms: here every bias of every ``nn.Linear``,
``nn.Conv2d`` and affine norm in the DiT (patch embedder, timestep MLP, q/k/v, attention output, MLP, adaLN
modulation), found by module type, plus the benchmark's new class embeddings and final layer.

**DiffFit** (Xie et al., ICCV 2023, arXiv 2304.06648) adds to BitFit's set the norms' affine weights and a learnable
scale factor gamma (init 1) in each block, multiplying the attention branch and the MLP branch before the residual
add: x + gate * gamma_1 * Attn(...), x + gate * gamma_2 * MLP(...). Our reading of the paper is in
``baselines/README.md``: DiT's LayerNorms have no affine parameters, so "normalization" adds nothing on a stock DiT;
the class embedding is re-initialised and trained (``reinit``); gamma is per channel by default (``gamma_shape``).
Because both branches end in a Linear (``attn.proj``, ``mlp.fc2``), gamma lives on that Linear: a
``ScaledLinear`` keeps the Linear's own weight and bias Parameters (and names) and multiplies its output by gamma,
and ``merge`` folds gamma into the weight and bias exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from baselines.adapters import AdapterConfig, AdapterMethod, check_lr_scale
from methods.base import MethodError
from methods.surgery import plain_linear, set_submodule

#: The Linear that ends each branch of a DiT block: gamma_1 scales the attention branch, gamma_2 the MLP branch.
BRANCH_OUTPUTS = ("attn.proj", "mlp.fc2")
_GAMMA_SHAPES = ("channel", "scalar")
_GAMMA_BLOCKS = ("all", "first_half")


class ScaledLinear(nn.Module):
    """``F.linear(x, W, b) * difffit_gamma``: an ``nn.Linear``'s own weight and bias plus a trained output scale."""

    def __init__(self, linear: nn.Linear, per_channel: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        size = linear.out_features if per_channel else 1
        self.difffit_gamma = nn.Parameter(torch.ones(size, device=linear.weight.device, dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.difffit_gamma

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with gamma folded in: W' = diag(gamma) W, b' = gamma * b."""
        gamma = self.difffit_gamma.detach()
        return plain_linear(self.weight.detach() * gamma.unsqueeze(1),
                            None if self.bias is None else self.bias.detach() * gamma)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"gamma={tuple(self.difffit_gamma.shape)}"


#: Module types whose ``bias`` is a bias term (BitFit) and norms whose ``weight`` is an affine scale (DiffFit).
_BIASED = (nn.Linear, nn.Conv2d, ScaledLinear, nn.LayerNorm, nn.GroupNorm)
_NORMS = (nn.LayerNorm, nn.GroupNorm)


def bias_terms(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every bias term in ``model`` (the ``bias`` of Linears, convolutions, scaled Linears and affine norms)."""
    return {f"{name}.bias" if name else "bias": module.bias for name, module in model.named_modules()
            if isinstance(module, _BIASED) and isinstance(getattr(module, "bias", None), nn.Parameter)}


def norm_scales(model: nn.Module) -> dict[str, nn.Parameter]:
    """The affine weights of every norm layer that has one (none in a stock DiT: its LayerNorms are not affine)."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, _NORMS) and isinstance(getattr(module, "weight", None), nn.Parameter)}


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: bias terms only, plus the new class embeddings and the final layer (docs/methods.md §6.3)."""

    label = "bitfit"
    needs_targets = False

    targets: tuple[str, ...] = ()
    """Not used: BitFit trains every bias term, not particular matrices."""
    lr_scale: float = 10.0
    """Learning-rate multiplier of the method's own tensors (biases, scales): docs/methods.md §6.5: lr 1e-3, 10x the
    DiT recipe's 1e-4. The class table and the final layer keep the base rate, as in every method."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr_scale(self.label, "lr_scale", self.lr_scale)


class BitFitMethod(AdapterMethod):
    """BitFit on a frozen dense DiT: every bias term, the new class embeddings and the final layer are trained."""

    name = "bitfit"
    Config = BitFitConfig

    def attach(self, model: nn.Module, targets: list[str]) -> None:
        """BitFit adds no layer."""

    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {}

    def tuned_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return bias_terms(model)

    def group_lr_scale(self, group: str) -> float:
        return self.config.lr_scale if group in ("adapter", "tuned") else 1.0

    def unwrap(self, model: nn.Module) -> None:
        """Nothing to fold: BitFit trains tensors in place."""


@dataclass
class DiffFitConfig(BitFitConfig):
    """DiffFit: BitFit plus norm affine weights and a learnable scale on each block's attention and MLP branch."""

    label = "difffit"

    gamma_blocks: str | tuple[int, ...] = "all"
    """Blocks that get the scale factors: ``all`` (docs/methods.md §6.5: "per-block scale"), ``first_half`` (the
    placement the paper's ablation reports best for DiT-XL/2, blocks 1-14 of 28, as we read it), or block indices."""
    gamma_shape: str = "channel"
    """``channel``: gamma is a vector over the hidden width (LayerScale-style); ``scalar``: one number per branch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.gamma_blocks, str):
            if self.gamma_blocks not in _GAMMA_BLOCKS:
                raise MethodError(f"difffit gamma_blocks must be one of {_GAMMA_BLOCKS} or block indices, got "
                                  f"{self.gamma_blocks!r}")
        else:
            self.gamma_blocks = tuple(self.gamma_blocks)
            if not self.gamma_blocks or len(set(self.gamma_blocks)) != len(self.gamma_blocks) or any(
                    isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.gamma_blocks):
                raise MethodError(f"difffit gamma_blocks must be distinct non-negative block indices, got "
                                  f"{self.gamma_blocks!r}")
        if self.gamma_shape not in _GAMMA_SHAPES:
            raise MethodError(f"difffit gamma_shape must be one of {_GAMMA_SHAPES}, got {self.gamma_shape!r}")

    def block_indices(self, depth: int) -> list[int]:
        """The indices of the blocks that get scale factors in a DiT of ``depth`` blocks."""
        if self.gamma_blocks == "all":
            return list(range(depth))
        if self.gamma_blocks == "first_half":
            return list(range(max(1, depth // 2)))
        outside = [i for i in self.gamma_blocks if i >= depth]
        if outside:
            raise MethodError(f"difffit gamma_blocks {outside} out of range for a DiT with {depth} blocks")
        return sorted(self.gamma_blocks)


def scaled_layers(model: nn.Module) -> dict[str, ScaledLinear]:
    """Every ``ScaledLinear`` in ``model``, by qualified name (found by type)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ScaledLinear)}


class DiffFitMethod(BitFitMethod):
    """DiffFit on a frozen dense DiT: BitFit's tensors plus per-block branch scales gamma (init 1)."""

    name = "difffit"
    Config = DiffFitConfig

    def check_targets(self, probe: nn.Module, targets: list[str]) -> None:
        self.config.block_indices(len(probe.blocks))  # out-of-range indices fail before any weights are loaded

    def attach(self, model: nn.Module, targets: list[str]) -> None:
        for path in self._branch_outputs(model):
            set_submodule(model, path, ScaledLinear(model.get_submodule(path),
                                                    per_channel=self.config.gamma_shape == "channel"))

    def _branch_outputs(self, model: nn.Module) -> Iterable[str]:
        for index in self.config.block_indices(len(model.blocks)):
            for suffix in BRANCH_OUTPUTS:
                yield f"blocks.{index}.{suffix}"

    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{prefix}.difffit_gamma": layer.difffit_gamma for prefix, layer in scaled_layers(model).items()}

    def tuned_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {**bias_terms(model), **norm_scales(model)}

    def unwrap(self, model: nn.Module) -> None:
        for name, layer in scaled_layers(model).items():
            set_submodule(model, name, layer.to_linear())
