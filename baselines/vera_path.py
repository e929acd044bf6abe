"""VeRA's layer evaluated by the cheaper of two exact paths.

peft's ``vera.Linear`` always runs the adapter through its projections: ``b * ((d * (x Aᵀ)) Bᵀ)``, ``r * (in + out)``
multiply-accumulates per token each way. A VeRA rank is usually far above the layer's width (the paper trains
r = 1024 on 768-wide layers; a rank matched to KIND's trainable count on 64-wide layers is in the thousands), and
there forming ``W + diag(b) B diag(d) A`` once per call (``out * r * in``, independent of the batch) and running one
dense matmul costs a small fraction: on the small suite's 64-wide DiT at batch 32 the matched-rank row trained about
10x slower than LoRA. Both paths compute the same function and the same gradients for ``d`` and ``b``; which one
runs is chosen per call by ``methods.decomposed.low_rank_step_macs``, as SVDiff's layer does.
"""

from __future__ import annotations

import torch
from peft.tuners.vera.layer import Linear as PeftVeraLinear
from torch import nn
from torch.nn import functional as F

from methods.decomposed import factored_is_cheaper


class CheaperPathVeraLinear(PeftVeraLinear):
    """peft's VeRA ``Linear`` (same parameters, buffers, merge and state dict) whose forward forms the adapted weight
    when that costs fewer multiply-accumulates than peft's projection path; everything peft's forward handles that
    the formed path does not (dropout, several or disabled adapters, merged weights, extra arguments) stays peft's."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._formable_adapter(args, kwargs)
        if adapter is None or factored_is_cheaper(x, self.out_features, self.in_features,
                                                  self.vera_A[adapter].shape[0], grad_spectrum=True,
                                                  grad_factors=False):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        weight = base.weight + self.get_delta_weight(adapter).to(base.weight.dtype)
        return F.linear(x.to(weight.dtype), weight, base.bias).to(x.dtype)

    def _formable_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when the formed path computes what peft's forward would, else None."""
        if self.disable_adapters or self.merged or args or kwargs or not isinstance(self.base_layer, nn.Linear) \
                or self.fan_in_fan_out:
            return None
        active = [name for name in self.active_adapters if name in self.vera_lambda_d]
        if len(active) != 1 or not isinstance(self.vera_dropout[active[0]], nn.Identity):
            return None
        return active[0]


def use_cheaper_path(layer: PeftVeraLinear) -> None:
    """Make one injected peft VeRA ``Linear`` evaluate by the cheaper exact path (its class changes, nothing else)."""
    if type(layer) is not PeftVeraLinear:
        raise TypeError(f"expected peft's vera Linear, got {type(layer).__name__}")
    layer.__class__ = CheaperPathVeraLinear
