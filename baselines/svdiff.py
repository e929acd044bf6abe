"""SVDiff (Han et al., ICCV 2023, arXiv 2303.11305): fine-tune only the spectral shifts of each target weight.

Each target Linear W0 = U diag(sigma) V^T (thin SVD, all min(out, in) components, computed once at build time from
the ancestry weight) becomes W = U diag(relu(sigma + delta)) V^T with U, sigma, V frozen and the spectral shift
delta (zero init, so the model starts as the ancestry up to SVD round-off) trained. peft has no SVDiff, so this is
native: module surgery replaces each target ``nn.Linear`` by a ``SpectralShiftLinear`` that keeps the original bias
Parameter (and so its name), and ``merge`` folds the shifted spectrum back into a dense ``nn.Linear``.

Each call takes the cheaper of two exact evaluations by MAC count (``methods.decomposed.low_rank_step_macs``): form
W (``out * k * in`` MACs, independent of the batch) and run a dense ``F.linear``, as the paper's implementation
does, or stay factored, ``((x V) * relu(sigma + delta)) Uᵀ`` (``k * (in + out)`` MACs per token, and no dense weight
gradient, since only the spectrum trains). At a small batch re-forming W cost more than the layer's own matmuls
(``benchmarks/methods_cost.py`` measured 1.53x full fine-tuning at batch 2); at a large batch the formed path wins.
The frozen factors are kept as (frozen) Parameters: they are inherited
from the ancestry, and for a square matrix they hold twice the values of W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from baselines.adapters import AdapterConfig, AdapterMethod, check_lr_scale
from methods.decomposed import factored_is_cheaper, factored_linear, svd_factors
from methods.surgery import plain_linear, set_submodule


class SpectralShiftLinear(nn.Module):
    """y = x (U diag(relu(sigma + delta)) V^T)^T + b with U, sigma, V frozen and the shift ``svdiff_delta`` trained."""

    def __init__(self, in_features: int, out_features: int, *, bias: nn.Parameter | None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        rank = min(in_features, out_features)
        kw = {"device": device, "dtype": dtype}
        self.svdiff_U = nn.Parameter(torch.empty(out_features, rank, **kw), requires_grad=False)
        self.svdiff_sigma = nn.Parameter(torch.empty(rank, **kw), requires_grad=False)
        self.svdiff_V = nn.Parameter(torch.empty(in_features, rank, **kw), requires_grad=False)
        self.svdiff_delta = nn.Parameter(torch.zeros(rank, **kw))
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SpectralShiftLinear:
        """The SVD of ``linear.weight`` (float64, then the weight's dtype), sharing ``linear.bias`` itself."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        u, sigma, v = svd_factors(linear.weight, min(linear.in_features, linear.out_features))
        with torch.no_grad():
            layer.svdiff_U.copy_(u)
            layer.svdiff_sigma.copy_(sigma)
            layer.svdiff_V.copy_(v)
        return layer

    def weight(self) -> torch.Tensor:
        """The dense weight U diag(relu(sigma + delta)) V^T, shape (out_features, in_features)."""
        spectrum = F.relu(self.svdiff_sigma + self.svdiff_delta)
        return (self.svdiff_U * spectrum) @ self.svdiff_V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grads = {"grad_spectrum": self.svdiff_delta.requires_grad,
                 "grad_factors": self.svdiff_U.requires_grad or self.svdiff_V.requires_grad}
        if factored_is_cheaper(x, self.out_features, self.in_features, self.svdiff_sigma.numel(), **grads):
            spectrum = F.relu(self.svdiff_sigma + self.svdiff_delta)
            return factored_linear(x, self.svdiff_U, spectrum, self.svdiff_V, self.bias)
        return F.linear(x, self.weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing exactly this layer (same weight tensor as the forward forms)."""
        return plain_linear(self.weight().detach(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.svdiff_sigma.numel()}"


@dataclass
class SvdiffConfig(AdapterConfig):
    """SVDiff: train the spectral shift delta of every target matrix (docs/methods.md §6.3)."""

    label = "svdiff"

    delta_lr_scale: float = 10.0
    """Learning-rate multiplier of the spectral shifts: docs/methods.md §6.5: ~1e-3 for delta, 10x the DiT recipe's
    1e-4. The class table and the final layer keep the base rate, as in every method."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr_scale(self.label, "delta_lr_scale", self.delta_lr_scale)


def spectral_layers(model: nn.Module) -> dict[str, SpectralShiftLinear]:
    """Every ``SpectralShiftLinear`` in ``model``, by qualified name (found by type)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SpectralShiftLinear)}


class SvdiffMethod(AdapterMethod):
    """SVDiff on a frozen dense DiT: spectral shifts of the target matrices, plus class embeddings and final layer."""

    name = "svdiff"
    Config = SvdiffConfig

    def attach(self, model: nn.Module, targets: list[str]) -> None:
        for name in targets:
            set_submodule(model, name, SpectralShiftLinear.from_linear(model.get_submodule(name)))

    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{prefix}.svdiff_delta": layer.svdiff_delta for prefix, layer in spectral_layers(model).items()}

    def group_lr_scale(self, group: str) -> float:
        return self.config.delta_lr_scale if group == "adapter" else 1.0

    def unwrap(self, model: nn.Module) -> None:
        for name, layer in spectral_layers(model).items():
            set_submodule(model, name, layer.to_linear())
