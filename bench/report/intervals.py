"""Confidence intervals over seeds, and the ties they imply between leaderboard rows.

A row's interval is the 95% percentile-bootstrap interval of its mean over seeds: exact (every one of the n^n
equally likely resamples) when n^n is at most ``RESAMPLES``, else ``RESAMPLES`` resamples from a fixed-seed
generator, so a leaderboard is reproducible. One seed has no interval. Two rows whose intervals overlap cannot be
told apart by these seeds: a row whose interval overlaps the best row's is *tied* with it and shares its rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
_SEED = 0


def bootstrap_interval(values: Sequence[float], level: float = LEVEL,
                       resamples: int = RESAMPLES) -> tuple[float, float] | None:
    """(low, high) percentile-bootstrap interval of the mean of ``values`` (numpy's linear quantiles of the
    resampled means); None for fewer than two values."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = len(data)
    if n < 2:
        return None
    if n ** n <= resamples:
        means = np.array([data[list(draw)].mean() for draw in itertools.product(range(n), repeat=n)])
    else:
        draws = np.random.default_rng(_SEED).integers(0, n, size=(resamples, n))
        means = data[draws].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def overlaps(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two intervals share a point; False when either is missing."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def competition_ranks(tied_with_first: Sequence[bool]) -> list[int]:
    """Ranks of rows in sorted order where the first row is the best: rows tied with it share rank 1, every other
    row takes its position (1, 1, 1, 4, 5, ...)."""
    return [1 if index == 0 or tied else index + 1 for index, tied in enumerate(tied_with_first)]
