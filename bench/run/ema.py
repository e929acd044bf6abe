"""fp32 exponential moving average of the trainable parameters.

Only what the method trains is averaged (DiT's ``update_ema`` averaged every parameter, frozen ones included, a
TODO in its code): frozen tensors equal the ancestry's. The EMA is held in fp32 because a bf16 tensor updated with
decay 0.9999 never moves (docs/harness.md §5.3). Values come from ``TrainEngine.full_fp32_params``, which returns the
exact fp32 masters under DeepSpeed bf16 and ZeRO-3 (a collective: every rank updates, so every rank holds the same
EMA and any rank can save it).
"""

from __future__ import annotations

import torch
from torch import nn

from bench.run.engine import TrainEngine


class EMA:
    """Named fp32 shadow copies of ``params``; ``update`` is called once per optimizer step."""

    def __init__(self, named_params: dict[str, nn.Parameter], engine: TrainEngine):
        self.names = list(named_params)
        self.params = [named_params[n] for n in self.names]
        # Decay 0 at start: an exact copy of the initial weights (DiT's initialisation of its EMA).
        # Shadows live where the values come from (the GPU in production): no host copy per step.
        self.shadow = {n: v.detach().to(torch.float32).clone()
                       for n, v in zip(self.names, engine.full_fp32_params(self.params))}

    @torch.no_grad()
    def update(self, engine: TrainEngine, decay: float) -> None:
        for name, value in zip(self.names, engine.full_fp32_params(self.params)):
            shadow = self.shadow[name]
            shadow.mul_(decay).add_(value.to(shadow.device, torch.float32), alpha=1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies, ready to save."""
        return {n: v.detach().cpu() for n, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state))[:3]
            extra = sorted(set(state) - set(self.shadow))[:3]
            raise ValueError(f"EMA state does not match the trainable parameters (missing {missing}, extra {extra})")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name] = value.to(self.shadow[name].device, torch.float32).clone()
