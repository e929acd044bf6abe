"""Float64 feature moments as sufficient statistics (docs/metrics.md §4.1): accumulate, merge exactly, get (μ, Σ).

Each rank keeps n, s = Σx and S = Σxxᵀ in float64 on its own device; ranks merge by summing them (all_reduce), so
the result depends on the world size only through float64 summation order (≈1e-15). Raw moments are safe in
float64 (pitfall P7 is a float32/TF32 problem).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Moments:
    """Mean and unbiased covariance (ddof=1, like np.cov) of n feature vectors."""

    n: int
    mu: np.ndarray
    sigma: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


class MomentAccumulator:
    """Running n, Σx, Σxxᵀ of d-dimensional features, float64, on ``device``."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(feats).to(device=self.sum.device, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (batch, {self.dim}), got {tuple(x.shape)}")
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def merge_(self, other: MomentAccumulator) -> MomentAccumulator:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce_(self) -> MomentAccumulator:
        """Sum the three tensors over all ranks of the default process group (no-op when not distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.n, self.sum, self.outer):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return self

    def moments(self) -> Moments:
        n = int(round(self.n.item()))
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {n}")
        s = self.sum.cpu().numpy()
        outer = self.outer.cpu().numpy()
        mu = s / n
        sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
        return Moments(n=n, mu=mu, sigma=(sigma + sigma.T) * 0.5)


def moments_of(feats: np.ndarray) -> Moments:
    """Reference path: np.mean / np.cov in float64."""
    x = np.asarray(feats, dtype=np.float64)
    return Moments(n=x.shape[0], mu=x.mean(0), sigma=np.cov(x, rowvar=False))
