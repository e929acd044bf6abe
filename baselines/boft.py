"""BOFT (Liu et al., ICLR 2024, arXiv 2311.06243), native: a butterfly-factorised orthogonal rotation of each adapted
Linear's input, plus a trained per-output scale.

    y = s * (x R Wᵀ) + b,   R = M_{m-1} ... M_1 M_0,   M_i = P_i D_i P_iᵀ

with W, b frozen, ``D_i`` block-diagonal with ``in / b`` orthogonal ``b x b`` blocks, each the Cayley transform
``(I - S)(I + S)^-1`` of the skew part ``S = (A - Aᵀ) / 2`` of a trained block ``A`` (zero init, so R = I), and
``P_i`` the butterfly permutation of factor i. The parametrisation (``boft_R`` of shape (m, in / b, b, b), ``boft_s``
one scale per output, the permutations) is peft's, and ``tests/test_boft.py`` checks the rotation against peft's
own construction.

Why native, when peft has BOFT: peft forms R as a dense ``in x in`` matrix at every forward (``m`` dense
``in x in x in`` products with its permutation matrices, then ``x @ R``), which cost 8.2x full fine-tuning per step
at DiT-B/2 in ``benchmarks/methods_cost.py`` (the peft version's row is in the git history of
``results/benchmarks/methods_cost_cpu.md``), and builds m > 1 only with a CUDA extension.
Here the factors act on the activations: a gather, ``in * b`` MACs per token for the blocks, and a gather back, per
factor; R itself is formed only by ``merge``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from baselines.adapters import AdapterConfig, AdapterMethod, check_dropout, check_positive_int
from methods.base import MethodError
from methods.surgery import plain_linear, set_submodule


def butterfly_permutation(width: int, block_size: int, factor: int) -> torch.Tensor:
    """Indices ``perm`` of butterfly factor ``factor``'s permutation P (``P[j, perm[j]] = 1``), as peft builds it:
    within each chunk of ``block_size * 2**factor`` features, the half-blocks (``block_size / 2`` features each) are
    reordered even-numbered first, then odd-numbered. Factor 0 is the identity."""
    chunk = block_size * 2 ** factor
    if width % chunk:
        raise MethodError(f"boft: block_size * 2^factor = {chunk} does not divide {width} features")
    if factor == 0:
        return torch.arange(width)
    half = block_size // 2
    order = [*range(0, chunk // half, 2), *range(1, chunk // half, 2)]
    within = torch.cat([torch.arange(k * half, (k + 1) * half) for k in order])
    return torch.cat([start + within for start in range(0, width, chunk)])


def cayley(blocks: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``(I - S)(I + S)^-1`` of the skew part S of each ``b x b`` matrix in ``blocks`` (..., b, b)."""
    # The solve runs in at least fp32: LAPACK has no bf16/fp16 kernels, and a half-precision inverse would not
    # stay orthogonal.
    work = blocks.to(torch.promote_types(blocks.dtype, torch.float32))
    skew = 0.5 * (work - work.transpose(-1, -2))
    eye = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(blocks.dtype)


class ButterflyOrthogonalLinear(nn.Module):
    """A frozen Linear whose input is rotated by BOFT's butterfly orthogonal matrix and whose output is scaled.

    ``weight`` and ``bias`` are the original Linear's own Parameters (so their names stay DiT's); ``boft_R`` and
    ``boft_s`` are the trained tensors. The permutation indices are non-persistent buffers: they follow from the
    shapes alone.
    """

    def __init__(self, linear: nn.Linear, block_size: int, factors: int, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size, self.factors, self.dropout = block_size, factors, dropout
        self.weight, self.bias = linear.weight, linear.bias
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        blocks = self.in_features // block_size
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, block_size, block_size, **kw))
        self.boft_s = nn.Parameter(torch.ones(self.out_features, **kw))
        perms = torch.stack([butterfly_permutation(self.in_features, block_size, i) for i in range(factors)])
        self.register_buffer("boft_perm", perms.to(linear.weight.device), persistent=False)
        self.register_buffer("boft_inverse", torch.argsort(perms, dim=-1).to(linear.weight.device), persistent=False)

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks of every factor, (m, in / b, b, b); in training with ``dropout`` > 0, peft's
        multiplicative dropout: a fraction ``dropout`` of one random factor's blocks is replaced by the identity."""
        blocks = cayley(self.boft_R)
        if not (self.training and self.dropout > 0):
            return blocks
        count = blocks.shape[1]
        dropped = torch.zeros(self.factors, count, 1, 1, dtype=blocks.dtype, device=blocks.device)
        factor = int(torch.randint(self.factors, ()))
        chosen = torch.randperm(count, device=blocks.device)[: int(self.dropout * count)]
        dropped[factor, chosen] = 1
        eye = torch.eye(self.block_size, dtype=blocks.dtype, device=blocks.device)
        return (1 - dropped) * blocks + dropped * eye

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` over the last dimension, one factor at a time (``M_{m-1}`` first), never forming R."""
        blocks = self.rotations().to(x.dtype)
        lead = x.shape[:-1]
        for i in reversed(range(self.factors)):
            permuted = i > 0  # factor 0's permutation is the identity: skip its two gathers
            z = x[..., self.boft_inverse[i]] if permuted else x  # x P_i
            z = torch.einsum("...kb,kbc->...kc", z.reshape(*lead, -1, self.block_size), blocks[i])  # x P_i D_i
            z = z.reshape(*lead, self.in_features)
            x = z[..., self.boft_perm[i]] if permuted else z  # x P_i D_i P_iᵀ
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.rotate(x), self.weight) * self.boft_s
        return y + self.bias if self.bias is not None else y

    def merged_weight(self) -> torch.Tensor:
        """``diag(s) W Rᵀ``: the weight of a plain Linear computing this layer (R formed once, from the identity)."""
        eye = torch.eye(self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        was_training = self.training
        self.eval()  # no block dropout in the merged weight
        try:
            rotation = self.rotate(eye)
        finally:
            self.train(was_training)
        return self.boft_s[:, None] * (self.weight @ rotation.T)

    def to_linear(self) -> nn.Linear:
        return plain_linear(self.merged_weight().detach(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"factors={self.factors}")


def butterfly_layers(model: nn.Module) -> dict[str, ButterflyOrthogonalLinear]:
    """Every ``ButterflyOrthogonalLinear`` in ``model``, by qualified name (found by type)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ButterflyOrthogonalLinear)}


@dataclass
class BoftConfig(AdapterConfig):
    """BOFT: OFT whose orthogonal matrix is a product of ``butterfly_factor`` block-diagonal factors interleaved with
    butterfly permutations, plus a trained per-output scale (docs/methods.md §6.3)."""

    label = "boft"

    block_size: int = 8
    """Size b of each orthogonal block (peft ``boft_block_size``); every adapted in_features must be a multiple of
    b * 2^(butterfly_factor - 1). Trainable per layer: butterfly_factor * in * b + out (full b x b blocks, of which
    the skew part acts, as in peft)."""
    butterfly_factor: int = 2
    """Number m of butterfly factors (peft ``boft_n_butterfly_factor``); 1 is OFT with an output scale."""
    dropout: float = 0.0
    """Multiplicative block dropout (peft ``boft_dropout``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.label, "block_size", self.block_size, minimum=2)
        check_positive_int(self.label, "butterfly_factor", self.butterfly_factor)
        check_dropout(self.label, "dropout", self.dropout)
        if self.butterfly_factor > 1 and self.block_size % 2:
            raise MethodError(f"boft block_size must be even with butterfly_factor > 1, got {self.block_size}")


class BoftMethod(AdapterMethod):
    """BOFT on a frozen dense DiT: butterfly orthogonal input rotations and output scales on the target Linears,
    plus re-initialised class embeddings and a trained final layer."""

    name = "boft"
    Config = BoftConfig
    rank_option = "block_size"

    def check_targets(self, probe: nn.Module, targets: list[str]) -> None:
        span = self.config.block_size * 2 ** (self.config.butterfly_factor - 1)
        for name in targets:
            width = probe.get_submodule(name).in_features
            if width % span:
                raise MethodError(f"boft block_size * 2^(butterfly_factor - 1) = {span} does not divide "
                                  f"in_features = {width} of {name}")

    def attach(self, model: nn.Module, targets: list[str]) -> None:
        cfg = self.config
        for name in targets:
            layer = ButterflyOrthogonalLinear(model.get_submodule(name), cfg.block_size, cfg.butterfly_factor,
                                              cfg.dropout)
            set_submodule(model, name, layer)

    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for prefix, layer in butterfly_layers(model).items():
            params[f"{prefix}.boft_R"] = layer.boft_R
            params[f"{prefix}.boft_s"] = layer.boft_s
        return params

    def unwrap(self, model: nn.Module) -> None:
        for name, layer in butterfly_layers(model).items():
            set_submodule(model, name, layer.to_linear())

    def rank_candidates(self, shapes: list[tuple[int, int]]) -> list[int]:
        """Block sizes for which every adapted width is a multiple of b * 2^(m - 1) (even b when m > 1)."""
        span = 2 ** (self.config.butterfly_factor - 1)
        step = 2 if self.config.butterfly_factor > 1 else 1
        common = math.gcd(*(width for _, width in shapes))
        return [b for b in range(2, common + 1, step) if common % (b * span) == 0]

    def budget_options(self, value: int) -> dict[str, int]:
        return {"block_size": value}
