"""Does a pre-training recipe make the embedded DiT learn its classes? Class accuracy of samples against the ceiling.

Trains a plain DiT (the dense ancestry: every pre-training class, no method) on the synthetic data with one recipe,
samples it, and scores the samples' class-conditional accuracy with the suite's domain classifier
(``bench.metrics.domain_eval.class_hits``) next to the same classifier's accuracy on held-out real images (the
ceiling). The ``small`` suite's recipe was chosen with these rows; ``small``'s ancestry leaderboard is the check.
One row per (recipe, checkpoint, guidance scale), appended to the table, so recipes measured on other days add up:

    python benchmarks/embedded_recipe.py --arch DiT-T/2-d4 --beta squaredcos_cap_v2 --lr 5e-3 --steps 6000 \\
        --checkpoints 3000,6000 --cfg 1.5,3      # appends to results/benchmarks/embedded_recipe_cpu.md

Measured in one process on ``--threads`` threads (the suite runs one thread per job, two jobs side by side).
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.data.synthetic import SyntheticImages, synthetic_split  # noqa: E402
from bench.diffusion.process import GaussianDiffusion  # noqa: E402
from bench.diffusion.sampling import sample  # noqa: E402
from bench.metrics.domain_eval import class_hits  # noqa: E402
from bench.metrics.networks.domain import load_domain_extractor  # noqa: E402
from bench.models.dit import build_dit  # noqa: E402

HEADER = ("| arch | beta | lr | warm-up | batch | images/class | steps | cfg | class acc (samples) | ceiling (real) "
          "| ratio | train s | img/s | command |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
TITLE = "# Embedded pre-training recipes: class accuracy of samples (`benchmarks/embedded_recipe.py`)\n\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="DiT-T/2-d4")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--split", default="pretrain")
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--beta", default="squaredcos_cap_v2", help="linear (DiT) or squaredcos_cap_v2 (IDDPM)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--checkpoints", default="", help="steps at which the EMA model is scored too, e.g. 3000")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--cfg", default="1.5,3", help="guidance scales the samples are drawn at")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "embedded_recipe_cpu.md")
    return parser.parse_args(argv)


def score(model: torch.nn.Module, classes: list[int], diffusion: GaussianDiffusion, extractor, args,
          cfg_scale: float) -> float:
    """Class accuracy of ``args.samples`` balanced samples (DDPM, clipped x_0, per-sample seeded noise)."""
    labels = torch.arange(args.samples) % len(classes)
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(args.samples)]
    x = sample(model, labels, shape=(3, args.image_size, args.image_size), scheduler="ddpm",
               num_steps=args.sampling_steps, cfg_scale=cfg_scale, diffusion=diffusion, generators=generators,
               clip_denoised=True)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(class_hits(extractor.features(images)[1], labels.numpy(), classes).mean())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    classes = synthetic_split(args.split)
    data = SyntheticImages(classes, image_size=args.image_size, per_class=args.per_class)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.as_tensor(data.labels)
    model = build_dit(args.arch, input_size=args.image_size, in_channels=3, num_classes=len(classes))
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = GaussianDiffusion(beta_schedule=args.beta)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    extractor = load_domain_extractor()
    held_out = SyntheticImages(classes, image_size=args.image_size, per_class=16, first_index=args.per_class + 1000)
    ceiling = float(class_hits(extractor.features(held_out.images_uint8())[1], held_out.labels, classes).mean())
    checkpoints = sorted({int(s) for s in args.checkpoints.split(",") if s} | {args.steps})
    scales = [float(c) for c in args.cfg.split(",")]
    order = torch.Generator().manual_seed(args.seed)
    command = "python benchmarks/embedded_recipe.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    train_s, rows = 0.0, []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        batch = torch.randint(0, len(images), (args.batch,), generator=order)
        t = torch.randint(0, diffusion.num_timesteps, (args.batch,), generator=order)
        loss = diffusion.training_losses(model, images[batch], t, {"y": labels[batch]})["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(args.ema).add_(p, alpha=1 - args.ema)
        train_s += time.perf_counter() - start
        if step in checkpoints:
            for scale in scales:
                acc = score(ema, classes, diffusion, extractor, args, scale)
                rows.append(f"| {args.arch} | {args.beta} | {args.lr:g} | {args.warmup} | {args.batch} | "
                            f"{args.per_class} | {step} | {scale:g} | {acc:.3f} | {ceiling:.3f} | "
                            f"{acc / ceiling:.2f} | {train_s:.0f} | {step * args.batch / train_s:.0f} | "
                            f"`{command}` |\n")
                print(rows[-1], end="", flush=True)
    if not args.out.exists():  # written with the first rows, so an interrupted run leaves no empty table
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(TITLE + f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
                            "256 samples unless the command says otherwise, DDPM 25 steps, EMA weights.\n\n" + HEADER)
    with args.out.open("a") as handle:
        handle.writelines(rows)
    if not np.isfinite(loss.item()):
        print("the training loss is not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
