"""Which samples, noise, timesteps and label drops each rank uses at each step: a pure function of (seed, step, j).

The data order and every random draw of training sample ``j`` of optimizer step ``s`` depend only on
``(seed, s, j)``, never on the world size, the micro-batch split or how often the job was restarted. So:
- world sizes 1 and 2 at the same global batch see the same samples with the same noise (the same loss curve up to
  float reduction order);
- resuming at step ``s`` needs only ``s`` (no RNG state, no data-loader position to restore).

Epochs are permutations seeded by (seed, epoch); global batches are consecutive slices of the concatenated epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (splitmix64), so nearby (step, j) pairs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of one rank: dataset indices and the per-sample positions ``j`` in the global batch."""

    step: int
    indices: list[int]
    positions: list[int]


class GlobalBatchPlan:
    """The global batch of every step, split over ranks and accumulation micro-steps."""

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(derive_seed(self.seed, 0xDA7A, epoch))
            self._perm_cache[epoch] = torch.randperm(self.num_samples, generator=g)
        return self._perm_cache[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of optimizer step ``step``."""
        start = step * self.global_batch
        out = []
        for pos in range(start, start + self.global_batch):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(int(self._epoch_perm(epoch)[offset]))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_samples

    def micro_batches(self, step: int, rank: int, world_size: int, accum: int) -> list[MicroBatch]:
        """This rank's contiguous share of the global batch, cut into ``accum`` micro-batches."""
        per_rank = self.global_batch // world_size
        micro = per_rank // accum
        indices = self.global_indices(step)
        out = []
        for m in range(accum):
            lo = rank * per_rank + m * micro
            out.append(MicroBatch(step, indices[lo:lo + micro], list(range(lo, lo + micro))))
        return out


@dataclass(frozen=True)
class Draws:
    """Random draws of a micro-batch: diffusion noise (N, *shape), timesteps (N,), label-drop flags (N,) and, for
    latent caches, the posterior noise (N, *shape) that turns stored (mean, std) into a latent sample."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    drop_label: torch.Tensor
    posterior_eps: torch.Tensor | None = None


def sample_draws(seed: int, step: int, positions: list[int], shape: tuple[int, ...], num_timesteps: int,
                 drop_prob: float, posterior: bool = False) -> Draws:
    """Every random draw of each sample from its own (seed, step, j) stream (order of draws fixed: never reorder)."""
    noise, steps, drops, eps = [], [], [], []
    for j in positions:
        g = torch.Generator().manual_seed(derive_seed(seed, 0x7E57, step, j))
        noise.append(torch.randn(shape, generator=g))
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        drops.append(torch.rand(1, generator=g) < drop_prob)
        if posterior:
            eps.append(torch.randn(shape, generator=g))
    return Draws(torch.stack(noise), torch.cat(steps), torch.cat(drops), torch.stack(eps) if posterior else None)


def flip_flags(seed: int, step: int, positions: list[int]) -> list[bool]:
    """Horizontal-flip decision of each sample (its own stream, so the data loader can draw it without the noise)."""
    return [bool(torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(seed, 0xF11F, step, j))) < 0.5)
            for j in positions]
