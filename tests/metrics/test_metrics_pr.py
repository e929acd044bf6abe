"""ADM precision/recall, blocked: docs/metrics.md §16 T14-T18, the fp16 emulation and a torch-fidelity cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from bench.metrics.scores.precision_recall import knn_radii, precision_recall, precision_recall_bruteforce


def embed_line(values, dim=16, rotation=None):
    pts = np.zeros((len(values), dim))
    pts[:, 0] = values
    return pts if rotation is None else pts @ rotation


@pytest.mark.parametrize("rotate", [False, True])
def test_t14_hand_built_grid(rotate):
    q = ortho_group.rvs(16, random_state=0) if rotate else None
    real = embed_line(np.arange(100.0), rotation=q)
    fake = embed_line(np.arange(10) + 0.5, rotation=q)
    pr = precision_recall(real, fake, k=3)
    assert pr.precision == 1.0
    assert pr.recall == pytest.approx(0.13, abs=0)
    assert (pr.n_precision, pr.n_recall, pr.n_real, pr.n_fake) == (10, 13, 100, 10)


def test_t14_radii_values():
    radii = knn_radii(torch.tensor(embed_line(np.arange(100.0)), dtype=torch.float32), k=3)
    assert radii[0] == 9.0 and radii[50] == 4.0 and radii[99] == 9.0  # squared distances


def test_t15_identical_and_disjoint_sets():
    x = np.random.default_rng(0).standard_normal((300, 32))
    same = precision_recall(x, x.copy())
    assert same.precision == 1.0 and same.recall == 1.0
    far = precision_recall(x, x + 1e3)
    assert far.precision == 0.0 and far.recall == 0.0


def test_t16_block_size_invariance():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((257, 24)), rng.standard_normal((193, 24)) * 1.1 + 0.2
    sizes = (7, 64, 257)
    counts = {(b, c): precision_recall(real, fake, row_block=b, col_block=c) for b in sizes for c in sizes}
    first = next(iter(counts.values()))
    assert 0 < first.n_precision < 193 and 0 < first.n_recall < 257  # non-trivial
    for pr in counts.values():
        assert (pr.n_precision, pr.n_recall) == (first.n_precision, first.n_recall)


def test_t17_k_semantics_and_ties():
    a, b = np.zeros(8), np.zeros(8)
    a[:2], b[0] = (1.0, 2.0), 10.0  # small integers: every distance is exact in float32
    real = np.stack([a] * 4 + [b] * 4)  # 4 coincident points each: the 3rd neighbour is at distance 0
    radii = knn_radii(torch.tensor(real, dtype=torch.float32), k=3)
    assert torch.all(radii == 0)
    off = a.copy()
    off[0] += 1.0
    fake = np.stack([a, off, b, off + 5])
    pr = precision_recall(real, fake, k=3)
    assert pr.n_precision == 2  # only the exact copies (distance 0 = radius 0: ties count as inside)
    # ties at a non-zero radius: a fake exactly on the ball's boundary is inside
    line = embed_line(np.arange(10.0), dim=4)
    boundary = embed_line(np.array([-3.0, 500.0, 501.0, 502.0, 503.0]), dim=4)  # real 0: radius² 9; -3 is at 3
    assert precision_recall(line, boundary, k=3).n_precision == 1


def test_t18_against_bruteforce():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((1000, 64)).astype(np.float32)
    fake = (rng.standard_normal((1000, 64)) * 1.2 + 0.1).astype(np.float32)
    pr = precision_recall(real, fake, row_block=300, col_block=256)
    bp, br = precision_recall_bruteforce(real, fake)
    assert 0 < pr.n_precision < 1000 and 0 < pr.n_recall < 1000
    assert (pr.precision, pr.recall) == (bp, br)


def test_against_torch_fidelity_prc():
    prc = pytest.importorskip("torch_fidelity.metric_prc")
    rng = np.random.default_rng(3)
    real = torch.from_numpy(rng.standard_normal((600, 48)).astype(np.float32))
    fake = torch.from_numpy((rng.standard_normal((500, 48)) * 1.15).astype(np.float32))
    theirs = prc.calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)  # (generated, real)
    ours = precision_recall(real, fake)
    assert ours.precision == pytest.approx(theirs[0], abs=1.0 / 500)
    assert ours.recall == pytest.approx(theirs[1], abs=1.0 / 600)


def test_adm_fp16_variant_runs_and_is_close():
    rng = np.random.default_rng(4)
    real, fake = rng.uniform(0, 2, (400, 64)), rng.uniform(0, 2.2, (300, 64))
    fp32 = precision_recall(real, fake)
    fp16 = precision_recall(real, fake, distance="adm_fp16")
    assert fp16.distance == "adm_fp16"
    assert abs(fp16.precision - fp32.precision) <= 0.05 and abs(fp16.recall - fp32.recall) <= 0.05
    # values beyond fp16 range: the non-finite fp16 block is recomputed in fp32, as ADM does
    big = precision_recall(real * 1e3, fake * 1e3, distance="adm_fp16")
    assert (big.n_precision, big.n_recall) == (precision_recall(real * 1e3, fake * 1e3).n_precision,
                                               precision_recall(real * 1e3, fake * 1e3).n_recall)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(np.full((10, 3), np.nan), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((3, 3)), np.zeros((10, 3)), k=3)
    with pytest.raises(ValueError, match="unknown P/R distance"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 3)), distance="fp64")
