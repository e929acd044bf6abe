"""Guided sampling on a CPU: seconds per image at each sampling batch (``sample.per_proc_batch``), one thread.

Why: sampling is about a quarter of the small suite's cost (256 images x 50 DDPM steps x cfg per evaluation, 162
evaluations), and the suite's batch (128) was set before the model's shapes were final (it samples at 32 since this
table). Each sample draws its label and noise from its own generator (``bench.run.sample``), so the batch changes
the speed, never the images: the table also gives the largest difference between the images of each batch and of
the reference batch.

For each batch, in the same process and interleaved round by round (so load changes hit every batch alike): draw
``--samples`` images of the small suite's model (DiT-T/2-d4, 16 px, 3 channels, 8 classes, exact GELU, learned
sigma) with its protocol (DDPM, ``--steps`` steps, cfg 3, x0 clipped), in chunks of that batch. Reported as the
median over rounds of seconds per image, and as a ratio to the reference batch of the same round.

Usage (from the repository root):
    python benchmarks/sample_batch.py                      # batches 16,32,64,128,256 against 128
    python benchmarks/sample_batch.py --rounds 2 --samples 64 --steps 5 --out /tmp/sample_batch.md

The table goes to stdout and to results/benchmarks/sample_batch_cpu.md (``--out``) with the machine and command.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # benchmark this checkout's code even when kindbench is not installed

import torch  # noqa: E402

from bench.diffusion import GaussianDiffusion  # noqa: E402
from bench.diffusion.sampling import sample  # noqa: E402
from bench.models.dit import build_dit  # noqa: E402


def draw(model, diffusion, samples: int, batch: int, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds to draw ``samples`` images in chunks of ``batch``, and the images (sample i's noise from seed i)."""
    labels = torch.arange(samples) % model.num_classes
    out = []
    start = time.perf_counter()
    for first in range(0, samples, batch):
        index = range(first, min(first + batch, samples))
        generators = [torch.Generator().manual_seed(i) for i in index]
        out.append(sample(model, labels[first:index.stop], shape=(3, 16, 16), scheduler="ddpm", num_steps=steps,
                          cfg_scale=3.0, generators=generators, diffusion=diffusion, clip_denoised=True))
    return time.perf_counter() - start, torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,32,64,128,256")
    parser.add_argument("--reference", type=int, default=128,
                        help="the batch the ratios are to (the small suite's when first measured)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "sample_batch_cpu.md")
    args = parser.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")} | {args.reference})
    torch.set_num_threads(1)  # the suites run one thread per job, a job per core
    torch.manual_seed(0)
    model = build_dit("DiT-T/2-d4", input_size=16, in_channels=3, num_classes=8, gelu="exact").eval()
    # DiT starts its gates and output layer at zero; open them so that the images depend on every layer
    for layer in [block.adaLN_modulation[-1] for block in model.blocks] + [model.final_layer.adaLN_modulation[-1],
                                                                          model.final_layer.linear]:
        torch.nn.init.normal_(layer.weight, std=0.02)
    diffusion = GaussianDiffusion(1000, "squaredcos_cap_v2", model.learn_sigma)
    seconds = {b: [] for b in batches}
    images = {}
    for _ in range(args.rounds):
        for b in batches:
            took, images[b] = draw(model, diffusion, args.samples, b, args.steps)
            seconds[b].append(took / args.samples)
    ratios = {b: statistics.median(s / r for s, r in zip(seconds[b], seconds[args.reference])) for b in batches}
    rows = [f"| {b}{' (reference)' if b == args.reference else ''} | {1e3 * statistics.median(seconds[b]):.1f} | "
            f"{1e3 * min(seconds[b]):.1f} - {1e3 * max(seconds[b]):.1f} | **{ratios[b]:.3f}x** | "
            f"{(images[b] - images[args.reference]).abs().max().item():.1e} |" for b in batches]
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    text = "\n".join([
        "# Guided sampling per image at each sampling batch (cpu)", "",
        f"Command: `{command}`", "",
        f"- CPU: {platform.processor() or platform.machine()}, 1 torch thread, torch {torch.__version__}, "
        f"{date.today().isoformat()}",
        f"- Model: DiT-T/2-d4, 16 px, 3 channels, 8 classes, exact GELU; {args.samples} images per round, DDPM "
        f"{args.steps} steps, cfg 3, x0 clipped; {args.rounds} rounds, batches interleaved in each round", "",
        f"| batch | ms per image (median) | range over rounds | / batch {args.reference} (median of same-round "
        "ratios) | largest image difference to the reference batch |",
        "|---:|---:|---|---:|---:|", *rows, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
