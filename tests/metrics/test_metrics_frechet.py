"""Fréchet distance and moments: docs/metrics.md §16 T1-T7 (T8, the real multi-process run: the distributed test)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy
from scipy.stats import ortho_group

from bench.metrics.acceptance.oracles import frechet_eigvals, frechet_sqrtm
from bench.metrics.scores.frechet import frechet_distance, frechet_from_features
from bench.metrics.scores.stats import MomentAccumulator, moments_of

RNG = np.random.default_rng(1234)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def relu_feats(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.maximum(rng.standard_normal((n, d)) @ mix + shift, 0.0)


def random_spd(d, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, 2 * d))
    return scale * a @ a.T / (2 * d)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_t1_identity_and_symmetry(method):
    x = RNG.standard_normal((3000, 64))
    same = frechet_from_features(x, x, method=method)
    assert abs(same.value) <= 1e-9 * same.trace_sigma1
    y = relu_feats(3000, 64, 5, shift=0.3)
    ab = frechet_from_features(x, y, method=method).value
    ba = frechet_from_features(y, x, method=method).value
    assert ab > 1.0 and rel(ab, ba) <= 1e-10


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_t2_closed_forms(method):
    d = 32
    mu1, mu2 = RNG.standard_normal(d), RNG.standard_normal(d)
    dm = float((mu1 - mu2) @ (mu1 - mu2))
    fd = lambda s1, s2, m1=mu1, m2=mu2: frechet_distance(m1, s1, m2, s2, method=method).value  # noqa: E731
    # 1-D
    assert rel(fd(np.array([[4.0]]), np.array([[9.0]]), np.array([1.0]), np.array([3.0])), 4.0 + 1.0) <= 1e-10
    # diagonal
    a, b = RNG.uniform(0.1, 3, d), RNG.uniform(0.1, 3, d)
    expected = dm + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert rel(fd(np.diag(a), np.diag(b)), expected) <= 1e-10
    # commuting
    q = ortho_group.rvs(d, random_state=3)
    assert rel(fd(q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T), expected) <= 1e-10
    # scaled
    s1, c = random_spd(d, 7), 0.37
    assert rel(fd(s1, c * c * s1), dm + (1 - c) ** 2 * np.trace(s1)) <= 1e-10
    # Σ2 = 0 (exercises the semidefinite path)
    assert rel(fd(s1, np.zeros((d, d))), dm + np.trace(s1)) <= 1e-10
    # Σ1 = I
    s2 = random_spd(d, 8)
    w = np.linalg.eigvalsh(s2)
    assert rel(fd(np.eye(d), s2), dm + d + np.trace(s2) - 2 * np.sqrt(w).sum()) <= 1e-10


def test_t3_invariances():
    x, y = relu_feats(2000, 48, 1), relu_feats(2000, 48, 2, shift=0.2)
    base = frechet_from_features(x, y).value
    q = ortho_group.rvs(48, random_state=4)
    t = RNG.standard_normal(48) * 5
    assert rel(frechet_from_features(x @ q, y @ q).value, base) <= 1e-9
    assert rel(frechet_from_features(x + t, y + t).value, base) <= 1e-9
    assert rel(frechet_from_features(3.0 * x, 3.0 * y).value, 9.0 * base) <= 1e-9


@pytest.mark.skipif(tuple(int(v) for v in scipy.__version__.split(".")[:2]) >= (1, 18),
                    reason="clean-fid 0.1.35 calls sqrtm(disp=False), removed in scipy 1.18 (pitfall P4)")
def test_t4_against_cleanfid():
    cfid = pytest.importorskip("cleanfid.fid")
    x, y = relu_feats(3000, 256, 11), relu_feats(3000, 256, 12, shift=0.1)
    ours = frechet_from_features(x, y).value
    theirs = cfid.fid_from_feats(x, y)  # scipy 1.16-1.17 warn that disp is deprecated; harmless here
    assert rel(ours, float(theirs)) <= 1e-8


def test_t5_against_torch_fidelity():
    tfid = pytest.importorskip("torch_fidelity.metric_fid")
    import torch

    x, y = relu_feats(3000, 256, 21), relu_feats(3000, 256, 22, shift=0.1)
    stats = [tfid.fid_features_to_statistics(torch.from_numpy(f)) for f in (x, y)]
    theirs = tfid.fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"]
    assert rel(frechet_from_features(x, y).value, float(theirs)) <= 1e-8


def test_t5_against_torchmetrics():
    fid_mod = pytest.importorskip("torchmetrics.image.fid", reason="torchmetrics is not installed (optional)")
    import torch

    x, y = relu_feats(3000, 128, 31), relu_feats(3000, 128, 32, shift=0.1)
    mx, my = moments_of(x), moments_of(y)
    theirs = fid_mod._compute_fid(*(torch.from_numpy(a) for a in (mx.mu, mx.sigma, my.mu, my.sigma)))
    assert rel(frechet_from_features(x, y).value, float(theirs)) <= 1e-8


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_t6_against_sqrtm_and_eigvals_oracles(method):
    x, y = relu_feats(2000, 128, 41), relu_feats(2500, 128, 42, shift=0.3)
    mx, my = moments_of(x), moments_of(y)
    ours = frechet_distance(mx.mu, mx.sigma, my.mu, my.sigma, method=method)
    assert ours.method == method
    assert rel(ours.value, frechet_sqrtm(mx.mu, mx.sigma, my.mu, my.sigma)) <= 1e-8
    assert rel(ours.value, frechet_eigvals(mx.mu, mx.sigma, my.mu, my.sigma)) <= 1e-8


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_t7_uneven_shard_merge(world):
    x, y = relu_feats(1001, 64, 51), relu_feats(999, 64, 52, shift=0.2)
    cuts = np.sort(np.random.default_rng(world).choice(np.arange(1, 1001), world - 1, replace=False))
    total = MomentAccumulator(64)
    for part in np.split(x, cuts):
        acc = MomentAccumulator(64)
        acc.update(part.astype(np.float32))
        total.merge_(acc)
    merged, ref = total.moments(), moments_of(x.astype(np.float32))
    assert merged.n == 1001
    assert np.max(np.abs(merged.mu - ref.mu)) <= 1e-12 * np.max(np.abs(ref.mu))
    assert np.max(np.abs(merged.sigma - ref.sigma)) <= 1e-12 * np.max(np.abs(ref.sigma))
    my = moments_of(y)
    fd_merged = frechet_distance(merged.mu, merged.sigma, my.mu, my.sigma).value
    fd_ref = frechet_distance(ref.mu, ref.sigma, my.mu, my.sigma).value
    assert rel(fd_merged, fd_ref) <= 1e-10


def nuclear_norm_fd(x, y):
    """FD from the data when N < d: tr √(Σx Σy) = ‖Xc Ycᵀ‖_* / √((n−1)(m−1)) (nonzero eigenvalues coincide)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, m = len(x), len(y)
    tr_sqrt = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    dm = x.mean(0) - y.mean(0)
    return dm @ dm + (xc * xc).sum() / (n - 1) + (yc * yc).sum() / (m - 1) - 2 * tr_sqrt


def test_rank_deficient_one_side_swaps_the_factorisation():
    x, y = relu_feats(40, 64, 63), relu_feats(4000, 64, 64)  # Σx singular, Σy full rank
    res = frechet_from_features(x, y)
    assert res.method == "cholesky_swapped"
    # the d − N + 1 zero eigenvalues come out as ±1e-16 and √ turns them into 1e-8 each: 1e-7 is the honest bound
    assert rel(res.value, nuclear_norm_fd(x, y)) <= 1e-7
    assert rel(res.value, frechet_from_features(x, y, method="eigh").value) <= 1e-7


def test_rank_deficient_falls_back_to_eigh_and_reports():
    x, y = relu_feats(40, 64, 61), relu_feats(40, 64, 62)  # N < d: singular covariances (pitfall P6)
    res = frechet_from_features(x, y, sigma_eigs=True)
    assert res.method == "eigh"
    assert rel(res.value, nuclear_norm_fd(x, y)) <= 1e-6
    assert np.isfinite(res.value) and res.value > 0
    assert res.min_eig_sigma1 is not None and abs(res.min_eig_sigma1) < 1e-8
    assert rel(res.value, frechet_eigvals(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))) \
        <= 1e-6


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="unknown Fréchet method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="sqrtm")
    with pytest.raises(ValueError, match="expected features of shape"):
        MomentAccumulator(4).update(np.zeros((3, 5)))
