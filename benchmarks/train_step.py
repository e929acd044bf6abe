"""Training-step throughput and peak memory: kindbench's DiT vs diffusers' DiTTransformer2DModel.

Both models get the same size, batch, inputs, loss (MSE to a fixed target) and optimizer (AdamW, lr 1e-4, the DiT
recipe). Every configuration runs in a fresh subprocess, so peak memory is that process's own high-water mark:
peak RSS (``resource.getrusage`` maxrss) on CPU, ``torch.cuda.max_memory_allocated`` on GPU. On CPU the runs are
fp32 (bf16 without AMX is not representative); on CUDA bf16 autocast is measured too, with model FLOPs
utilisation MFU = images/s x (3 x forward MACs x 2 FLOPs) / peak dense bf16 FLOP/s, forward MACs from
``bench.models.accounting`` (DiT's convention; 3x for forward + backward of a fully trained model).

Usage (from the repository root):
    python benchmarks/train_step.py                      # CPU: DiT-S/2 and DiT-B/2, 32x32x4 latents
    python benchmarks/train_step.py --batch-size 8 --steps 5

The table goes to stdout and to results/benchmarks/train_step_<device>.md with the machine and the command.
``--engine`` selects how a training step is executed: ``plain`` (eager forward/backward/AdamW step) or
``deepspeed`` (ZeRO-2 through ``bench.run.engine``, the trainer's own seam; on a GPU: ``--engine deepspeed`` gives the
issue's bf16 images/s and MFU for DiT-B/2 and DiT-L/2 at batch 32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # benchmark this checkout's code even when kindbench is not installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.models.accounting import forward_gmacs_for_arch  # noqa: E402
from bench.models.dit import DIT_FLAVOURS, parse_flavour  # noqa: E402

# Peak dense bf16 tensor-core FLOP/s (vendor datasheets, no sparsity). Matched against torch.cuda.get_device_name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}

IMPLEMENTATIONS = ("ours", "diffusers")


# ---------------------------------------------------------------------------------------------------------------------
# Child process: build one model, run warm-up + timed steps, report one JSON line
# ---------------------------------------------------------------------------------------------------------------------


def build_model(impl: str, arch: str, input_size: int, in_channels: int, num_classes: int) -> torch.nn.Module:
    flavour = parse_flavour(arch)  # named flavours and their depth/width variants (DiT-T/2-d4)
    if impl == "ours":
        from bench.models.dit import build_dit

        return build_dit(arch, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    if impl == "diffusers":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(
            num_attention_heads=flavour.num_heads,
            attention_head_dim=flavour.hidden_size // flavour.num_heads,
            in_channels=in_channels,
            out_channels=2 * in_channels,
            num_layers=flavour.depth,
            sample_size=input_size,
            patch_size=flavour.patch_size,
            num_embeds_ada_norm=num_classes,
            norm_eps=1e-6,  # DiT's value (diffusers' default is 1e-5); same cost either way
        )
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLEMENTATIONS}")


def model_call(impl: str, model: torch.nn.Module) -> Callable:
    if impl == "diffusers":
        return lambda x, t, y: model(x, timestep=t, class_labels=y).sample
    return model


def plain_train_step(impl: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     autocast_dtype: torch.dtype | None) -> Callable:
    """Eager training step: forward (optionally under autocast), MSE loss, backward, AdamW step."""
    device_type = next(model.parameters()).device.type
    forward = model_call(impl, model)

    def step(x, t, y, target):
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = forward(x, t, y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def deepspeed_train_step(impl: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         autocast_dtype: torch.dtype | None) -> Callable:
    """A step through the trainer's own seam (bench.run.engine): DeepSpeed ZeRO-2, bf16 weights with fp32 masters
    when bf16, the config generated from the config tree. ``optimizer`` is unused: the engine builds its AdamW."""
    from bench.config.schema import from_dict
    from bench.run.engine import build_engine, init_distributed

    precision = "bf16" if autocast_dtype is torch.bfloat16 else "fp32"
    cfg = from_dict({"engine": {"backend": "deepspeed", "zero_stage": 2, "precision": precision},
                     "optim": {"lr": 1e-4}})
    ctx = init_distributed(cfg.engine)
    groups = [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad]}]
    # micro batch 1 only sizes DeepSpeed's bookkeeping; the step itself sees the real batch
    engine = build_engine(ctx, model, groups, cfg, micro=1, accum=1)
    forward = model_call(impl, engine.forward_module)

    def step(x, t, y, target):
        with engine.autocast():
            out = forward(x, t, y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        engine.backward(loss)
        engine.step()
        return loss

    return step


# The engine hook: name -> factory(impl, model, optimizer, autocast_dtype) -> step(x, t, y, target).
ENGINES: dict[str, Callable] = {"plain": plain_train_step, "deepspeed": deepspeed_train_step}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(cfg: dict) -> dict:
    import diffusers  # noqa: F401  (both libraries imported in every child: identical memory baseline)

    import bench.models.dit  # noqa: F401

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    baseline_rss = current_rss_bytes()
    model = build_model(cfg["impl"], cfg["arch"], cfg["input_size"], cfg["in_channels"], cfg["num_classes"])
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg["precision"]]
    step = ENGINES[cfg["engine"]](cfg["impl"], model, optimizer, autocast_dtype)

    n, c, s = cfg["batch_size"], cfg["in_channels"], cfg["input_size"]
    x = torch.randn(n, c, s, s, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    y = torch.randint(0, cfg["num_classes"], (n,), device=device)
    target = torch.randn(n, 2 * c, s, s, device=device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(cfg["warmup"]):
        step(x, t, y, target)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        loss = step(x, t, y, target)
    synchronize()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in {cfg}")

    result = {**cfg, "images_per_s": n * cfg["steps"] / elapsed, "step_s": elapsed / cfg["steps"],
              "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        result["peak_mem_mib"] = peak_rss / 2**20
        result["peak_mem_delta_mib"] = (peak_rss - baseline_rss) / 2**20
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Parent: plan the configurations, run each in a fresh process, write the table
# ---------------------------------------------------------------------------------------------------------------------


def run_in_subprocess(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {cfg}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace, device: str) -> list[dict]:
    base = dict(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
                warmup=args.warmup, steps=args.steps, engine=args.engine, device=device)
    configs = []
    precisions = ["fp32", "bf16"] if device == "cuda" else ["fp32"]
    archs = args.archs or (["DiT-B/2", "DiT-L/2"] if device == "cuda" else ["DiT-S/2", "DiT-B/2"])
    batch = args.batch_size or (32 if device == "cuda" else 4)
    for precision in precisions:
        for arch in archs:
            for repeat in range(args.repeats):
                # Alternate implementations within a repeat so slow drifts in machine load hit both alike.
                for impl in IMPLEMENTATIONS:
                    configs.append(dict(base, impl=impl, arch=arch, batch_size=batch, precision=precision,
                                        repeat=repeat))
    return configs


def summarise(results: list[dict], device: str) -> list[dict]:
    """One row per (precision, arch): the best repeat of each implementation and the ratio ours / diffusers."""
    peak = peak_bf16_flops() if device == "cuda" else None
    rows = []
    keys = dict.fromkeys((r["precision"], r["arch"]) for r in results)  # plan order, no duplicates
    for precision, arch in keys:
        best = {}
        for impl in IMPLEMENTATIONS:
            runs = [r for r in results if (r["precision"], r["arch"], r["impl"]) == (precision, arch, impl)]
            best[impl] = max(runs, key=lambda r: r["images_per_s"])
        ref = best["ours"]
        gmacs = forward_gmacs_for_arch(arch, ref["input_size"], ref["in_channels"], ref["num_classes"])
        train_flops_per_image = 3 * 2 * gmacs * 1e9
        row = dict(precision=precision, arch=arch, batch=ref["batch_size"], gmacs=gmacs,
                   ours=best["ours"], diffusers=best["diffusers"],
                   ratio=best["ours"]["images_per_s"] / best["diffusers"]["images_per_s"],
                   ours_tflops=best["ours"]["images_per_s"] * train_flops_per_image / 1e12)
        if peak and precision == "bf16":
            row["mfu"] = {impl: best[impl]["images_per_s"] * train_flops_per_image / peak for impl in IMPLEMENTATIONS}
        rows.append(row)
    return rows


def peak_bf16_flops() -> float | None:
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():  # insertion order puts "H100 PCIe" before "H100"
        if key in name:
            return flops
    return None


def machine_description(device: str, load_start: float, load_end: float) -> list[str]:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers
    import timm

    lines = [
        f"- CPU: {cpu_model}, {len(os.sched_getaffinity(0))} usable cores, torch threads {torch.get_num_threads()}",
        f"- 1-min load average (other processes may share the cores): {load_start:.2f} at start, "
        f"{load_end:.2f} at end",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}",
    ]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    return lines


def render_markdown(rows: list[dict], results: list[dict], args: argparse.Namespace, device: str, command: str,
                    load_start: float) -> str:
    first = rows[0]["ours"]
    memory_note = ("peak `torch.cuda.max_memory_allocated`" if device == "cuda" else
                   "peak RSS of the benchmark process (`getrusage` maxrss), and in brackets its growth over the "
                   "process RSS just before the model was built (weights + AdamW state + activations)")
    lines = [
        f"# Training-step throughput: kindbench DiT vs diffusers DiTTransformer2DModel ({device})",
        "",
        f"Command: `{command}`",
        "",
        *machine_description(device, load_start, os.getloadavg()[0]),
        "",
        f"Setup: {first['input_size']}x{first['input_size']}x{first['in_channels']} latents, "
        f"{first['num_classes']} classes, learned sigma, AdamW (lr 1e-4), MSE loss, engine `{args.engine}`; "
        f"{args.warmup} warm-up + {args.steps} timed steps per run, each run in a fresh process, best of "
        f"{args.repeats} run(s) per implementation (implementations alternated). Memory: {memory_note}.",
        "Model TFLOP/s = images/s x 3 x 2 x forward GMACs (`bench.models.accounting`, DiT convention).",
        "",
    ]
    mfu = any("mfu" in row for row in rows)
    header = ["precision", "model", "batch", "fwd GMACs/img", "ours img/s", "diffusers img/s", "ours/diffusers",
              "ours TFLOP/s", "ours peak mem MiB", "diffusers peak mem MiB"]
    if mfu:
        header += ["ours MFU", "diffusers MFU"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["precision"], row["arch"], str(row["batch"]), f"{row['gmacs']:.2f}",
                 f"{row['ours']['images_per_s']:.2f}", f"{row['diffusers']['images_per_s']:.2f}",
                 f"{row['ratio']:.3f}x", f"{row['ours_tflops']:.4g}", _memory(row["ours"]),
                 _memory(row["diffusers"])]
        if mfu:
            cells += [f"{row['mfu'][impl]:.1%}" if "mfu" in row else "-" for impl in IMPLEMENTATIONS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "All runs (img/s, in execution order): " + "; ".join(
        f"{r['precision']} {r['arch']} {r['impl']} {r['images_per_s']:.3f}" for r in results)]
    return "\n".join(lines) + "\n"


def _memory(result: dict) -> str:
    if "peak_mem_delta_mib" in result:
        return f"{result['peak_mem_mib']:.0f} (+{result['peak_mem_delta_mib']:.0f})"
    return f"{result['peak_mem_mib']:.0f}"


def print_table(markdown: str) -> None:
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        # Outside a terminal rich would wrap at 80 columns and squash the table.
        Console(width=None if sys.stdout.isatty() else 200).print(Markdown(markdown))
    except ImportError:
        print(markdown)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", choices=list(DIT_FLAVOURS), default=None,
                        help="flavours (default: DiT-S/2 DiT-B/2 on CPU, DiT-B/2 DiT-L/2 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-step batch (default: 4 on CPU, 32 on CUDA)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px images)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per implementation; the best is reported")
    parser.add_argument("--engine", choices=list(ENGINES), default="plain",
                        help="how a step is executed: plain (eager) or deepspeed (ZeRO-2 through bench.run.engine)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file (default: results/benchmarks/train_step_<device>.md)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("warmup", "steps", "repeats", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive; got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    command = "python benchmarks/train_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()[0]
    results = []
    for cfg in plan(args, device):
        result = run_in_subprocess(cfg)
        print(f"  {cfg['precision']} {cfg['arch']} {cfg['impl']:9s} repeat {cfg['repeat']}: "
              f"{result['images_per_s']:.2f} img/s, peak {result['peak_mem_mib']:.0f} MiB", flush=True)
        results.append(result)
    markdown = render_markdown(summarise(results, device), results, args, device, command.strip(), load_start)
    output = args.output or REPO_ROOT / "results" / "benchmarks" / f"train_step_{device}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown)
    print_table(markdown)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
