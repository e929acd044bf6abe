"""KIND's cost: training step of the gated, factorised KIND DiT vs the dense DiT, and sampling step of the merged
KIND DiT vs the dense DiT, with peak memory.

What is compared (one flavour at a time):

* training: a stock DiT vs KIND's ``build_ancestry`` at ``ranks = "full"`` (q, k, v, o, fc1, fc2
  decomposed, q/k/v split, N_G = N_T = d/2, random class gate with K_act = N_T/2, null class = learngenes only),
  once per tailor compute (``--tailor-compute``: ``masked`` evaluates every tailor and masks it, ``grouped``
  evaluates each gate group's active tailors only; both are exact). One KIND model serves every compute: its
  mode is switched between steps (``kind.layers.set_tailor_compute``), so the modes share weights and optimizer.
  One step = forward with labels dropped at p = 0.1 through ``force_drop_ids`` (as the trainer does), MSE to a
  fixed target, backward, AdamW (lr 1e-4, ``foreach=False`` as ``bench.run.engine`` builds it);
* sampling: one classifier-free-guided step (``forward_with_cfg`` on [cond; uncond], cfg 1.5, inference mode) of a
  stock DiT vs the merged KIND DiT (``KindMethod.merge``, loaded into a stock DiT).

The KIND model is built once (its SVD initialisation is slow on a small CPU and irrelevant to step time) by a
"prepare" process that saves it and its merge; the measuring processes build the structure on the meta device and
load those tensors.

Timing is interleaved: one process holds the models of a comparison and rotates their steps (A B C, B C A, ...),
so machine-load drifts hit all alike; each round gives one KIND / dense ratio per KIND variant, and the table
reports the median ratio over all rounds of all repetitions (each repetition is a fresh process). Peak memory is
measured separately, one model per fresh process. On CPU both models run with ``torch.set_flush_denormal(True)``:
tiny singular components times small gradients produce denormal floats that x86 cores process very slowly (a
DiT-B/2 KIND step with small random factors: 72 s -> 35 s in a profile); GPUs do not pay that price.
``--keep-denormals`` turns it off.
Targets (issue 5): training <= 1.3x dense, merged sampling <= 1.02x dense.

Usage (repository root):
    python benchmarks/kind_layer.py                             # CPU: DiT-B/2, batch 4, fp32, masked and grouped
    python benchmarks/kind_layer.py --repeats 5 --steps 4       # more rounds
    python benchmarks/kind_layer.py --tailor-compute grouped    # one tailor compute only
    python benchmarks/kind_layer.py --phases train --no-memory  # training rounds only (no sampling, no memory)
    python benchmarks/kind_layer.py --work-dir WD ...           # keep the prepared KIND weights for the next run
    python benchmarks/kind_layer.py --archs DiT-B/2 DiT-L/2     # on CUDA (bf16 autocast there)
Writes results/benchmarks/kind_layer_<device>.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # benchmark this checkout even when kindbench is not installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

#: phase -> (reference model, KIND model); the training KIND model runs once per tailor compute ("kind-<mode>")
COMPARISONS = {"train": ("dense", "kind"), "sample": ("dense", "kind-merged")}
TARGETS = {"train": 1.3, "sample": 1.02}
LABEL_DROP = 0.1  # DiT's class_dropout_prob: the share of samples the trainer sends through the null gate


# ---------------------------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def arch_spec(cfg: dict):
    from methods import ArchSpec

    return ArchSpec(name=cfg["arch"], input_size=cfg["input_size"], in_channels=cfg["in_channels"])


def build(cfg: dict, model_name: str) -> torch.nn.Module:
    """A model on the CPU; prepared tensors are assigned, not copied, so memory holds one set of weights."""
    from safetensors.torch import load_file

    from bench.models.dit import build_dit
    from methods import get_method

    if model_name == "dense":
        return build_dit(cfg["arch"], input_size=cfg["input_size"], in_channels=cfg["in_channels"],
                         num_classes=cfg["num_classes"])
    with torch.device("meta"):
        if model_name.startswith("kind-") and model_name != "kind-merged":
            method = get_method("kind", {"ranks": "full", "tailor_compute": model_name.removeprefix("kind-")})
            model = method.build_ancestry(arch_spec(cfg), cfg["num_classes"])
            path = cfg["kind_path"]
        elif model_name == "kind-merged":
            model = build_dit(cfg["arch"], input_size=cfg["input_size"], in_channels=cfg["in_channels"],
                              num_classes=cfg["num_classes"])
            path = cfg["merged_path"]
        else:
            raise ValueError(f"unknown model {model_name!r}")
    model.load_state_dict(load_file(path), strict=True, assign=True)
    if model_name != "kind-merged":
        method.mark_trainable(model)  # assign=True brought new Parameters: set trainability on them
    return model


def prepare(cfg: dict) -> dict:
    """Build the KIND ancestry once (SVD init); save it and its merge (every tailor on: the merged architecture is
    the same for any gate)."""
    from safetensors.torch import save_file

    from methods import get_method

    torch.manual_seed(0)
    method = get_method("kind", {"ranks": "full"})
    start = time.perf_counter()
    model = method.build_ancestry(arch_spec(cfg), cfg["num_classes"])
    build_s = time.perf_counter() - start
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cfg["kind_path"])
    merged = method.merge(model, gate="all")
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, cfg["merged_path"])
    return {"build_s": build_s}


def step_function(cfg: dict, phase: str, model: torch.nn.Module, device: torch.device):
    n, c, s = cfg["batch_size"], cfg["in_channels"], cfg["input_size"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, s, s, generator=generator).to(device)
    t = torch.randint(0, 1000, (n,), generator=generator).to(device)
    y = torch.randint(0, cfg["num_classes"], (n,), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    if phase == "train":
        drop = (torch.rand(n, generator=generator) < LABEL_DROP).long().to(device)
        target = torch.randn(n, model.out_channels, s, s, generator=generator).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0,
                                      foreach=False)
        model.train()

        def train_step():
            with autocast:
                out = model(x, t, y, force_drop_ids=drop)
            loss = torch.nn.functional.mse_loss(out.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return train_step
    model.eval()
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, cfg["num_classes"])])  # second half: the null class

    def sample_step():
        with torch.inference_mode(), autocast:
            return model.forward_with_cfg(x2, t2, y2, cfg_scale=1.5).float().square().mean()

    return sample_step


def timed(step, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step. On a shared CPU the process CPU time is the robust
    measure: it does not count the time other processes hold the cores."""
    start, start_cpu = time.perf_counter(), time.process_time()
    value = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if not torch.isfinite(value):
        raise RuntimeError("non-finite loss/output in a benchmark step")
    return time.perf_counter() - start, time.process_time() - start_cpu


def with_tailor_compute(model: torch.nn.Module, mode: str, step):
    """``step`` of the shared KIND model, run under tailor compute ``mode``."""
    from kind.layers import set_tailor_compute

    def step_in_mode():
        set_tailor_compute(model, mode)
        return step()

    return step_in_mode


def run_pair(cfg: dict, device: torch.device) -> dict:
    """The models of one comparison in this process (dense and every KIND variant), steps rotated; per round one
    ratio per KIND variant."""
    ref_name, kind_name = COMPARISONS[cfg["phase"]]
    torch.manual_seed(0)
    steps = {ref_name: step_function(cfg, cfg["phase"], build(cfg, ref_name).to(device), device)}
    if cfg["phase"] == "train":
        torch.manual_seed(0)
        model = build(cfg, f"kind-{cfg['modes'][0]}").to(device)
        kind_step = step_function(cfg, "train", model, device)
        for mode in cfg["modes"]:
            steps[f"kind-{mode}"] = with_tailor_compute(model, mode, kind_step)
    else:
        torch.manual_seed(0)
        steps[kind_name] = step_function(cfg, cfg["phase"], build(cfg, kind_name).to(device), device)
    names = list(steps)
    for _ in range(cfg["warmup"]):
        for name in names:
            timed(steps[name], device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for index in range(cfg["steps"]):
        for offset in range(len(names)):
            name = names[(index + offset) % len(names)]
            times[name].append(timed(steps[name], device))
    ref = times[ref_name]
    variants = {}
    for name in names[1:]:
        kind = times[name]
        variants[name] = {"times_kind": [w for w, _ in kind], "cpu_kind": [c for _, c in kind],
                          "ratios": [k[0] / r[0] for r, k in zip(ref, kind)],
                          "cpu_ratios": [k[1] / r[1] for r, k in zip(ref, kind)]}
    return {**cfg, "times_ref": [w for w, _ in ref], "cpu_ref": [c for _, c in ref], "variants": variants}


def run_memory(cfg: dict, device: torch.device) -> dict:
    """Peak memory of one model in a fresh process: one warm-up step and one measured step."""
    baseline = current_rss_bytes()
    model = build(cfg, cfg["model"]).to(device)
    step = step_function(cfg, cfg["phase"], model, device)
    timed(step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed(step, device)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        return {**cfg, "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20, "params": params}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {**cfg, "peak_mem_mib": (peak - baseline) / 2**20, "params": params}


def run_child(cfg: dict) -> dict:
    if cfg["device"] == "cpu" and cfg["flush_denormal"]:
        torch.set_flush_denormal(True)
    if cfg["kind"] == "prepare":
        return prepare(cfg)
    device = torch.device(cfg["device"])
    return run_pair(cfg, device) if cfg["kind"] == "pair" else run_memory(cfg, device)


# ---------------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------------


def run_in_subprocess(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {cfg}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, device: str,
            workdir: Path) -> tuple[list[dict], list[dict], dict, list[float]]:
    """Timed rounds, peak memory, KIND build time per arch, and the 1-minute load average after each timing
    process (the cores are shared: the load says how contended the wall-clock numbers were)."""
    archs = args.archs or (["DiT-B/2", "DiT-L/2"] if device == "cuda" else ["DiT-B/2"])
    batch = args.batch_size or (32 if device == "cuda" else 4)
    precision = "bf16" if device == "cuda" else "fp32"
    pairs, memory, build_s, loads = [], [], {}, []
    for arch in archs:
        stem = arch.replace("/", "-")
        base = dict(arch=arch, input_size=args.input_size, in_channels=args.in_channels, precision=precision,
                    num_classes=args.num_classes, batch_size=batch, warmup=args.warmup, steps=args.steps,
                    modes=list(args.tailor_compute),
                    device=device, flush_denormal=not args.keep_denormals,
                    kind_path=str(workdir / f"{stem}-kind.safetensors"),
                    merged_path=str(workdir / f"{stem}-merged.safetensors"))
        build_s[arch] = prepared(base)
        print(f"  {arch}: KIND built (SVD init) in {build_s[arch]:.1f} s", flush=True)
        for repeat in range(args.repeats):
            for phase in args.phases:
                result = run_in_subprocess({**base, "kind": "pair", "phase": phase, "repeat": repeat})
                for name, variant in result["variants"].items():
                    print(f"  {arch} {phase:6s} repeat {repeat} {name}: dense "
                          f"{statistics.median(result['times_ref']):.3f} s, KIND "
                          f"{statistics.median(variant['times_kind']):.3f} s; wall ratios "
                          f"{', '.join(f'{r:.2f}' for r in variant['ratios'])}; CPU-time ratios "
                          f"{', '.join(f'{r:.2f}' for r in variant['cpu_ratios'])}", flush=True)
                pairs.append(result)
                loads.append(os.getloadavg()[0])
        for phase in args.phases if args.memory else ():
            for name in memory_models(phase, args.tailor_compute):
                result = run_in_subprocess({**base, "kind": "memory", "phase": phase, "model": name})
                print(f"  {arch} {phase:6s} {name:11s} peak +{result['peak_mem_mib']:.0f} MiB", flush=True)
                memory.append(result)
    return pairs, memory, build_s, loads


def memory_models(phase: str, modes: list[str]) -> list[str]:
    """Models whose peak memory is measured for ``phase``, one fresh process each."""
    ref_name, kind_name = COMPARISONS[phase]
    return [ref_name, *(f"kind-{mode}" for mode in modes)] if phase == "train" else [ref_name, kind_name]


def prepared(base: dict) -> float:
    """Run the prepare process unless its outputs are already in the work directory; returns the build time."""
    record = Path(base["kind_path"]).with_suffix(".json")
    key = {k: base[k] for k in ("arch", "input_size", "in_channels", "num_classes")}
    if record.is_file() and Path(base["merged_path"]).is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == key:
            return saved["build_s"]
    build_s = run_in_subprocess({**base, "kind": "prepare"})["build_s"]
    record.write_text(json.dumps({"key": key, "build_s": build_s}))
    return build_s


def summarise(pairs: list[dict], memory: list[dict]) -> list[dict]:
    rows = []
    for arch in dict.fromkeys(r["arch"] for r in pairs):
        for phase, (ref_name, _) in COMPARISONS.items():
            runs = [r for r in pairs if (r["arch"], r["phase"]) == (arch, phase)]
            if not runs:
                continue
            mem = {r["model"]: r for r in memory if (r["arch"], r["phase"]) == (arch, phase)}
            unmeasured = {"peak_mem_mib": float("nan"), "params": float("nan")}
            for name in runs[0]["variants"]:
                variants = [r["variants"][name] for r in runs]
                ratios = [x for v in variants for x in v["ratios"]]
                cpu_ratios = [x for v in variants for x in v["cpu_ratios"]]
                rows.append(dict(arch=arch, phase=phase, model=name, batch=runs[0]["batch_size"],
                                 precision=runs[0]["precision"],
                                 time_ref=statistics.median(x for r in runs for x in r["times_ref"]),
                                 time_kind=statistics.median(x for v in variants for x in v["times_kind"]),
                                 ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                                 per_repeat=[statistics.median(v["ratios"]) for v in variants], pairs=len(ratios),
                                 cpu_ref=statistics.median(x for r in runs for x in r["cpu_ref"]),
                                 cpu_kind=statistics.median(x for v in variants for x in v["cpu_kind"]),
                                 cpu_ratio=statistics.median(cpu_ratios), cpu_min=min(cpu_ratios),
                                 cpu_max=max(cpu_ratios),
                                 mem_ref=mem.get(ref_name, unmeasured)["peak_mem_mib"],
                                 mem_kind=mem.get(name, unmeasured)["peak_mem_mib"],
                                 params_ref=mem.get(ref_name, unmeasured)["params"],
                                 params_kind=mem.get(name, unmeasured)["params"]))
    return rows


def gmacs(arch_name: str, args: argparse.Namespace) -> dict[str, float]:
    """Forward GMACs per image (meta device, bench.models.accounting): the dense DiT;
    the factorised KIND DiT evaluating
    every tailor (masked); and what grouped evaluation computes for a class sample (N_G + K_act components: an
    ungated KIND DiT with N_T = K_act has exactly that shape) and for a null sample (learngenes only)."""
    from bench.models.accounting import forward_gmacs
    from bench.models.dit import build_dit, parse_flavour
    from methods import ArchSpec, get_method

    arch = ArchSpec(name=arch_name, input_size=args.input_size, in_channels=args.in_channels)
    dense = build_dit(arch_name, input_size=args.input_size, in_channels=args.in_channels,
                      num_classes=args.num_classes, device="meta")
    n_learngenes = parse_flavour(arch_name).hidden_size // 2  # the full-rank preset: N_G = N_T = d/2, K_act = N_T/2
    with torch.device("meta"):
        full = {"ranks": "full"}
        masked = get_method("kind", full).build_ancestry(arch, args.num_classes)
        as_class = get_method("kind", {**full, "gate": "none", "n_tailors": n_learngenes // 2}).build_ancestry(
            arch, args.num_classes)
        # N_T >= 1 is required, so the learngenes-only cost is extrapolated: MACs are linear in N_T.
        one_tailor = get_method("kind", {**full, "gate": "none", "n_tailors": 1}).build_ancestry(
            arch, args.num_classes)
    class_gmacs, one_gmacs = forward_gmacs(as_class), forward_gmacs(one_tailor)
    per_tailor = (class_gmacs - one_gmacs) / (n_learngenes // 2 - 1)
    return {"dense": forward_gmacs(dense), "masked": forward_gmacs(masked), "class": class_gmacs,
            "null": one_gmacs - per_tailor}


def machine_description(device: str) -> list[str]:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    lines = [f"- CPU: {cpu_model}, {cores} usable cores, torch threads {torch.get_num_threads()}",
             f"- load average at start (other processes share the cores): {os.getloadavg()[0]:.2f}",
             f"- torch {torch.__version__}, Python {platform.python_version()}"]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    return lines


def render_markdown(rows: list[dict], args: argparse.Namespace, device: str, command: str, machine: list[str],
                    load_end: float, macs: dict[str, dict[str, float]], build_s: dict[str, float],
                    loads: list[float]) -> str:
    memory = ("peak `torch.cuda.max_memory_allocated` of the measured step" if device == "cuda" else
              "growth of the process's peak RSS (`getrusage` maxrss) over its RSS before the model was built "
              "(weights + optimizer state + gradients + activations), one model per fresh process")
    denormals = ("kept (`--keep-denormals`)" if args.keep_denormals else
                 "flushed to zero (`torch.set_flush_denormal(True)`) in both models")
    lines = [f"# KIND layer cost: gated factorised training and merged sampling vs dense DiT ({device})", "",
             f"Command: `{command}`", "", *machine, f"- load average at the end: {load_end:.2f}", "",
             f"Setup: {args.input_size}x{args.input_size}x{args.in_channels} latents, {args.num_classes} classes, "
             f"learned sigma. KIND at the full-rank preset (q/k/v/o/fc1/fc2 decomposed, q/k/v split, N_G = N_T = d/2, "
             f"random class gate K_act = N_T/2, null label = learngenes only; the default tailor compute `auto` is "
             f"`grouped` on a CPU and `masked` on a GPU). Tailor compute `masked`: every tailor "
             f"evaluated for every sample, then masked; `grouped`: samples grouped by gate row, each group's active "
             f"tailors only (same outputs and gradients). Training step: forward (labels dropped at "
             f"p = {LABEL_DROP}), "
             f"MSE, backward, AdamW (`foreach=False`, as the trainer); the tailor computes share one KIND model "
             f"(mode switched between steps). Sampling step: one `forward_with_cfg` on [cond; uncond] (cfg 1.5). "
             f"Timing: the models of a comparison in one process, steps rotated (A B C / B C A / ...), "
             f"{args.warmup} warm-up step(s) each and {args.steps} timed rounds per process, {args.repeats} fresh "
             f"processes per comparison; ratios are medians over all rounds. The verdict uses process CPU time "
             f"(all threads), which other processes on the shared cores do not inflate; wall time is shown too. "
             f"Denormals: {denormals}. "
             f"Memory: {memory}.", "",
             "| model | precision | phase | batch | dense CPU s/step | KIND CPU s/step | KIND / dense, CPU time "
             "(median, range) | dense wall s/step | KIND wall s/step | KIND / dense, wall (median, range; "
             "per-process medians) | target | dense peak MiB | KIND peak MiB | params dense / KIND |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        target = TARGETS[row["phase"]]
        verdict = "met" if row["cpu_ratio"] <= target else "**not met**"
        label = (f"train: gated factorised, {row['model'].removeprefix('kind-')}" if row["phase"] == "train" else
                 "sample: merged")
        lines.append(f"| {row['arch']} | {row['precision']} | {label} | {row['batch']} | {row['cpu_ref']:.2f} | "
                     f"{row['cpu_kind']:.2f} | **{row['cpu_ratio']:.3f}x** ({row['cpu_min']:.2f}-{row['cpu_max']:.2f},"
                     f" {row['pairs']} pairs) | {row['time_ref']:.2f} | {row['time_kind']:.2f} | {row['ratio']:.3f}x "
                     f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}; "
                     f"{', '.join(f'{r:.2f}' for r in row['per_repeat'])}) | <= {target}x ({verdict}) | "
                     f"{row['mem_ref']:.0f} | {row['mem_kind']:.0f} | "
                     f"{row['params_ref'] / 1e6:.1f}M / {row['params_kind'] / 1e6:.1f}M |")
    lines += ["", f"Load average (1 min) sampled after each measuring process: "
                  f"{', '.join(f'{load:.1f}' for load in loads)}.", "",
              "Forward GMACs per image (DiT convention, `bench.models.accounting`) and KIND build time:", ""]
    for arch, m in macs.items():
        dense = m["dense"]
        mixed = (1 - LABEL_DROP) * m["class"] + LABEL_DROP * m["null"]
        lines.append(f"- {arch}: dense = merged KIND {dense:.2f}; factorised KIND, masked {m['masked']:.2f} "
                     f"({m['masked'] / dense:.3f}x: every tailor computed, then masked); grouped {m['class']:.2f} for "
                     f"a class sample ({m['class'] / dense:.3f}x: N_G + K_act components) and {m['null']:.2f} for a "
                     f"null sample ({m['null'] / dense:.3f}x: learngenes only), {mixed / dense:.3f}x at "
                     f"{LABEL_DROP:.0%} dropped labels. KIND build incl. SVD init of every decomposed matrix "
                     f"(float64, CPU): {build_s[arch]:.0f} s.")
    return "\n".join(lines) + "\n"


def flavour_name(name: str) -> str:
    from bench.models.dit import parse_flavour

    try:
        parse_flavour(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", type=flavour_name, default=None,
                        help="flavours or variants such as DiT-B/2-d6 (default: DiT-B/2 on CPU, DiT-B/2 and DiT-L/2 "
                             "on CUDA)")
    parser.add_argument("--tailor-compute", nargs="+", choices=["masked", "grouped"], default=["masked", "grouped"],
                        help="KIND tailor computes timed in training (default: both, in one process)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 4 CPU, 32 CUDA)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=150, help="KIND pre-trains on 150 classes")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and process")
    parser.add_argument("--steps", type=int, default=3, help="timed pairs per process")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per comparison")
    parser.add_argument("--phases", nargs="+", choices=list(COMPARISONS), default=list(COMPARISONS),
                        help="comparisons to time (default: train and sample)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory processes (the table then shows nan)")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals to zero on CPU")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the prepared KIND weights here and reuse them on the next run (default: temp)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file (default: results/benchmarks/kind_layer_<device>.md)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    command = ("python benchmarks/kind_layer.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    machine = machine_description(device)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        pairs, memory, build_s, loads = measure(args, device, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="kind-bench-") as workdir:
            pairs, memory, build_s, loads = measure(args, device, Path(workdir))
    rows = summarise(pairs, memory)
    macs = {arch: gmacs(arch, args) for arch in dict.fromkeys(r["arch"] for r in rows)}
    markdown = render_markdown(rows, args, device, command, machine, os.getloadavg()[0], macs, build_s, loads)
    output = args.output or REPO_ROOT / "results" / "benchmarks" / f"kind_layer_{device}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown)
    print(markdown)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
