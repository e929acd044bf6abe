"""What every registered method costs: trainable parameters, stored bytes, training-step time relative to full
fine-tuning, peak memory, and forward GMACs as trained and after merge.

Every method is built exactly as a run builds it (``methods.get_method(name).build`` from an ancestry of its first
accepted ancestry method: a dense DiT for the baselines, a KIND ancestry for the KIND family), with random
ancestry weights (costs do not depend on values). Phases, each child in a fresh process:

1. build: one child per method builds the model, takes ``method.count(model)`` (the ``Accounting`` a run records)
   and saves the built module to a cache directory;
2. time: one child per (method, repetition), repetitions interleaved across methods (every method's repetition 0,
   then every method's repetition 1, ...), odd repetitions in reverse order. The reference (``full``) is timed at
   the start of every repetition, after every ``--reference-every`` methods and at the end, and each method's
   ratio in a repetition is to the mean of the two reference timings around it: machine speed drifts by 20-30%
   over a half-hour repetition on the shared CPU, which a single reference timing per repetition turned into
   method-order bias (dense-descendant methods, the same computation as ``full``, read 1.25x at the end of an
   alphabetical run). A child loads the
   model, builds AdamW (lr 1e-4 x each group's ``lr_scale``, the DiT recipe) over the method's own param groups, and
   times warm-up + timed steps of forward (MSE to a fixed target + ``extra_loss``), backward and optimizer step on
   the same inputs for every method. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the child's
   peak RSS and its growth over the RSS before the model was loaded.

The table reports medians over repetitions and each method's step time relative to ``full`` (the median over
repetitions of the bracketed ratios) (flagged above 1.5x,
with the reason where one is known). Written to ``results/benchmarks/methods_cost_<device>.md`` with the machine and
command.

Usage (repository root):
    python benchmarks/methods_cost.py                          # CPU: DiT-B/2; CUDA: DiT-B/2 and DiT-L/2
    python benchmarks/methods_cost.py --batch-size 2 --repeats 3 --methods full lora svdiff
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # benchmark this checkout's code even when kindbench is not installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from methods import ArchSpec, Task, get_method, list_methods  # noqa: E402

SLOW_FACTOR = 1.5
#: From here up a method is reported as coming close to the limit, with its mechanism.
CLOSE_FACTOR = 1.2
REFERENCE = "full"
#: Known reasons a method's step costs more than full fine-tuning, by mechanism (checked against the measurements
#: in results/benchmarks/methods_cost_*.md; a flagged method without an entry is reported as unexplained).
WHY_SLOWER = {
    "boft": "each adapted Linear rotates its input with m butterfly factors (two gathers and an in x b "
            "block matmul per token per factor) and solves m x in/b Cayley systems of size b per step; with "
            "b = 8, m = 2 that is small next to the layer's in x out matmul.",
    "svdiff": "every forward re-forms each target weight U diag(relu(sigma + delta)) V^T (out x k x in MACs per "
              "layer per step, independent of the batch) and backpropagates through it; at a small batch this "
              "batch-independent cost is comparable to the layer's own matmuls.",
    "dora": "DoRA re-forms W0 + s B A for every adapted layer every step to take its row norms (a dense out x in "
            "product and norm per layer per step, batch-independent), on top of LoRA's adapter matmuls.",
    "pissa": "a LoRA-structured model: the same extra per-token adapter matmuls and activations as LoRA.",
    "loha": "peft's LoHa (a LyCORIS tuner) forms the dense delta W = (B1 A1) * (B2 A2) every forward and applies it "
            "with a second dense F.linear per token, so every adapted Linear runs two dense matmuls forward and two "
            "input-gradient matmuls backward, plus the dense delta-W gradient.",
    "lokr": "peft's LoKr (a LyCORIS tuner) forms the dense Kronecker delta W every forward and applies it with a "
            "second dense F.linear per token, doubling each adapted Linear's per-token matmuls.",
    "vera": "VeRA's adapter path runs two rank-r matmuls per token through the shared projections with r = 256, "
            "about r (in + out) / (in x out) extra per adapted Linear (a third of qkv's cost at width 768), and "
            "keeps their activations for backward.",
    "fine": "FINE's Sigma phase runs each factorised layer in rank space, ((x V) * sigma) U^T, r (in + out) "
            "MACs per token instead of in x out: at full rank r = d that is 1.33x a square layer's matmul forward "
            "and backward, and 0.83x for fc1/fc2 (no dense weight gradient is formed, U and V are frozen).",
    "wave": "every forward re-forms each layer's weight as a sum of num_templates (8) Kronecker products of its "
            "scalers with the shared templates (8 elementwise passes over an out x in matrix, batch-independent), "
            "and backward reduces the dense weight gradient back onto scalers and templates the same way.",
    "kind": "KIND's downstream model runs every decomposed matrix factorised at full rank, r (in + out) MACs per "
            "token: 2x a square layer's matmuls (q, k, v, o) and 1.25x for fc1/fc2, forward and input-gradient "
            "alike (1.47x forward GMACs); the frozen learngenes skip their weight gradients, which pays back part. "
            "Merged for sampling it is a plain DiT.",
    "oft": "OFT solves a Cayley system per block every forward and rotates the input block-wise: an extra "
           "in x b matmul per token per adapted layer.",
}
#: Methods whose descendant is a plain dense DiT trained in full: the same step as full fine-tuning, so a ratio
#: above 1 is machine noise (their differences lie in the initial weights, not in the cost of a step).
_DENSE_DESCENDANT = ("the descendant is a plain dense DiT trained in full, the same computation as full "
                     "fine-tuning; the difference is noise on this shared machine.")
WHY_SLOWER.update({"kind_nogate": WHY_SLOWER["kind"], "kind_fulltransfer": WHY_SLOWER["kind"]})
WHY_SLOWER.update({name: _DENSE_DESCENDANT for name in (
    "scratch", "fine_nofactor", "tleg", "sws", "ligo", "heur_lg", "auto_lg", "weight_selection")})


# ---------------------------------------------------------------------------------------------------------------------
#                                         Children: build, time
# ---------------------------------------------------------------------------------------------------------------------


def _arch(cfg: dict) -> ArchSpec:
    return ArchSpec(name=cfg["arch"], input_size=cfg["input_size"], in_channels=cfg["in_channels"])


def _stage(method) -> str:
    """The downstream stage timed: ``transfer`` (same size, new classes) where the method has it, else ``descend``
    (size-transfer initialisers such as Weight Selection only make a model of another size)."""
    return "transfer" if "transfer" in method.stages else "descend"


def _ancestry_arch(arch: ArchSpec, stage: str) -> ArchSpec:
    """The ancestry's size: the timed model's own, or two blocks deeper for a ``descend`` method, whose model is
    then the benchmarked size (``DiT-B/2`` from ``DiT-B/2-d14``)."""
    if stage != "descend":
        return arch
    from bench.models.dit import parse_flavour

    return dataclasses.replace(arch, name=f"{arch.name}-d{parse_flavour(arch.name).depth + 2}")


def _ancestry(method, arch: ArchSpec, cfg: dict):
    """The cached random ancestry this method builds from (written on first use), or None. Methods whose ancestry
    is distilled from a teacher (TLEG, SWS, WAVE, LiGO) get one built without a teacher: values do not change
    costs."""
    from methods.transfer import load_export, save_export

    if not method.ancestry_methods:
        return None
    source = method.ancestry_methods[0]
    source_arch = _ancestry_arch(arch, _stage(method))
    path = Path(cfg["cache"]) / f"ancestry-{source}-{source_arch.name.replace('/', '-')}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = get_method(source).build_ancestry(source_arch, cfg["num_classes"])
        save_export(path, model.state_dict(), method=source, arch=source_arch, num_classes=cfg["num_classes"])
    return load_export(path)


def child_build(cfg: dict) -> dict:
    """Build one method, count it, save the built module; returns the options used and the Accounting."""
    arch = _arch(cfg)
    options = dict(cfg["options"])
    method = get_method(cfg["method"], options)
    ancestry = _ancestry(method, arch, cfg)
    task = Task("methods-cost", cfg["num_classes"], stage=_stage(method))
    start = time.perf_counter()
    torch.manual_seed(0)
    model = method.build(arch, task, ancestry)
    build_s = time.perf_counter() - start
    accounting = method.count(model).to_dict()
    torch.save(model, cfg["model_path"])
    return {"options": options, "build_s": build_s, "accounting": accounting}


def _current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_time(cfg: dict) -> dict:
    """Load one built model and time its training steps; returns per-step seconds and peak memory."""
    device = torch.device(cfg["device"])
    if device.type == "cpu" and cfg["flush_denormal"]:
        # Small singular components times small gradients give denormal floats, which x86 cores process very slowly
        # (benchmarks/kind_layer.py); flushed for every method alike, as GPUs effectively do.
        torch.set_flush_denormal(True)
    method = get_method(cfg["method"], cfg["options"])
    baseline_rss = _current_rss()
    model = torch.load(cfg["model_path"], weights_only=False, map_location="cpu").to(device).train()
    groups = method.mark_trainable(model)
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": 1e-4 * g["lr_scale"]} for g in groups],
                                  lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    n, c, s = cfg["batch_size"], cfg["in_channels"], cfg["input_size"]
    x = torch.randn(n, c, s, s, generator=generator).to(device)
    t = torch.randint(0, 1000, (n,), generator=generator).to(device)
    y = torch.randint(0, cfg["num_classes"], (n,), generator=generator).to(device)
    target = torch.randn(n, model.out_channels, s, s, generator=generator).to(device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float]:
        synchronize()
        begin, begin_cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16"):
            out = model(x, t, y)
        loss = torch.nn.functional.mse_loss(out.float(), target) + method.extra_loss(model, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss for {cfg['method']}")
        return time.perf_counter() - begin, time.process_time() - begin_cpu

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg["warmup"]):
        step()
    times = [step() for _ in range(cfg["steps"])]
    # On a shared CPU the wall clock mostly measures waiting for a core; the process's CPU time per step does not.
    # On CUDA the (synchronised) wall clock is the cost.
    result = {"step_s": [cpu if device.type == "cpu" else wall for wall, cpu in times],
              "wall_s": [wall for wall, _ in times]}
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        result["peak_mem_mib"] = peak / 2**20
        result["peak_growth_mib"] = (peak - baseline_rss) / 2**20
    return result


CHILDREN = {"build": child_build, "time": child_time}


# ---------------------------------------------------------------------------------------------------------------------
#                                       Parent: plan, run children, report
# ---------------------------------------------------------------------------------------------------------------------


def run_child(kind: str, cfg: dict, threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(cfg)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed for {cfg['method']} ({cfg['arch']}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_arch(arch: str, args: argparse.Namespace, device: str, cache: Path) -> list[dict]:
    """Build every method for ``arch``, then time them in interleaved repetitions; one row per method."""
    base = dict(arch=arch, input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
                device=device, cache=str(cache))
    rows = []
    for name in args.methods:
        cfg = dict(base, method=name, options={}, model_path=str(cache / f"{name}-{arch.replace('/', '-')}.pt"))
        built = run_child("build", cfg, args.build_threads)
        print(f"  built {arch} {name}: {built['accounting']['params_trainable']:,} trainable "
              f"({built['build_s']:.1f} s)", flush=True)
        rows.append(dict(cfg, **built, runs=[]))
    precision = "bf16" if device == "cuda" else "fp32"
    reference = next(row for row in rows if row["method"] == REFERENCE)
    others = [row for row in rows if row is not reference]
    for repeat in range(args.repeats):
        order = others if repeat % 2 == 0 else others[::-1]
        previous_ref = time_one(reference, repeat, args, precision)
        pending: list[tuple[dict, float]] = []  # (row, its median step) waiting for the next reference timing
        for position, row in enumerate(order, start=1):
            pending.append((row, time_one(row, repeat, args, precision)))
            if position % args.reference_every == 0 or position == len(order):
                next_ref = time_one(reference, repeat, args, precision)
                local = (previous_ref + next_ref) / 2
                for waiting, step in pending:
                    waiting.setdefault("bracketed_ratios", []).append(step / local)
                pending, previous_ref = [], next_ref
    for row in rows:
        Path(row["model_path"]).unlink(missing_ok=True)
    return rows


def time_one(row: dict, repeat: int, args: argparse.Namespace, precision: str) -> float:
    """Time ``row``'s method in a fresh child; appends the run to ``row["runs"]`` and returns its median step."""
    cfg = {k: row[k] for k in ("arch", "input_size", "in_channels", "num_classes", "device", "method", "options",
                                "model_path")}
    cfg.update(batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, precision=precision,
               flush_denormal=not args.keep_denormals)
    run = run_child("time", cfg, args.threads)
    row["runs"].append(run)
    median = statistics.median(run["step_s"])
    print(f"  {row['arch']} {row['method']:18s} repeat {repeat}: median step {median:.2f} s, peak "
          f"{run['peak_mem_mib']:.0f} MiB", flush=True)
    return median


def summarise(rows: list[dict]) -> list[dict]:
    """Median step time per method (median over repetitions of each repetition's median step) and ratio to full."""
    for row in rows:
        row["step_median_s"] = statistics.median(statistics.median(r["step_s"]) for r in row["runs"])
        row["peak_mem_median_mib"] = statistics.median(r["peak_mem_mib"] for r in row["runs"])
        growth = [r["peak_growth_mib"] for r in row["runs"] if "peak_growth_mib" in r]
        row["peak_growth_median_mib"] = statistics.median(growth) if growth else None
    for row in rows:
        if row["method"] == REFERENCE:
            row["ratio"] = 1.0
        else:
            ratios = row.get("bracketed_ratios")
            row["ratio"] = statistics.median(ratios) if ratios else None
    return rows


def machine_lines(device: str, load_start: float) -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft

    lines = [f"- CPU: {cpu}, {len(os.sched_getaffinity(0))} usable cores",
             f"- 1-min load average (other processes share the cores): {load_start:.2f} at start, "
             f"{os.getloadavg()[0]:.2f} at end",
             f"- torch {torch.__version__}, peft {peft.__version__}, Python {platform.python_version()}"]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    return lines


def render(rows: list[dict], args: argparse.Namespace, device: str, command: str, load_start: float) -> str:
    memory = ("peak `torch.cuda.max_memory_allocated` (weights, gradients, AdamW state, activations)"
              if device == "cuda" else "peak RSS of the timing process, in brackets its growth over the RSS "
              "before the model was loaded (weights, gradients, AdamW state, activations)")
    clock = ("CPU time of the timing process (`time.process_time`: time spent waiting for a core on the shared "
             "machine is not counted; wall times are listed at the end)" if device == "cpu" else
             "synchronised wall time")
    lines = [f"# Cost of every registered method ({device})", "", f"Command: `{command}`", "",
             *machine_lines(device, load_start), "",
             f"Setup: {args.input_size}x{args.input_size}x{args.in_channels} latents, {args.num_classes} classes, "
             f"batch {args.batch_size}, {'bf16 autocast' if device == 'cuda' else 'fp32'}, AdamW (lr 1e-4 x group "
             f"lr_scale); each method's default options (stage `transfer`, or `descend` from a two-blocks-deeper "
             f"ancestry for descend-only methods) built from a random ancestry; per timing "
             f"process {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repetitions interleaved "
             f"across methods, each in a fresh process ({args.threads or 'default'} torch thread(s)); step time = "
             f"median over repetitions of each repetition's median step, {clock}. x full: in each repetition "
             f"(odd ones in reverse order) full is timed at the start, after every {args.reference_every} methods "
             f"and at the end, each method's time is divided by the mean of the two full timings around it, and "
             f"the column is the median of those ratios over repetitions (machine speed drifts over a repetition). "
             f"Denormal floats: {'kept' if args.keep_denormals else 'flushed to zero on CPU'} for every "
             f"method. Memory: {memory}.",
             "Stored MB: bytes of `state_to_save` (what a run stores on top of its ancestry). GMACs: forward, one "
             "image, DiT convention (`bench.models.accounting`); 'as trained' counts every matmul of the trained "
             "model's forward at batch 1, including batch-independent work such as re-forming a weight.", ""]
    if device == "cpu":
        lines += ["**Noise warning:** this CPU is shared (2 cores, other jobs running, see the load average); "
                  "absolute times are slow and noisy, ratios within a run are the meaningful number, and small "
                  "differences (< ~15%) are not.", ""]
    step_label = "step CPU s" if device == "cpu" else "step s"
    header = ["model", "method", "options", "trainable params", "stored MB", step_label, "x full",
              "peak mem MiB", "GMACs trained", "GMACs sampled", "> 1.5x full"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        acc = row["accounting"]
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "default"
        memory_cell = f"{row['peak_mem_median_mib']:.0f}"
        if row["peak_growth_median_mib"] is not None:
            memory_cell += f" (+{row['peak_growth_median_mib']:.0f})"
        ratio = row["ratio"]
        slow = ratio is not None and ratio > SLOW_FACTOR
        lines.append("| " + " | ".join([
            row["arch"], row["method"], options, f"{acc['params_trainable']:,}", f"{acc['stored_bytes'] / 1e6:.2f}",
            f"{row['step_median_s']:.2f}", f"{ratio:.2f}" if ratio is not None else "-", memory_cell,
            f"{acc['gmacs_fwd_trained']:.2f}", f"{acc['gmacs_fwd_sampled']:.2f}", "**yes**" if slow else ""]) + " |")
    sections = [
        (f"Methods above {SLOW_FACTOR}x full fine-tuning per step", lambda r: r > SLOW_FACTOR, " (unexplained)"),
        (f"Methods close to the limit ({CLOSE_FACTOR}x to {SLOW_FACTOR}x full fine-tuning)",
         lambda r: CLOSE_FACTOR <= r <= SLOW_FACTOR, ""),
    ]
    for title, selected, unknown in sections:
        chosen = [row for row in rows if row["ratio"] is not None and selected(row["ratio"])]
        lines += ["", f"## {title}", ""] + ([] if chosen else ["None."])
        for row in chosen:
            why = WHY_SLOWER.get(row["method"], "no mechanism recorded in benchmarks/methods_cost.py" + unknown)
            lines.append(f"- **{row['method']}** ({row['arch']}, {row['ratio']:.2f}x): {why}")
    lines += ["", "Build time per method (s, includes SVDs where the method takes them): " + "; ".join(
        f"{row['arch']} {row['method']} {row['build_s']:.1f}" for row in rows),
              "", f"All timed steps, {step_label.replace('step ', '')}: " + "; ".join(
        f"{row['arch']} {row['method']} " + "/".join(f"{s:.2f}" for run in row["runs"] for s in run["step_s"])
        for row in rows),
              "", "All timed steps, wall clock (s): " + "; ".join(
        f"{row['arch']} {row['method']} " + "/".join(f"{s:.2f}" for run in row["runs"] for s in run["wall_s"])
        for row in rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=None,
                        help="DiT flavours (default: DiT-B/2 on CPU, DiT-B/2 DiT-L/2 on CUDA)")
    parser.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-step batch (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px images)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=150, help="classes of the downstream task")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per timing process")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per timing process")
    parser.add_argument("--repeats", type=int, default=3, help="timing processes per method, interleaved")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats to zero on CPU (flushed by default, for every method)")
    parser.add_argument("--reference-every", type=int, default=5,
                        help="time the reference (full) again after this many methods (ratios use the two around)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per timing process")
    parser.add_argument("--build-threads", type=int, default=1,
                        help="threads per build process (1: LAPACK SVDs are far faster single-threaded on a loaded "
                             "machine)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where built models go (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file (default: results/benchmarks/methods_cost_<device>.md)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("warmup", "steps", "repeats", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive; got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        kind, payload = args.child
        print(json.dumps(CHILDREN[kind](json.loads(payload))))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    registered = list_methods()
    args.methods = args.methods or [REFERENCE] + [m for m in registered if m != REFERENCE]
    unknown = sorted(set(args.methods) - set(registered))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {', '.join(registered)}")
    if REFERENCE not in args.methods:
        args.methods.insert(0, REFERENCE)  # every ratio is relative to full fine-tuning, measured in the same run
    args.archs = args.archs or (["DiT-B/2", "DiT-L/2"] if device == "cuda" else ["DiT-B/2"])
    args.batch_size = args.batch_size or (32 if device == "cuda" else 2)
    command = "python benchmarks/methods_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()[0]
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="kindbench-methods-cost-"))
    cache.mkdir(parents=True, exist_ok=True)
    try:
        rows = [row for arch in args.archs for row in measure_arch(arch, args, device, cache)]
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
    markdown = render(summarise(rows), args, device, command.strip(), load_start)
    output = args.output or REPO_ROOT / "results" / "benchmarks" / f"methods_cost_{device}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown)
    print(markdown)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
