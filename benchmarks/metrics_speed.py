"""Speed of the metrics on this machine, against the library routes; writes results/benchmarks/metrics_speed_cpu.md.

    python benchmarks/metrics_speed.py [--pr-n 10000] [--images 48] [--threads N] [--out results/benchmarks/...]

On a shared machine pin BLAS and torch to one thread each (spin-waiting threads under load distort every number):
``OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/metrics_speed.py --threads 1``.

1. Fréchet distance at d = 2048: ours (Cholesky congruence, and the textbook eigh route) against clean-fid's
   ``frechet_distance`` (``scipy.linalg.sqrtm``) on the same statistics. Target: >= 5x faster, relative difference
   <= 1e-10.
2. Inception feature extraction on the same uint8 images and the same (random) weights: ours (TF1 resize inside,
   three heads) against torch-fidelity's ``FeatureExtractorInceptionV3`` (pool + unbiased logits) and clean-fid's
   pipeline (per-channel float PIL-bicubic resize + its ``InceptionV3W`` wrapper around a TorchScript stand-in of the
   same network, because NVIDIA's TorchScript file cannot be had offline).
3. Precision/recall (k = 3, 2048-d): our blocked implementation against a full-matrix numpy float64 brute force. The
   size is ``--pr-n`` for both sets if the brute force is predicted to finish in about a minute, otherwise the
   largest size that does (the choice is printed and written down).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.metrics.acceptance import fixtures  # noqa: E402
from bench.metrics.networks.inception import load_inception, random_inception_state_dict  # noqa: E402
from bench.metrics.scores.frechet import frechet_distance  # noqa: E402
from bench.metrics.scores.precision_recall import precision_recall, precision_recall_bruteforce  # noqa: E402


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def relu_cov(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, d), dtype=np.float32) @ (rng.standard_normal((d, d), dtype=np.float32)
                                                                     / np.float32(np.sqrt(d))) + 0.2, 0)
    x = x.astype(np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def bench_frechet(d: int = 2048, n: int = 6000) -> list[tuple]:
    from cleanfid.fid import frechet_distance as cleanfid_fd

    mu1, s1 = relu_cov(n, d, 1)
    mu2, s2 = relu_cov(n, d, 2)
    t_lib, v_lib = timed(lambda: cleanfid_fd(mu1, s1, mu2, s2))
    rows = [("clean-fid frechet_distance (scipy sqrtm)", t_lib, float(v_lib), 1.0, 0.0)]
    for method in ("cholesky", "eigh"):
        t, res = timed(lambda method=method: frechet_distance(mu1, s1, mu2, s2, method=method), repeats=2)
        rows.append((f"ours, {method}", t, res.value, t_lib / t, abs(res.value - v_lib) / abs(v_lib)))
    return rows


def bench_extraction(n_images: int, batch: int, workdir: Path) -> list[tuple]:
    from cleanfid.resize import build_resizer
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from bench.metrics.scores import cleanfid_extras as cx

    weights = workdir / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(0), weights)
    standin = fixtures.write_cleanfid_standin(weights, workdir / "inception-2015-12-05.pt")
    images = fixtures.synthetic_images(n_images, 256, seed=3)
    ours = load_inception(weights)
    tfid = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(weights))
    clean = cx.load_cleanfid_inception(standin.parent, "cpu")
    resize = build_resizer("clean")

    def run_ours():
        with torch.no_grad():
            return torch.cat([ours(torch.from_numpy(images[a:a + batch])).pool for a in range(0, n_images, batch)])

    def run_tfid():
        with torch.no_grad():
            return torch.cat([tfid(torch.from_numpy(images[a:a + batch]).permute(0, 3, 1, 2).contiguous())[0]
                              for a in range(0, n_images, batch)])

    def run_clean():
        out = []
        with torch.no_grad():
            for a in range(0, n_images, batch):
                x = np.stack([resize(im) for im in images[a:a + batch]])
                out.append(clean(torch.from_numpy(x).permute(0, 3, 1, 2)))
        return torch.cat(out)

    run_ours()  # warm-up (allocator, oneDNN primitive cache)
    rows = []
    t_ours, f_ours = timed(run_ours)
    t_tfid, f_tfid = timed(run_tfid)
    t_clean, _ = timed(run_clean)
    diff = float((f_ours - f_tfid).abs().max() / f_tfid.abs().max())
    rows.append(("ours: TF1 resize + pool/spatial/logits", t_ours, n_images / t_ours,
                 f"max rel diff vs TFID {diff:.1e}"))
    rows.append(("torch-fidelity 0.4.0: TF1 resize + pool/logits", t_tfid, n_images / t_tfid,
                 "independent network code"))
    rows.append(("clean-fid 'clean': PIL float bicubic + InceptionV3W", t_clean, n_images / t_clean,
                 "TorchScript stand-in of the same weights"))
    return rows


def bench_pr(n_target: int, d: int = 2048, budget_s: float = 60.0) -> tuple[list[tuple], str]:
    rng = np.random.default_rng(4)
    probe = 1500
    real = np.maximum(rng.standard_normal((probe, d), dtype=np.float32), 0)
    fake = np.maximum(rng.standard_normal((probe, d), dtype=np.float32), 0)
    t_probe, _ = timed(lambda: precision_recall_bruteforce(real, fake))
    predicted = t_probe * (n_target / probe) ** 2  # three n×n distance matrices: quadratic in n
    n = n_target if predicted <= 1.5 * budget_s else int(probe * (budget_s / t_probe) ** 0.5) // 100 * 100
    note = (f"brute force predicted {predicted:.0f} s at n={n_target} (from {t_probe:.1f} s at n={probe}); "
            + ("ran the requested size" if n == n_target else f"ran n={n} (about {budget_s:.0f} s) instead"))
    real = np.maximum(rng.standard_normal((n, d), dtype=np.float32), 0)
    fake = np.maximum(rng.standard_normal((n, d), dtype=np.float32) * 1.002, 0)  # nearly the same distribution
    t_ours, pr = timed(lambda: precision_recall(real, fake))
    t_bf, (bp, br) = timed(lambda: precision_recall_bruteforce(real, fake))
    same = (pr.precision, pr.recall) == (bp, br)
    rows = [(f"brute force numpy float64, {n} x {n}", t_bf, bp, br, "reference"),
            (f"ours blocked fp32 (4096-row blocks), {n} x {n}", t_ours, pr.precision, pr.recall,
             f"{t_bf / t_ours:.1f}x faster; identical P and R: {same}")]
    return rows, note


def machine() -> str:
    cpu = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import numpy
    import scipy

    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"OPENBLAS_NUM_THREADS={blas}, "
            f"numpy {numpy.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}, "
            f"load average at start {os.getloadavg()[0]:.1f}")


def _command_line(argv) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ)
    args = " ".join(sys.argv[1:] if argv is None else argv)
    return " ".join(x for x in (env, "python benchmarks/metrics_speed.py", args) if x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pr-n", type=int, default=10_000)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=REPO / "results/benchmarks/metrics_speed_cpu.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(info)
    lines = ["# Metrics speed on CPU", "", f"Machine: {info}.", "",
             f"Produced by `{_command_line(argv)}`. Times are the best of the repeats in the script; the machine "
             "is shared, so absolute times carry the load noted above.", ""]

    fd = bench_frechet()
    lines += ["## Fréchet distance, d = 2048 (same statistics, float64)", "",
              "| implementation | time (s) | FD | speed-up vs clean-fid | relative difference |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {t:.2f} | {v:.12f} | {s:.1f}x | {r:.1e} |" for name, t, v, s, r in fd]
    print("\n".join(lines[-len(fd) - 2:]))

    with tempfile.TemporaryDirectory() as tmp:
        ex = bench_extraction(args.images, args.batch, Path(tmp))
    lines += ["", f"## Inception feature extraction ({args.images} images, 256x256, batch {args.batch}, same weights)",
              "", "| pipeline | time (s) | images/s | note |", "|---|---|---|---|"]
    lines += [f"| {name} | {t:.2f} | {r:.2f} | {note} |" for name, t, r, note in ex]
    print("\n".join(lines[-len(ex) - 2:]))

    pr, note = bench_pr(args.pr_n)
    lines += ["", "## Precision/recall, k = 3, 2048-d features", "", note, "",
              "| implementation | time (s) | precision | recall | note |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {t:.1f} | {pp:.4f} | {rr:.4f} | {n} |" for name, t, pp, rr, n in pr]
    print("\n".join(lines[-len(pr) - 4:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
