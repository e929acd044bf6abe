"""World-size independence with real torch.distributed processes (gloo on CPU): docs/metrics.md §12, test T8 (§16).

World sizes 1, 2 and 3 must give identical moments (1e-12 relative), identical IS inputs in global order and identical
precision/recall counts. The slow test runs the whole ``evaluate`` under 1 and 2 ranks on random weights.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.metrics import distributed as D
from bench.metrics.scores.inception_score import inception_score
from bench.metrics.scores.precision_recall import precision_recall
from bench.metrics.scores.stats import MomentAccumulator, moments_of


def _run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Start ``world`` forked processes running fn(rank, world, *args); fail on error or timeout."""
    ctx = mp.start_processes(fn, args=(world,) + args, nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"world size {world} timed out after {timeout} s")


def _init(rank: int, world: int, store_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store_{world}", rank=rank, world_size=world)


def _primitives_worker(rank, world, store_dir, data_path, out_dir):
    _init(rank, world, store_dir)
    data = np.load(data_path)
    feats, logits, real, fake = data["feats"], data["logits"], data["real"], data["fake"]
    n = len(feats)
    a, b = D.shard_range(n, rank, world)
    acc = MomentAccumulator(feats.shape[1])
    for start in range(a, b, 37):  # several batches per rank, like the extractor
        acc.update(feats[start:min(start + 37, b)])
    m = acc.all_reduce_().moments()
    gathered = D.all_gather_rows(torch.from_numpy(logits[a:b]), n).numpy()
    pr = precision_recall(real, fake, row_block=64, col_block=96)
    if rank == 0:
        np.savez(f"{out_dir}/result_{world}.npz", mu=m.mu, sigma=m.sigma, n=m.n, logits=gathered,
                 is_value=inception_score(gathered, split_size=250).value,
                 counts=np.array([pr.n_precision, pr.n_recall]))
    dist.destroy_process_group()


def test_world_size_1_2_3_identical(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 1001, 48
    feats = np.maximum(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.5, 0).astype(np.float32) + 30
    real = rng.standard_normal((400, 32)).astype(np.float32)
    fake = (rng.standard_normal((350, 32)) * 1.1 + 0.05).astype(np.float32)
    data = tmp_path / "data.npz"
    np.savez(data, feats=feats, logits=rng.standard_normal((n, 20)).astype(np.float32) * 3, real=real, fake=fake)
    for world in (1, 2, 3):
        _run_ranks(_primitives_worker, world, str(tmp_path), str(data), str(tmp_path))
    results = {w: np.load(tmp_path / f"result_{w}.npz") for w in (1, 2, 3)}
    ref = moments_of(feats)
    for w, r in results.items():
        assert int(r["n"]) == n
        assert np.max(np.abs(r["mu"] - ref.mu)) <= 1e-12 * np.max(np.abs(ref.mu)), w
        assert np.max(np.abs(r["sigma"] - ref.sigma)) <= 1e-12 * np.max(np.abs(ref.sigma)), w
        assert np.array_equal(r["logits"], results[1]["logits"])  # global order restored exactly
        assert float(r["is_value"]) == float(results[1]["is_value"])
        assert r["counts"].tolist() == results[1]["counts"].tolist()
    assert 0 < results[1]["counts"][0] < 350 and 0 < results[1]["counts"][1] < 400
    direct = precision_recall(real, fake)
    assert results[1]["counts"].tolist() == [direct.n_precision, direct.n_recall]


def test_shard_ranges_cover_exactly():
    for n in (0, 1, 5, 1001):
        for world in (1, 2, 3, 7):
            ranges = [D.shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))
            assert sum(D.shard_sizes(n, world)) == n
    with pytest.raises(ValueError, match="invalid rank"):
        D.shard_range(10, 3, 3)


def _evaluate_worker(rank, world, store_dir, opts_kwargs, out_dir):
    _init(rank, world, store_dir)
    from bench.metrics.evaluate import EvalOptions, evaluate

    record = evaluate(EvalOptions(**opts_kwargs, out=f"{out_dir}/record_{world}.json", overwrite=True,
                                  save_stats=f"{out_dir}/stats_{world}.npz"))
    assert record["env"]["world_size"] == world
    dist.destroy_process_group()


@pytest.mark.slow
def test_full_evaluate_world_size_independent(tmp_path, weights_dir):
    import json

    from bench.metrics.acceptance import fixtures

    ref = fixtures.write_synthetic_adm_reference(tmp_path / "ref.npz", weights_dir /
                                                 "inception/pt_inception-2015-12-05-6726825d.pth", n=14, size=32)
    samples = fixtures.write_synthetic_samples(tmp_path / "samples.npz", n=13, size=32)
    kwargs = dict(samples=samples, ref=ref, weights_dir=str(weights_dir), fdd="off", batch_size=4, device="cpu")
    for world in (1, 2):
        _run_ranks(_evaluate_worker, world, str(tmp_path), kwargs, str(tmp_path), timeout=900)
    one, two = (json.loads((tmp_path / f"record_{w}.json").read_text()) for w in (1, 2))
    s1, s2 = (np.load(tmp_path / f"stats_{w}.npz") for w in (1, 2))
    for key in ("mu", "sigma", "mu_s", "sigma_s"):  # moments differ only by float64 summation order
        assert np.max(np.abs(s1[key] - s2[key])) <= 1e-12 * np.max(np.abs(s1[key])), key
    for key in ("fid", "sfid"):  # N < d here: FD amplifies 1e-16 noise in the null space (P6), hence 1e-7
        assert abs(one[key] - two[key]) <= 1e-7 * abs(one[key]), key
    assert one["is"] == two["is"] and one["is_splits"] == two["is_splits"]  # batch-aligned shards: same features
    assert one["counts"] == two["counts"] and one["n_samples"] == two["n_samples"] == 13
    assert os.path.exists(tmp_path / "record_2.json")
