"""Confidence intervals over seeds and samples, and the ties they imply between leaderboard rows.

A row's interval is the 95% percentile-bootstrap interval of its mean, over seeds *and* over samples
(``combined_interval``): each resample draws the seeds with replacement and, for each drawn seed, its number perturbed
by that evaluation's own finite-sample noise (a normal with the standard deviation its bootstrap over samples gives).
Where no evaluation knows its sample noise this is the bootstrap over seeds alone (``bootstrap_interval``): exact
(every one of the n^n equally likely resamples) when n^n is at most ``RESAMPLES``, else ``RESAMPLES`` resamples.
Every generator has a fixed seed, so a leaderboard is reproducible. Two rows whose intervals overlap cannot be told
apart by these seeds and samples: a row whose interval overlaps the best row's is *tied* with it and shares its rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
_SEED = 0
UNBOUNDED = (-np.inf, np.inf)


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


def combined_interval(values: Sequence[float | None], sample_sds: Sequence[float | None], level: float = LEVEL,
                      resamples: int = RESAMPLES,
                      bounds: tuple[float, float] = UNBOUNDED) -> tuple[float, float] | None:
    """(low, high) bootstrap interval of the mean of ``values`` over seeds and over samples: ``sample_sds[i]`` is
    the standard deviation of ``values[i]`` under resampling its evaluation's samples (None or 0: unknown or none).
    Each of ``resamples`` draws takes n seeds with replacement and adds to each drawn value a normal draw with its
    standard deviation; the interval is the quantiles of the drawn means. Without any sample noise it is
    ``bootstrap_interval`` (None for fewer than two values); with it one seed has an interval too (its samples').
    ``bounds`` is the metric's range: a perturbed value is clipped into it (a normal draw around a precision of 0.003
    would otherwise reach below 0, and a bound outside the range is no statement about the metric)."""
    pairs = [(v, sd) for v, sd in zip(values, sample_sds, strict=True) if v is not None]
    if not any(sd for _, sd in pairs):
        return bootstrap_interval([v for v, _ in pairs], level, resamples)
    data = np.asarray([v for v, _ in pairs], dtype=np.float64)
    spread = np.asarray([sd or 0.0 for _, sd in pairs], dtype=np.float64)
    rng = np.random.default_rng(_SEED)
    draws = rng.integers(0, len(data), size=(resamples, len(data)))
    perturbed = data[draws] + spread[draws] * rng.standard_normal(draws.shape)
    means = np.clip(perturbed, *bounds).mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def sd_from_interval(interval: Sequence[float] | None, level: float = LEVEL) -> float | None:
    """The standard deviation a normal with this central ``level`` interval has (None without an interval)."""
    if not interval:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return (float(interval[1]) - float(interval[0])) / (2.0 * z)


def overlaps(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two intervals share a point; False when either is missing."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def competition_ranks(tied_with_first: Sequence[bool]) -> list[int]:
    """Ranks of rows in sorted order where the first row is the best: rows tied with it share rank 1, every other
    row takes its position (1, 1, 1, 4, 5, ...)."""
    return [1 if index == 0 or tied else index + 1 for index, tied in enumerate(tied_with_first)]
