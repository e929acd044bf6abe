"""TLEG (Xia et al., "Transformer as Linear Expansion of Learngene", AAAI 2024, arXiv 2312.05614; docs/methods.md
§5.6).

The learngene is two parameter sets per block parameter, theta_A (``tleg_base``) and theta_B (``tleg_step``). Layer
``l`` of an ``L``-layer model uses theta_l = theta_A + c_l theta_B, a linear function of depth, for every Linear of
the block (q/k/v, output projection, fc1, fc2 and the adaLN modulation, weights and biases; DiT's LayerNorms have
no affine). Embedders and the final layer are ordinary, unconstrained parameters.

* ``ancestry``: an auxiliary DiT of the suite's depth built this way, trained by the diffusion loss plus the
  distillation of a pre-trained dense DiT's ε-prediction (the ``teacher``).
* ``transfer`` / ``descend`` / ``domain``: a plain DiT of any depth ``L'`` initialised by the same expansion at
  ``L'`` (c_l recomputed for ``L'``), then trained in full without the linear constraint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.func import functional_call

from baselines.size_transfer import (
    GeneratedBlocks,
    SizeTransferConfig,
    SizeTransferMethod,
    dit_block_init,
    refuse_partitioned,
)
from bench.models.dit import DiTBlock
from methods.base import MethodError

#: Rules for the expansion coefficient c_l of layer l = 0 .. L-1.
COEFFICIENTS = ("l/L", "l/(L-1)")
STEP_INITS = ("dit", "zeros")
RULE_KEY = "blocks.tleg_coefficient"


def expansion_coefficient(layer: int, depth: int, rule: str = "l/L") -> float:
    """c_l of TLEG's linear expansion: ``l/L`` (the official code, 0 .. (L-1)/L) or ``l/(L-1)`` (0 .. 1)."""
    if rule == "l/L":
        return layer / depth
    if rule == "l/(L-1)":
        return layer / (depth - 1) if depth > 1 else 0.0
    raise MethodError(f"unknown TLEG coefficient rule {rule!r}; valid: {COEFFICIENTS}")


class LinearExpansionBlocks(GeneratedBlocks):
    """Every layer's block parameters are ``tleg_base + c_l * tleg_step`` (each a full ``DiTBlock`` of tensors)."""

    def __init__(self, template: DiTBlock, depth: int, coefficient: str, step_init: str):
        super().__init__(template, depth)
        self.coefficient = coefficient
        # Recorded in the export, so a descendant expands with the rule its ancestry was trained with.
        self.register_buffer("tleg_coefficient", torch.tensor(COEFFICIENTS.index(coefficient)))
        self.tleg_base = template
        self.tleg_step = copy.deepcopy(template)
        if step_init == "dit":  # a draw of its own, not a copy of theta_A
            dit_block_init(self.tleg_step)
        else:
            for param in self.tleg_step.parameters():
                torch.nn.init.zeros_(param)

    def layer_params(self, layer: int, depth: int) -> dict[str, torch.Tensor]:
        c = expansion_coefficient(layer, depth, self.coefficient)
        step = dict(self.tleg_step.named_parameters())
        return {name: base + c * step[name] for name, base in self.tleg_base.named_parameters()}

    def run_layer(self, layer: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        refuse_partitioned(self, "TLEG's auxiliary model")
        # The stock block, called with the generated tensors in place of its own (gradients reach A and B).
        return functional_call(self.tleg_base, self.layer_params(layer, self.depth), (x, c))


@dataclass
class TlegConfig(SizeTransferConfig):
    """TLEG's options (docs/methods.md §5.6)."""

    coefficient: str = "l/L"
    """Expansion coefficient of layer l (0-based) in an L-layer model: ``l/L`` as in the official code (default),
    or ``l/(L-1)`` (the first and last layers get theta_A and theta_A + theta_B). Chosen when the auxiliary model
    is built; descendants use the rule recorded in their ancestry (buffer ``blocks.tleg_coefficient``)."""
    step_init: str = "dit"
    """Initialisation of theta_B in the auxiliary model: ``dit`` (DiT's init, drawn independently of theta_A:
    Xavier Linears, zero adaLN) or ``zeros`` (every layer starts equal to theta_A). Our choice; the paper is silent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coefficient not in COEFFICIENTS:
            raise MethodError(f"coefficient must be one of {COEFFICIENTS}, got {self.coefficient!r}")
        if self.step_init not in STEP_INITS:
            raise MethodError(f"step_init must be one of {STEP_INITS}, got {self.step_init!r}")


class TlegMethod(SizeTransferMethod):
    """TLEG: pre-train theta_A, theta_B in a linearly expanded auxiliary DiT; initialise descendants of any depth."""

    name = "tleg"
    Config = TlegConfig
    ancestry_methods = ("tleg",)

    def make_blocks(self, template: DiTBlock, depth: int,
                    state: dict[str, torch.Tensor] | None) -> LinearExpansionBlocks:
        coefficient = self.config.coefficient
        if state is not None:
            if RULE_KEY not in state:
                raise MethodError(f"the ancestry has no {RULE_KEY!r}: not an exported TLEG auxiliary model")
            coefficient = COEFFICIENTS[int(state[RULE_KEY])]
        return LinearExpansionBlocks(template, depth, coefficient, self.config.step_init)
