"""Inception Score with ADM semantics (docs/metrics.md §5).

Contiguous splits of ``split_size`` (5000) rows in file order, the last one possibly shorter; per split
IS_s = exp(mean_i KL(p_i ‖ p̄)); IS = mean_s IS_s. Natural log, no shuffling. Unlike ADM's float32 formula,
probabilities that underflow to 0 contribute 0 instead of NaN (xlogy semantics).

``num_splits`` reproduces torch-fidelity's boundaries [k·N/splits, (k+1)·N/splits) instead.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

ADM_SPLIT_SIZE = 5000


@dataclasses.dataclass(frozen=True)
class InceptionScore:
    value: float
    splits: tuple[float, ...]
    split_sizes: tuple[int, ...]
    std: float
    shuffle_seed: int | None


def split_bounds(n: int, split_size: int | None = ADM_SPLIT_SIZE, num_splits: int | None = None) -> list[tuple]:
    """[(start, stop)] of each split: ADM's ``range(0, n, split_size)`` or torch-fidelity's ``k·n // num_splits``."""
    if (split_size is None) == (num_splits is None):
        raise ValueError("give exactly one of split_size and num_splits")
    if n < 1:
        raise ValueError("Inception Score needs at least one sample")
    if num_splits is not None:
        if not 1 <= num_splits <= n:
            raise ValueError(f"num_splits must be in [1, {n}], got {num_splits}")
        return [(k * n // num_splits, (k + 1) * n // num_splits) for k in range(num_splits)]
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    return [(start, min(start + split_size, n)) for start in range(0, n, split_size)]


def check_label_order(labels: np.ndarray | None, shuffle_seed: int | None, strict: bool = True,
                      num_splits: int | None = None) -> None:
    """Refuse (or warn about) class-sorted files: contiguous splits then cap IS (pitfall P10).

    With a single split the order cannot matter, so ``num_splits == 1`` passes.
    """
    if labels is None or shuffle_seed is not None or (num_splits is not None and num_splits <= 1):
        return
    labels = np.asarray(labels)
    if len(np.unique(labels)) > 1 and np.all(np.diff(labels) >= 0):
        msg = ("samples are sorted by class label; ADM's contiguous IS splits then see few classes each and IS "
               "collapses (pitfall P10). Shuffle the file or pass an IS shuffle seed.")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _split_score(log_p: np.ndarray) -> float:
    p = np.exp(log_p)
    p_bar = p.mean(axis=0)
    # Σ_c p (log p − log p̄), with 0·log 0 := 0 on both terms. Where p̄_c = 0 every p_ic is 0, so the column drops.
    with np.errstate(divide="ignore"):
        log_p_bar = np.where(p_bar > 0, np.log(np.where(p_bar > 0, p_bar, 1.0)), 0.0)
    kl = np.where(p > 0, p * (log_p - log_p_bar), 0.0).sum(axis=1)
    return float(np.exp(kl.mean()))


def inception_score(
    logits: np.ndarray,
    *,
    split_size: int | None = ADM_SPLIT_SIZE,
    num_splits: int | None = None,
    shuffle_seed: int | None = None,
    labels: np.ndarray | None = None,
) -> InceptionScore:
    """IS of unbiased Inception logits (N, C), rows in global sample order."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, classes), got shape {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain non-finite values")
    if split_size is not None and num_splits is not None:
        split_size = None  # an explicit num_splits wins over the ADM default
    bounds = split_bounds(len(logits), split_size, num_splits)
    check_label_order(labels, shuffle_seed, num_splits=len(bounds))
    if shuffle_seed is not None:
        logits = logits[np.random.default_rng(shuffle_seed).permutation(len(logits))]
    # float64 per split keeps memory at one split while matching a whole-array float64 computation exactly
    scores = [_split_score(_log_softmax(logits[a:b].astype(np.float64))) for a, b in bounds]
    return InceptionScore(
        value=float(np.mean(scores)),
        splits=tuple(scores),
        split_sizes=tuple(b - a for a, b in bounds),
        std=float(np.std(scores)),
        shuffle_seed=shuffle_seed,
    )
