"""Improved Precision/Recall (Kynkäänniemi et al. 2019), ADM evaluator variant, blocked (docs/metrics.md §6).

* Squared Euclidean distances D(u, v) = max(‖u‖² − 2u·v + ‖v‖², 0).
* Radius of a point = its (k+1)-th smallest distance within its own set, itself included (k = 3: ADM's
  ``np.partition(..., 3)``). Radii are squared distances.
* Precision = share of fake points inside some real ball (D ≤ radius, ties inside); recall = share of real points
  inside some fake ball.

Distances are computed block by block, with a running top-(k+1) for the radii, so memory is one block however
large the sets are; each fake×real block serves both precision and recall. Under torch.distributed every rank holds
both sets, handles a contiguous share of the rows, and the radii are all-gathered and the counts (and the recall
hits, an OR) all-reduced, so the counts do not depend on the world size.

``distance``: ``fp32`` (default, KPR semantics) or ``adm_fp16``, an emulation of ADM's TensorFlow float16 path
(fp16 inputs and norms, exact fp16 products accumulated in fp32, every subsequent operation rounded to fp16 in TF's
order (‖u‖² − 2UVᵀ) + ‖v‖², and an fp32 recompute of any block with a non-finite entry). Which variant lands
closer to ADM's numbers is open until acceptance A1 (docs/metrics.md §15.2).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bench.metrics import distributed as D

DISTANCES = ("fp32", "adm_fp16")


@dataclasses.dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    n_precision: int
    """Fake samples inside at least one real ball."""
    n_recall: int
    """Real samples inside at least one fake ball."""
    n_real: int
    n_fake: int
    k: int
    distance: str


def _sq_norms(x: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "adm_fp16":
        return (x.half().float() ** 2).half().float().sum(1).half()
    return (x * x).sum(1)


def _block_dists(u, v, nu, nv, distance: str) -> torch.Tensor:
    """D for one block, float32 result."""
    if distance == "adm_fp16":
        # fp16 × fp16 products are exact in fp32; accumulate in fp32 and round once, as an fp16 GEMM with fp32
        # accumulation does on the GPU. Each later elementwise op rounds to fp16, in TF's order.
        uv = (u.half().float() @ v.half().float().T).half()
        d = ((nu[:, None] - 2 * uv) + nv[None, :]).clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()
        nu, nv = _sq_norms(u, "fp32"), _sq_norms(v, "fp32")
    return (nu[:, None] - 2.0 * (u @ v.T) + nv[None, :]).clamp_min_(0.0)


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} features must be a non-empty (N, d) matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} features contain non-finite values")
    return x.float()


def knn_radii(
    feats: torch.Tensor,
    k: int = 3,
    *,
    rows: tuple[int, int] | None = None,
    row_block: int = 4096,
    col_block: int = 4096,
    distance: str = "fp32",
) -> torch.Tensor:
    """Squared distance from each row in ``rows`` to its k-th nearest neighbour in ``feats`` (self excluded)."""
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    start, stop = rows if rows is not None else (0, n)
    norms = _sq_norms(feats, distance)
    out = torch.empty(stop - start, dtype=torch.float32, device=feats.device)
    for r0 in range(start, stop, row_block):
        r1 = min(r0 + row_block, stop)
        best = None
        for c0 in range(0, n, col_block):
            c1 = min(c0 + col_block, n)
            d = _block_dists(feats[r0:r1], feats[c0:c1], norms[r0:r1], norms[c0:c1], distance)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        out[r0 - start : r1 - start] = best.max(dim=1).values
    return out


def cross_membership(
    fake: torch.Tensor,
    real: torch.Tensor,
    real_radii: torch.Tensor,
    fake_radii: torch.Tensor,
    *,
    rows: tuple[int, int] | None = None,
    row_block: int = 4096,
    col_block: int = 4096,
    distance: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the fake×real distance blocks for both directions.

    Returns (fake rows in ``rows`` inside some real ball, every real point inside the ball of some fake in ``rows``).
    Each block D(fake_i, real_j) serves precision (reduce over j) and recall (reduce over i), so the cross distances
    are computed once, not twice.
    """
    start, stop = rows if rows is not None else (0, fake.shape[0])
    nf, nr = _sq_norms(fake, distance), _sq_norms(real, distance)
    precision_hit = torch.zeros(stop - start, dtype=torch.bool, device=fake.device)
    recall_hit = torch.zeros(real.shape[0], dtype=torch.bool, device=fake.device)
    for r0 in range(start, stop, row_block):
        r1 = min(r0 + row_block, stop)
        for c0 in range(0, real.shape[0], col_block):
            c1 = min(c0 + col_block, real.shape[0])
            d = _block_dists(fake[r0:r1], real[c0:c1], nf[r0:r1], nr[c0:c1], distance)
            precision_hit[r0 - start: r1 - start] |= (d <= real_radii[None, c0:c1]).any(dim=1)
            recall_hit[c0:c1] |= (d <= fake_radii[r0:r1, None]).any(dim=0)
    return precision_hit, recall_hit


# Row shards are aligned to the row block, so every rank computes exactly the blocks a single process would and the
# distances (hence radii and counts) are bitwise independent of the world size.
def _sharded_radii(feats, k, **kw) -> torch.Tensor:
    rank, world = D.rank_and_world()
    rows = D.shard_range(feats.shape[0], rank, world, align=kw["row_block"])
    return D.all_gather_rows(knn_radii(feats, k, rows=rows, **kw), feats.shape[0], align=kw["row_block"])


def _sharded_counts(fake, real, real_radii, fake_radii, **kw) -> tuple[int, int]:
    rank, world = D.rank_and_world()
    rows = D.shard_range(fake.shape[0], rank, world, align=kw["row_block"])
    precision_hit, recall_hit = cross_membership(fake, real, real_radii, fake_radii, rows=rows, **kw)
    device = D.collective_device()
    n_precision = D.all_reduce_sum_(precision_hit.sum().to(device=device, dtype=torch.int64))
    recall_votes = D.all_reduce_sum_(recall_hit.to(device=device, dtype=torch.int32))  # OR over ranks
    return int(n_precision.item()), int((recall_votes > 0).sum().item())


def precision_recall(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    k: int = 3,
    *,
    row_block: int = 4096,
    col_block: int = 4096,
    distance: str = "fp32",
    device: torch.device | str | None = None,
) -> PrecisionRecall:
    """ADM precision/recall of ``fake`` against ``real`` (both (N, d)); collective when torch.distributed is up.

    Every rank must pass the same full ``real`` and ``fake`` arrays.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown P/R distance {distance!r}; choose one of {DISTANCES}")
    if row_block < 1 or col_block < 1:
        raise ValueError("row_block and col_block must be positive")
    real = _check(torch.as_tensor(real, device=device), "real")
    fake = _check(torch.as_tensor(fake, device=device), "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    kw = dict(row_block=row_block, col_block=col_block, distance=distance)
    with torch.no_grad():
        real_radii = _sharded_radii(real, k, **kw)
        fake_radii = _sharded_radii(fake, k, **kw)
        n_precision, n_recall = _sharded_counts(fake, real, real_radii, fake_radii, **kw)
    return PrecisionRecall(
        precision=n_precision / fake.shape[0],
        recall=n_recall / real.shape[0],
        n_precision=n_precision,
        n_recall=n_recall,
        n_real=real.shape[0],
        n_fake=fake.shape[0],
        k=k,
        distance=distance,
    )


def precision_hits(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3) -> np.ndarray:
    """Per fake sample, whether it lies inside some real point's k-NN ball: precision is its mean. Single-process
    (for bootstrap intervals over the samples, which resample these indicators with the real manifold fixed)."""
    real = _check(torch.as_tensor(real), "real")
    fake = _check(torch.as_tensor(fake), "fake")
    with torch.no_grad():
        real_radii = knn_radii(real, k)
        fake_radii = torch.zeros(fake.shape[0])  # recall is not wanted here; any radii do
        hits, _ = cross_membership(fake, real, real_radii, fake_radii)
    return hits.cpu().numpy()


def precision_recall_bruteforce(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Full-matrix numpy reference (float64 distances, np.partition), for tests and benchmarks only."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def sq(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0)

    r_real = np.partition(sq(real, real), k, axis=1)[:, k]
    r_fake = np.partition(sq(fake, fake), k, axis=1)[:, k]
    d = sq(real, fake)
    precision = (d <= r_real[:, None]).any(axis=0).mean()
    recall = (d <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)
