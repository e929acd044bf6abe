"""Inception Score with ADM semantics: docs/metrics.md §16 T9-T13, plus a torch-fidelity cross-check."""

from __future__ import annotations

import numpy as np
import pytest

from bench.metrics.scores.inception_score import inception_score, split_bounds


def one_hot_logits(labels, classes, scale=60.0):
    logits = np.zeros((len(labels), classes))
    logits[np.arange(len(labels)), labels] = scale
    return logits


def test_t9_uniform_logits_give_one():
    res = inception_score(np.zeros((12000, 1008)))
    assert abs(res.value - 1.0) <= 1e-12
    assert res.split_sizes == (5000, 5000, 2000)


def test_t10_one_hot_balanced_gives_k():
    k = 100
    labels = np.tile(np.arange(k), 100)  # 10000 samples, every class 50 times in each 5000-split
    res = inception_score(one_hot_logits(labels, k, scale=800.0))
    assert abs(res.value - k) <= 1e-9
    assert len(res.splits) == 2


def test_t11_split_arithmetic():
    assert split_bounds(12000) == [(0, 5000), (5000, 10000), (10000, 12000)]
    assert split_bounds(50000) == [(i, i + 5000) for i in range(0, 50000, 5000)]
    # torch-fidelity's boundaries k·N/splits
    assert split_bounds(10, split_size=None, num_splits=3) == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="exactly one"):
        split_bounds(10, split_size=None, num_splits=None)


def test_t11_num_splits_matches_torch_fidelity():
    isc = pytest.importorskip("torch_fidelity.metric_isc")
    import torch

    logits = np.random.default_rng(0).standard_normal((3003, 50)) * 3
    theirs = isc.isc_features_to_metric(torch.from_numpy(logits).float(), splits=7, shuffle=False)
    ours = inception_score(logits.astype(np.float32), split_size=None, num_splits=7)
    assert abs(ours.value - theirs["inception_score_mean"]) <= 1e-6 * theirs["inception_score_mean"]
    assert abs(ours.std - theirs["inception_score_std"]) <= 1e-5 * max(theirs["inception_score_std"], 1e-3)


def test_t12_order_sensitivity_documented():
    labels_sorted = np.repeat(np.arange(1000), 50)
    logits = one_hot_logits(labels_sorted, 1000, scale=800.0)
    sorted_is = inception_score(logits).value
    assert abs(sorted_is - 100.0) <= 1e-6  # each 5000-split sees only 100 classes
    perm = np.random.default_rng(0).permutation(len(labels_sorted))
    shuffled_is = inception_score(logits[perm]).value
    assert 905 < shuffled_is < 916  # ≈ 910.47 (docs/metrics.md §5)
    # known-sorted labels are refused unless a shuffle seed is given
    with pytest.raises(ValueError, match="sorted by class"):
        inception_score(logits, labels=labels_sorted)
    seeded = inception_score(logits, labels=labels_sorted, shuffle_seed=0)
    assert seeded.value > 900 and seeded.shuffle_seed == 0
    # random-order labels pass the check, and so does a single split (order cannot matter there)
    inception_score(logits[perm], labels=labels_sorted[perm])
    inception_score(logits[:4000], labels=labels_sorted[:4000])


def test_t13_underflow_no_nan():
    logits = np.full((100, 10), -1e4)
    logits[np.arange(100), np.arange(100) % 10] = 0.0  # every other class has probability exactly 0 in float64
    res = inception_score(logits)
    assert np.isfinite(res.value)
    assert abs(res.value - 10.0) <= 1e-9


def test_rejects_bad_logits():
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        inception_score(np.zeros(10))
    with pytest.raises(ValueError, match="non-finite"):
        inception_score(np.array([[0.0, np.inf]]))
