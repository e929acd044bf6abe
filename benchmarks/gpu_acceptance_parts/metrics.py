"""Part (e): the metric pipeline (``bench.metrics.evaluate.evaluate``: Inception features, FID, sFID, IS, P/R, FDD).

10k 256-px images on CUDA, random-weight Inception and DINOv2 ViT-L/14 from ``bench.metrics.acceptance.fixtures``
(never downloaded), time per stage (the pipeline's own functions, timed where ``evaluate`` calls them).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from gpu_acceptance_parts.common import PartContext, sync


def _image_chunk(args: tuple[int, int, int, float]):
    from bench.metrics.acceptance import fixtures

    n, size, seed, shift = args
    return fixtures.synthetic_images(n, size, seed=seed, shift=shift)


def synthetic_batches(n: int, size: int, seed: int, shift: float, chunk: int = 250,
                      processes: int = 1) -> Iterator:
    """``fixtures.synthetic_images`` in chunks (seed per chunk), in index order, optionally from a process pool."""
    jobs = [(min(chunk, n - start), size, seed * 100_003 + i, shift) for i, start in enumerate(range(0, n, chunk))]
    if processes <= 1:
        yield from map(_image_chunk, jobs)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield from pool.imap(_image_chunk, jobs)


class StageTimer:
    """Times the stages of one ``bench.metrics.evaluate.evaluate`` call where it calls them (module functions
    wrapped for the call), and the Inception and DINOv2 forwards inside feature extraction (hooks)."""

    def __init__(self, device: str):
        self.device = device
        self.stages: list[tuple[str, float]] = []
        self.forward_s = {"Inception": 0.0, "DINOv2": 0.0}

    def _wrap(self, fn: Callable, label: Callable[..., str]) -> Callable:
        def wrapper(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.stages.append((label(*args, **kwargs), time.perf_counter() - start))
            return out

        return wrapper

    def _hook(self, model, name: str):
        state = {}

        def pre(module, args):
            sync(self.device)
            state["t"] = time.perf_counter()

        def post(module, args, out):
            sync(self.device)
            self.forward_s[name] += time.perf_counter() - state["t"]

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
        return model

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        from unittest import mock

        import bench.metrics.evaluate as ev

        calls = {"features": 0}

        def features_label(*args, **kwargs):
            calls["features"] += 1
            return ("features of the samples (Inception + DINOv2, one pass)" if calls["features"] == 1
                    else "features of the reference images (P/R)")

        frechet = {2048: "FID (Fréchet distance, 2048-d pool)", 2023: "sFID (Fréchet distance, 2023-d spatial)"}
        load_inception, fdd_setup = ev.load_inception, ev._fdd_setup

        def timed_inception(*args, **kwargs):
            return self._hook(load_inception(*args, **kwargs), "Inception")

        def timed_fdd_setup(*args, **kwargs):
            model, ref, weights = fdd_setup(*args, **kwargs)
            return (self._hook(model, "DINOv2") if model is not None else None), ref, weights

        patches = [
            mock.patch.object(ev, "load_inception", self._wrap(timed_inception, lambda *a, **k: "load Inception")),
            mock.patch.object(ev, "_fdd_setup", self._wrap(timed_fdd_setup,
                                                           lambda *a, **k: "load DINOv2 + FDD reference")),
            mock.patch.object(ev, "extract_features", self._wrap(ev.extract_features, features_label)),
            mock.patch.object(ev, "_frechet", self._wrap(ev._frechet, lambda m, *a, **k: frechet.get(
                m.dim, f"FDD (Fréchet distance, {m.dim}-d DINOv2)"))),
            mock.patch.object(ev, "inception_score", self._wrap(ev.inception_score, lambda *a, **k: "IS")),
            mock.patch.object(ev, "precision_recall", self._wrap(ev.precision_recall,
                                                                 lambda *a, **k: "P/R (k = 3)")),
        ]
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield


def run(ctx: PartContext) -> list[dict[str, Any]]:
    """Prepare random weights, samples and references; then one ``evaluate`` with every stage timed."""
    import torch

    from bench.metrics.acceptance import fixtures
    from bench.metrics.evaluate import EvalOptions, evaluate
    from bench.metrics.networks import dinov2 as dino
    from bench.metrics.networks.inception import load_inception
    from bench.metrics.networks.weights import DINOV2_FILES, LAYOUT
    from bench.metrics.reference.build import build_fdd_reference, build_inception_reference
    from bench.metrics.sample_io import open_samples, write_samples_npz
    from bench.records.hashing import file_sha256

    plan = ctx.plan
    root = ctx.work_dir / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    device = "cuda:0" if ctx.device == "cuda" else "cpu"
    if ctx.device == "cpu":
        torch.set_num_threads(1)  # as tests/metrics: spin-waiting threads on a shared small CPU cost more
    n, size, arch = plan["n"], plan["size"], plan["dino_arch"]
    processes = min(16, len(os.sched_getaffinity(0))) if n >= 1000 else 1
    prep: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        sync(device)
        prep.append((name, time.perf_counter() - start))
        ctx.note(f"prep: {name}: {prep[-1][1]:.1f} s")

    with stage("images: samples + reference (fixtures.synthetic_images), written as ADM .npz"):
        samples = write_samples_npz(root / "samples.npz", synthetic_batches(n, size, 2, 0.3, processes=processes), n)
        ref_images = write_samples_npz(root / "ref_images.npz", synthetic_batches(n, size, 1, 0.0,
                                                                                  processes=processes), n)
    with stage(f"random weights: Inception + DINOv2 {arch} (fixtures.write_random_weights)"):
        weights = fixtures.write_random_weights(root / "weights", dinov2_arch=arch)
    inception_path = weights / LAYOUT["inception"].paths[0]
    dino_path = weights / "dinov2" / DINOV2_FILES[arch]
    with stage(f"reference statistics: Inception over {n} reference images (+ cached P/R features)"):
        build_inception_reference(open_samples(ref_images), load_inception(inception_path, device), root / "ref.npz",
                                  inception_sha256=file_sha256(inception_path), n_ref_pr=n,
                                  batch_size=plan["batch"], num_workers=plan["workers"])
    with stage(f"FDD reference: DINOv2 over {plan['fdd_ref_n']} reference images"):
        build_fdd_reference(open_samples(ref_images), dino.build_dinov2(dino_path, arch, device=device),
                            root / "fdd_ref.npz", arch=arch, dinov2_sha256=file_sha256(dino_path),
                            batch_size=plan["batch"], num_workers=plan["workers"], limit=plan["fdd_ref_n"])
    if device != "cpu":
        torch.cuda.empty_cache()
    ctx.info["prep"] = prep
    ctx.save()

    opts = EvalOptions(samples=samples, ref=root / "ref.npz", weights_dir=str(weights), out=root / "record.json",
                       fdd="on", fdd_ref=root / "fdd_ref.npz", fdd_arch=arch, batch_size=plan["batch"],
                       num_workers=plan["workers"], device=device, overwrite=True)
    timer = StageTimer(device)
    start = time.perf_counter()
    with timer.patched():
        record = evaluate(opts)
    total = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    pr = f"{record['precision']:.4f} / {record['recall']:.4f}" if record["precision"] is not None else None
    values = {"FID": record["fid"], "sFID": record["sfid"], "IS": record["is"], "FDD": record["fdd"], "P/R": pr}
    for name, seconds in timer.stages:
        key = next((k for k in ("sFID", "FID", "FDD", "IS", "P/R") if name.startswith(k)), None)
        images = n if name.startswith("features") else None
        rows.append(dict(stage=name, seconds=seconds, images=images, value=values.get(key)))
        if name.startswith("features of the samples"):
            extract = seconds
            for net, fwd in timer.forward_s.items():
                rows.append(dict(stage=f"  of which {net} forward ({n} images)", seconds=fwd, images=n, value=None))
            rows.append(dict(stage="  of which reading, DINOv2 resize (PIL), moments, digests",
                             seconds=extract - sum(timer.forward_s.values()), images=None, value=None))
    top = sum(r["seconds"] for r in rows if not r["stage"].startswith("  "))
    rows.append(dict(stage="other: weights sha256 verification, reference loading, record", seconds=total - top,
                     images=None, value=None))
    rows.append(dict(stage="**evaluate() total**", seconds=total, images=n, value=None))
    bad = [k for k in ("fid", "sfid", "is", "fdd", "precision", "recall")
           if not isinstance(record.get(k), float) or not math.isfinite(record[k])]
    ctx.info["non_finite"] = bad
    ctx.info["record_skipped"] = record.get("skipped")
    if bad:
        raise RuntimeError(f"evaluate() returned non-finite or missing metrics {bad}: {record.get('skipped')}")
    ctx.save(rows)
    return rows


def render(rows: list[dict], info: dict, plan: dict) -> list[str]:
    lines = [f"Setup: {plan['n']} samples and {plan['n']} reference images of {plan['size']}x{plan['size']} px "
             "(`bench.metrics.acceptance.fixtures.synthetic_images`), random-weight TF-2015 Inception and DINOv2 "
             f"`{plan['dino_arch']}` in the real file layout (`fixtures.write_random_weights`; the numbers are "
             "meaningless, the work is real). One `bench.metrics.evaluate.evaluate` (FID, sFID, IS, P/R k = 3 against "
             f"the {plan['n']} cached reference features, FDD), batch {plan['batch']}, {plan['workers']} loader "
             "workers; each stage timed where `evaluate` calls it (CUDA synchronised around it), the network "
             "forwards by hooks inside the single feature pass.", "",
             "| stage | seconds | images/s | value |", "|---|---|---|---|"]
    for r in rows:
        rate = f"{r['images'] / r['seconds']:.0f}" if r["images"] and r["seconds"] > 0 else "-"
        value = r["value"] if isinstance(r["value"], str) else ("-" if r["value"] is None else f"{r['value']:.4g}")
        lines.append(f"| {r['stage']} | {r['seconds']:.2f} | {rate} | {value} |")
    prep = info.get("prep") or []
    if prep:
        lines += ["", "Preparation (not part of the pipeline): "
                  + "; ".join(f"{name} {seconds:.1f} s" for name, seconds in prep) + "."]
    return lines
