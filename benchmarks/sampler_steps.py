"""How many sampling steps does a trained run need before its samples show what it learned? Class accuracy per sampler.

Samples one finished run of a suite (``runs/<run_id>``) exactly as the suite's sample job does
(``bench.run.sample.sample_run``: same model, guidance, labels and per-sample noise streams) with several samplers
and step counts, and scores each batch as the suite's evaluate job does (``bench.metrics.domain_eval``) against the
task's reference. The ceiling is the class accuracy of the reference folder's floor (held-out real images at the
same count), as on the suite's leaderboards. The ``small`` suite's ``protocol.sample.num_steps`` was chosen with
this table:

    python benchmarks/sampler_steps.py --run-dir runs/scratch--ancestry-dense--DiT-T-2-d4--s0--<hash> \\
        --reference runs/references/prepare--ancestry--16px--<hash>/reference.npz \\
        --settings ddpm:25,ddpm:50,ddpm:100,ddim:25,ddim:50 --seeds 0,1,2

Each (sampler, steps, seed) writes its sample folder into the run directory beside the suite's own (the folder name
holds every setting, so a batch the suite already drew is reused, bit for bit). One row per batch and one mean row
per setting are appended to ``results/benchmarks/sampler_steps_cpu.md``; sampling seconds are one thread's
(``reused`` where the batch was drawn before).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.config.schema import SampleConfig  # noqa: E402
from bench.metrics.domain_eval import evaluate_domain  # noqa: E402
from bench.metrics.networks.domain import load_domain_extractor  # noqa: E402
from bench.run.engine import DistContext  # noqa: E402
from bench.run.sample import sample_run  # noqa: E402

TITLE = "# Sampling steps against class accuracy (`benchmarks/sampler_steps.py`)\n\n"
HEADER = ("| run | sampler | steps | seed | FID | precision | class acc | ceiling (real) | ratio | sampling s |\n"
          "|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
METRICS = ("fid", "precision", "class_acc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run of a suite (runs/<run_id>)")
    parser.add_argument("--reference", type=Path, required=True,
                        help="the task's reference.npz (runs/references/prepare--<task>--.../reference.npz)")
    parser.add_argument("--settings", default="ddpm:25,ddpm:50,ddpm:100", help="sampler:steps pairs")
    parser.add_argument("--seeds", default="0,1,2", help="sampling seeds (the suite's seed s samples with seed s)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "sampler_steps_cpu.md")
    return parser.parse_args(argv)


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``"ddpm:25,ddim:50"`` -> ``[("ddpm", 25), ("ddim", 50)]``; a malformed pair is a one-line error."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, steps = item.partition(":")
        if not name or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--settings: {item!r} is not sampler:steps (e.g. ddpm:50)")
        pairs.append((name, int(steps)))
    return pairs


def ceiling(reference: Path, extractor) -> float | None:
    """Class accuracy of the held-out real images (``floor.npz``) beside the reference; None where there is none."""
    floor = reference.parent / "floor.npz"
    if not floor.is_file():
        return None
    record = evaluate_domain(floor, reference, extractor, protocol={"source": "held-out real images"})
    return record["metrics"]["class_acc"]["value"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = parse_settings(args.settings)
    for path in (args.run_dir / "export.safetensors", args.reference):
        if not path.is_file():
            raise SystemExit(f"{path} not found")
    torch.set_num_threads(args.threads)
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="none",
                      launcher="single")
    extractor = load_domain_extractor(None)
    top = ceiling(args.reference, extractor)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows: list[str] = []
    for name, steps in pairs:
        values: list[dict[str, float]] = []
        for seed in seeds:
            settings = SampleConfig(num_samples=args.num_samples, per_proc_batch=128, scheduler=name, num_steps=steps,
                                    cfg_scale=args.cfg, label_mode="balanced", seed=seed)
            start, wall_start = time.perf_counter(), time.time()
            info = sample_run(args.run_dir, settings, ctx)
            # a batch drawn before (by the suite or an earlier call) is reused, not timed
            chunks = list((Path(info["npz"]).parent / "parts").glob("chunk_*.npz"))
            reused = bool(chunks) and max(c.stat().st_mtime for c in chunks) < wall_start
            seconds = "reused" if reused else f"{time.perf_counter() - start:.0f}"
            record = evaluate_domain(info["npz"], args.reference, extractor,
                                     protocol={"sampler": name, "num_steps": steps})
            value = {key: record["metrics"][key]["value"] for key in METRICS}
            values.append(value)
            rows.append(row(args.run_dir.name, name, steps, str(seed), value, top, seconds))
            print(rows[-1], end="", flush=True)
        mean = {key: sum(v[key] for v in values) / len(values) for key in METRICS}
        rows.append(row(args.run_dir.name, name, steps, "**mean**", mean, top, ""))
    if not args.out.exists():
        args.out.write_text(TITLE + f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
                            f"{args.num_samples} samples (balanced labels), cfg {args.cfg:g}, EMA weights; "
                            f"ratio = class acc / ceiling.\n")
    with args.out.open("a") as handle:
        handle.write(f"\n`{shlex.join(['python', 'benchmarks/sampler_steps.py', *(argv or sys.argv[1:])])}`\n\n"
                     + HEADER)
        handle.writelines(rows)
    return 0


def row(run: str, name: str, steps: int, seed: str, value: dict[str, float], top: float | None, seconds: str) -> str:
    ratio = f"{value['class_acc'] / top:.3f}" if top else "n/a"
    return (f"| {run} | {name} | {steps} | {seed} | {value['fid']:.2f} | {value['precision']:.3f} | "
            f"{value['class_acc']:.3f} | {top if top is None else f'{top:.3f}'} | {ratio} | {seconds} |\n")


if __name__ == "__main__":
    raise SystemExit(main())
