"""clean-FID and KID as extra columns, computed through clean-fid's own API (docs/metrics.md §8).

* Network: ``cleanfid.inception_torchscript.InceptionV3W(<weights>/inception, download=False)``, the NVIDIA
  TorchScript ``inception-2015-12-05.pt`` from the weights directory; never clean-fid's hard-coded ``/tmp`` path
  or its downloader (pitfall P19).
* Preprocessing: clean-fid's ``build_resizer('clean')`` (per-channel float PIL bicubic to 299, no re-quantisation).
* Metrics: ``cleanfid.fid.fid_from_feats`` and ``cleanfid.fid.kernel_distance``. KID's subsets come from the global
  ``np.random``, so it runs under a fixed seed and the caller's RNG state is restored.

These numbers are **not** comparable with ADM/DiT FIDs (different resize); they are labelled ``clean_fid``/``kid``
with their reference (usually the ADM batch's 10k ``arr_0`` images, a biased 10k reference).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.metrics import distributed as D
from bench.metrics.networks.features import rank0_bar, source_name
from bench.metrics.networks.numerics import strict_fp32
from bench.metrics.sample_io import SampleSource
from bench.progress import progress_bar


def load_cleanfid_inception(inception_dir, device) -> torch.nn.Module:
    from cleanfid.inception_torchscript import InceptionV3W

    return InceptionV3W(str(inception_dir), download=False, resize_inside=False).to(device).eval()


@torch.no_grad()
def clean_features(model: torch.nn.Module, source: SampleSource, *, batch_size: int = 50,
                   limit: int | None = None) -> np.ndarray:
    """clean-mode pool features of ``source`` (sharded over the process group, gathered in global order)."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    device = next(model.parameters()).device
    n = len(source) if limit is None else min(limit, len(source))
    rank, world = D.rank_and_world()
    start, stop = D.shard_range(n, rank, world, align=batch_size)
    parts = []
    total, description = rank0_bar(f"clean-fid features: {source_name(source)}", stop - start, rank, world)
    with strict_fp32(), progress_bar(total, description) as advance:
        for _, images in source.batches(batch_size, start, stop):
            batch = np.stack([resize(img) for img in images])  # float32 HWC in [0, 255] at 299
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
            parts.append(model(x).float().cpu())
            advance(len(images))
    local = torch.cat(parts) if parts else torch.empty(0, 2048)
    return D.all_gather_rows(local, n, align=batch_size).numpy()


def clean_fid_and_kid(sample_feats: np.ndarray, ref_feats: np.ndarray, *, kid_seed: int = 0,
                      kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """clean-fid's FID and KID on precomputed clean features; ``None`` with a reason if clean-fid fails."""
    from cleanfid import fid as cfid

    out = {"clean_fid": None, "kid": None, "errors": {}}
    try:
        out["clean_fid"] = float(cfid.fid_from_feats(sample_feats, ref_feats))
    except TypeError as err:  # scipy >= 1.18 removed sqrtm's disp argument that clean-fid 0.1.35 passes (P4)
        out["errors"]["clean_fid"] = f"clean-fid failed: {err}"
    state = np.random.get_state()
    try:
        np.random.seed(kid_seed)
        out["kid"] = float(cfid.kernel_distance(sample_feats, ref_feats, num_subsets=kid_subsets,
                                                max_subset_size=kid_subset_size))
    finally:
        np.random.set_state(state)
    out["kid_protocol"] = {"seed": kid_seed, "subsets": kid_subsets, "subset_size": kid_subset_size}
    return out
