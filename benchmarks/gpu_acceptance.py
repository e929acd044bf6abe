"""GPU acceptance: one command, under 8 minutes on one H100/H200 (no network), five measurements in one run.

    python benchmarks/gpu_acceptance.py                    # every part, full size (needs CUDA)
    python benchmarks/gpu_acceptance.py --parts a,c        # some parts
    python benchmarks/gpu_acceptance.py --smoke            # every part at toy sizes on the CPU (CI)
    python benchmarks/gpu_acceptance.py --smoke --device cuda   # toy sizes on the GPU, a check before the real run
    bash benchmarks/gpu_acceptance.sh ...                  # the same (a wrapper that execs this file)

Parts (each in a fresh process, with its own time budget; a part that overruns is killed and reported, the others
still run); each is one module of ``gpu_acceptance_parts/``, whose docstring says what it measures and how:

a. ``train``: training throughput and MFU of our DiT vs diffusers' ``DiTTransformer2DModel``, DeepSpeed ZeRO-2.
b. ``kind``: KIND's tailor computes ``masked`` vs ``grouped`` vs the dense DiT, training step.
c. ``preempt``: preemption under ``torchrun`` (SIGUSR1, checkpoint, requeue exit code), bit-identical resume; its
   trainer is this file again, in its ``--deterministic-trainer`` mode.
d. ``sampling``: sampling throughput at cfg 1.5 (the sampler's own chunk function, DDPM, SD-VAE decode).
e. ``metrics``: the metric pipeline (``bench.metrics.evaluate.evaluate``) on random-weight networks, time per stage.

Output: one Markdown table per part, ``<out>/gpu_acceptance_<part>_<name>_gpu.md`` (``a_train``, ``b_kind``,
``c_preempt``, ``d_sampling``, ``e_metrics``; ``_smoke.md`` instead with ``--smoke``, so a CI smoke run never
overwrites a GPU result), each naming the GPU, the torch/CUDA/DeepSpeed/diffusers versions, the git commit, the date
and the exact command; plus ``<out>/gpu_acceptance_gpu.md`` (or ``_smoke.md``): the parts of this invocation, their
wall time and verdict. Each part prints its wall time against its budget; the full run's budgets sum to under 8
minutes.

Exit codes: 0 when every part ran and every check passed; 1 when a part failed, timed out or a check failed;
2 for a usage error. Without ``--smoke`` on a machine where ``torch.cuda.is_available()`` is false the script prints
one line saying so and exits 0 at once: CI, which has no GPU, "runs" it cleanly and runs ``--smoke`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))  # measure this checkout's code even when kindbench is not installed
sys.path.insert(1, str(BENCHMARKS))  # the parts (gpu_acceptance_parts/), which reuse train_step.py and kind_layer.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gpu_acceptance_parts import kind, metrics, preempt, sampling, train  # noqa: E402
from gpu_acceptance_parts.common import PartContext, run_checked  # noqa: E402
from gpu_acceptance_parts.report import machine_lines, render_part, render_summary  # noqa: E402

NO_CUDA_MESSAGE = ("gpu_acceptance: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
                   "machine, or use --smoke for the CPU smoke test")


class Part(NamedTuple):
    slug: str
    """In the part's file name, ``gpu_acceptance_<part>_<slug>_<gpu|smoke>.md``."""
    title: str
    module: ModuleType
    """``run(ctx: PartContext) -> rows`` (saved with ``ctx.save`` as they come) and ``render(rows, info, plan) ->``
    the Markdown lines of the part's table."""


PARTS: dict[str, Part] = {
    "a": Part("train", "training throughput and MFU: kindbench DiT vs diffusers DiTTransformer2DModel, DeepSpeed "
              "ZeRO-2", train),
    "b": Part("kind", "KIND tailor compute: masked vs grouped vs dense DiT, paper preset and full rank", kind),
    "c": Part("preempt", "torchrun preemption: SIGUSR1, checkpoint, requeue exit code, bit-identical resume", preempt),
    "d": Part("sampling", "sampling throughput at cfg 1.5 (DDPM, SD-VAE decode)", sampling),
    "e": Part("metrics", "metric pipeline on random-weight networks: time per stage", metrics),
}
TOTAL_BUDGET_S = 480  # the "under 8 minutes on one GPU"

# Sizes of the real run (one H100/H200) and of the smoke run (a 2-core CPU). Budgets are hard limits per part (the
# part's process is killed past them); loops inside a part also stop early when their budget runs short.
GPU_PLAN: dict[str, dict[str, Any]] = {
    "a": dict(archs=["DiT-B/2", "DiT-L/2"], batch=32, input_size=32, in_channels=4, num_classes=1000,
              precision="bf16", warmup=5, steps=20, matmul_n=8192, matmul_iters=20, budget_s=110),
    "b": dict(archs=["DiT-B/2", "DiT-L/2"], batch=32, input_size=32, in_channels=4, num_classes=150,
              precision="bf16", warmup=2, rounds=8, budget_s=90),
    "c": dict(arch="DiT-S/2", image_size=32, per_class=8, global_batch=32, steps=200, signal_after=20,
              precision="bf16", control_run=True, budget_s=90),
    "d": dict(archs=["DiT-L/2", "DiT-XL/2"], batch=32, input_size=32, num_classes=1000, short_steps=3,
              long_steps=13, repeats=1, cfg_scale=1.5, vae="sd", budget_s=50),
    "e": dict(n=10_000, size=256, dino_arch="vit_large_patch14_dinov2", fdd_ref_n=2000, batch=200, workers=8,
              budget_s=125),
}
SMOKE_PLAN: dict[str, dict[str, Any]] = {
    "a": dict(archs=["DiT-T/2"], batch=4, input_size=8, in_channels=4, num_classes=10, precision="bf16", warmup=1,
              steps=2, matmul_n=256, matmul_iters=3, budget_s=240),
    "b": dict(archs=["DiT-T/2"], batch=4, input_size=8, in_channels=4, num_classes=10, precision="fp32", warmup=1,
              rounds=2, budget_s=240),
    "c": dict(arch="DiT-T/2", image_size=16, per_class=2, global_batch=8, steps=16, signal_after=3,
              precision="bf16", control_run=False, budget_s=400),
    "d": dict(archs=["DiT-T/2"], batch=2, input_size=8, num_classes=10, short_steps=1, long_steps=6, repeats=3,
              cfg_scale=1.5, vae="tiny", budget_s=240),
    "e": dict(n=48, size=32, dino_arch="vit_small_patch14_dinov2", fdd_ref_n=24, batch=16, workers=0,
              budget_s=400),
}


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration: each part in a fresh process with a time limit; one Markdown file per part
# ---------------------------------------------------------------------------------------------------------------------


def run_part_child(settings_path: Path) -> int:
    """Child process: run one part, write its rows (also on failure: what it had) and the error to the result file."""
    settings = json.loads(settings_path.read_text())
    ctx = PartContext(part=settings["part"], plan=settings["plan"], device=settings["device"],
                      smoke=settings["smoke"], work_dir=Path(settings["work_dir"]), deadline=settings["deadline"],
                      result_path=Path(settings["result_path"]))
    try:
        rows = PARTS[ctx.part].module.run(ctx)
    except BaseException as err:  # noqa: BLE001 - reported in the table; the orchestrator goes on with other parts
        ctx.info["error"] = f"{type(err).__name__}: {err}"
        ctx.info["traceback"] = traceback.format_exc()[-4000:]
        ctx.save()
        traceback.print_exc()
        return 1
    ctx.save(rows)
    return 0


def run_part(part: str, plan: dict[str, Any], device: str, smoke: bool, work_dir: Path) -> dict[str, Any]:
    """Run ``part`` in a fresh process within its budget; returns rows, info, notes, error and wall time."""
    budget = plan["budget_s"]
    part_dir = work_dir / f"part_{part}"
    part_dir.mkdir(parents=True, exist_ok=True)
    result_path = part_dir / "result.json"
    start = time.time()
    settings = dict(part=part, plan=plan, device=device, smoke=smoke, work_dir=str(part_dir),
                    deadline=start + budget - 3, result_path=str(result_path))
    settings_path = part_dir / "settings.json"
    settings_path.write_text(json.dumps(settings))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    elif env.get("DS_ACCELERATOR") == "cpu":  # left over from a CPU shell setup: DeepSpeed would not use the GPU
        del env["DS_ACCELERATOR"]
    error = None
    try:
        proc = run_checked([sys.executable, str(Path(__file__).resolve()), "--run-part", str(settings_path)],
                           timeout=budget, env=env, cwd=REPO_ROOT)
        if proc.returncode != 0:
            error = f"the part's process exited with {proc.returncode}"
    except TimeoutError:
        error = f"timed out: killed at its budget of {budget} s"
    wall = time.time() - start
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"rows": [], "info": {}, "notes": []}
    error = result["info"].pop("error", None) or error
    checks_failed = [r["check"] for r in result["rows"] if r.get("ok") is False]
    return dict(part=part, title=PARTS[part].title, rows=result["rows"], info=result["info"], notes=result["notes"],
                wall_s=wall, budget_s=budget, error=error, failed_checks=checks_failed,
                ok=error is None and not checks_failed and bool(result["rows"]))


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; choose from {','.join(PARTS)}")
    return list(dict.fromkeys(parts))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_acceptance", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Parts: " + "; ".join(f"{k} = {v.title}" for k, v in PARTS.items()))
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS), help="comma-separated (default: a,b,c,d,e)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks",
                        help="folder for the Markdown tables (default: results/benchmarks)")
    parser.add_argument("--smoke", action="store_true",
                        help="every part at toy sizes (CPU unless --device cuda); tables named *_smoke.md")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda for the real run, cpu for --smoke")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep intermediate files (runs, images, weights) here (default: a temporary folder)")
    parser.add_argument("--run-part", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--deterministic-trainer"]:  # part (c)'s torchrun worker
        return preempt.deterministic_trainer(argv[1:])
    args = parse_args(argv)
    if args.run_part is not None:
        return run_part_child(args.run_part)
    import torch

    if not args.smoke:
        if args.device == "cpu":
            print("gpu_acceptance: the full-size run needs a GPU; --device cpu is only for --smoke", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print(NO_CUDA_MESSAGE)
            return 0
        device = "cuda"
    else:
        device = "cpu" if args.device == "auto" else args.device
        if device == "cuda" and not torch.cuda.is_available():
            print(NO_CUDA_MESSAGE)
            return 0
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    suffix = "smoke" if args.smoke else "gpu"
    command = shlex.join(["python", "benchmarks/gpu_acceptance.py", *argv])
    header = machine_lines(device)
    budget = sum(plan[p]["budget_s"] for p in args.parts)
    print(f"gpu_acceptance: parts {','.join(args.parts)} on {device}{' (smoke)' if args.smoke else ''}; "
          f"budgets sum to {budget} s", flush=True)
    print("\n".join(header), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    files = {p: args.out / f"gpu_acceptance_{p}_{PARTS[p].slug}_{suffix}.md" for p in args.parts}
    outcomes = []
    start = time.time()
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            work_dir = args.work_dir.resolve()  # the parts run from the repository root
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-acceptance-")))
        for part in args.parts:
            print(f"\n== part {part}: {PARTS[part].title} (budget {plan[part]['budget_s']} s)", flush=True)
            outcome = run_part(part, plan[part], device, args.smoke, work_dir)
            outcomes.append(outcome)
            markdown = render_part(outcome, PARTS[part].module.render, plan[part], header, command, args.smoke)
            files[part].write_text(markdown)
            print(markdown, flush=True)
            print(f"== part {part}: {'PASS' if outcome['ok'] else 'FAIL'} in {outcome['wall_s']:.1f} s "
                  f"(budget {plan[part]['budget_s']} s), written to {files[part]}", flush=True)
    total = time.time() - start
    summary = args.out / f"gpu_acceptance_{suffix}.md"
    summary.write_text(render_summary(outcomes, header, command, args.smoke, total, TOTAL_BUDGET_S, files))
    for o in outcomes:
        print(f"  part {o['part']}: {'PASS' if o['ok'] else 'FAIL'} {o['wall_s']:6.1f} s  {o['title']}")
    print(f"gpu_acceptance: total {total:.1f} s; summary in {summary}", flush=True)
    return 0 if all(o["ok"] for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
