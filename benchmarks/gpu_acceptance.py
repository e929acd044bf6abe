"""GPU acceptance: one command, under 8 minutes on one H100/H200 (no network), five measurements in one run.

    python benchmarks/gpu_acceptance.py                    # every part, full size (needs CUDA)
    python benchmarks/gpu_acceptance.py --parts a,c        # some parts
    python benchmarks/gpu_acceptance.py --smoke            # every part at toy sizes on the CPU (CI)
    python benchmarks/gpu_acceptance.py --smoke --device cuda   # toy sizes on the GPU, a check before the real run
    bash benchmarks/gpu_acceptance.sh ...                  # the same (a wrapper that execs this file)

Parts (each in a fresh process, with its own time budget; a part that overruns is killed and reported, the others
still run):

a. Training throughput and model FLOPs utilisation of our DiT vs diffusers' ``DiTTransformer2DModel``, DiT-B/2 and
   DiT-L/2, bf16, batch 32, DeepSpeed ZeRO-2: every configuration is a child of ``benchmarks/train_step.py``
   (``--engine deepspeed``: the trainer's own ``bench.run.engine``), in a fresh process; ours/diffusers as a ratio.
   MFU = images/s x 3 x forward FLOPs per image (``bench.models.accounting``, 2 FLOPs per MAC; the same model FLOPs
   for both implementations) / the peak dense bf16 FLOP/s measured in this run with a large bf16 matmul (the
   datasheet peak is shown too).
b. KIND's tailor computes ``masked`` vs ``grouped`` vs the dense DiT, training step (bf16 autocast, batch 32, 150
   classes, labels dropped at 10%, AdamW), at the paper rank preset and at full rank, DiT-B/2 and DiT-L/2; the step
   functions of ``benchmarks/kind_layer.py``, steps rotated between models in one process, medians of per-round
   ratios to dense. The KIND models are built by ``get_method("kind", options)`` on the meta device and
   materialised with random values (their SVD initialisation costs minutes on a CPU and does not change step time);
   the gate table comes from the same method's build of a one-block model of the same width.
c. Preemption on the real launcher: ``torchrun --standalone --nproc_per_node 1`` runs the trainer (``bench.run.train``,
   DeepSpeed ZeRO-2 bf16, NCCL) and gets SIGUSR1 after some steps; it must write its checkpoint, leave ``PREEMPTED``
   and exit with ``EXIT_REQUEUE`` (torchrun reports the worker's code in its failure summary and exits 1 itself, which
   is why ``slurm/job.sbatch`` reads the marker); a second start resumes it, and its export, final checkpoint and loss
   curve must equal those of an uninterrupted run (started alongside) bit for bit; on the GPU a second uninterrupted
   run is a control, so a difference is told apart from kernel nondeterminism. The trainer runs with
   ``torch.use_deterministic_algorithms(True, warn_only=True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (this file's
   ``--deterministic-trainer`` mode, which calls ``bench.run.train.main``), so that kernels with a deterministic
   variant use it (ops without one only warn): what is compared is the resume, not the kernels, and the control run
   shows whether the kernels were deterministic enough.
d. Sampling throughput (images/s) at cfg 1.5: the sampler's own chunk function (``bench.run.sample.draw_chunk``: DDPM,
   per-sample generators, fp32 as the sampler runs, SD-VAE decode with random weights in the SD-VAE architecture);
   two chunk lengths give s/step and the fixed cost, from which images/s at DiT's 250 steps follows.
e. The metric pipeline (``bench.metrics.evaluate.evaluate``: Inception features, FID, sFID, IS, P/R, FDD) on 10k
   256-px images on CUDA, random-weight Inception and DINOv2 ViT-L/14 from ``bench.metrics.acceptance.fixtures``
   (never downloaded), time per stage (the pipeline's own functions, timed where ``evaluate`` calls them).

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
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))  # measure this checkout's code even when kindbench is not installed
sys.path.insert(1, str(BENCHMARKS))  # reuse train_step.py and kind_layer.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NO_CUDA_MESSAGE = ("gpu_acceptance: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
                   "machine, or use --smoke for the CPU smoke test")

#: part -> (file slug, title)
PARTS: dict[str, tuple[str, str]] = {
    "a": ("train", "training throughput and MFU: kindbench DiT vs diffusers DiTTransformer2DModel, DeepSpeed ZeRO-2"),
    "b": ("kind", "KIND tailor compute: masked vs grouped vs dense DiT, paper preset and full rank"),
    "c": ("preempt", "torchrun preemption: SIGUSR1, checkpoint, requeue exit code, bit-identical resume"),
    "d": ("sampling", "sampling throughput at cfg 1.5 (DDPM, SD-VAE decode)"),
    "e": ("metrics", "metric pipeline on random-weight networks: time per stage"),
}
TOTAL_BUDGET_S = 480  # the issue's "under 8 minutes on one GPU"
FULL_STEPS = 250  # DiT's DDPM sampling steps
LABEL_DROP = 0.1

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

# The SD-VAE architecture (stabilityai/sd-vae-ft-ema's config; random weights here) and a tiny one for the smoke run.
VAE_CONFIGS = {
    "sd": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215),
    "tiny": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=16),
}


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------


def kind_ranks(preset: str, width: int) -> tuple[int, int]:
    """(N_G, N_T) of KIND's rank preset for a DiT of hidden size ``width``: ``paper`` N_T = round(3d/32),
    N_G = round(23d/64) - N_T (272 + 96 on DiT-L/2, 204 + 72 on DiT-B/2); ``full`` N_G = N_T = d/2.

    ``kind.config``'s own presets when it has them (the option ``ranks``), else the same formulas here: the script
    passes explicit ``n_learngenes``/``n_tailors``, so it measures the same models whichever KIND it runs with."""
    try:
        from kind.config import full_ranks, paper_ranks
    except ImportError:
        paper_ranks = full_ranks = None
    if preset == "paper":
        if paper_ranks is not None:
            return paper_ranks(width)
        n_tailors = max(1, round(3 * width / 32))
        return max(1, round(23 * width / 64) - n_tailors), n_tailors
    if preset == "full":
        return full_ranks(width) if full_ranks is not None else (width // 2, width // 2)
    raise ValueError(f"unknown KIND rank preset {preset!r}; expected 'paper' or 'full'")


def worker_exit_code(torchrun_stderr: str) -> int | None:
    """The first failed worker's exit code from torchrun's failure summary (``exitcode  : 75 (pid: 123)``); torchrun
    itself exits 1 whatever the worker's code was."""
    match = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", torchrun_stderr, flags=re.M)
    return int(match.group(1)) if match else None


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc): torchrun's workers are the children of its agent process."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(set(found))


def flatten_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, tensor) of every tensor inside nested dicts/lists/tuples (checkpoint files), in a stable order."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from flatten_tensors(obj[key], f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from flatten_tensors(item, f"{prefix}[{i}]")


def compare_tensor_files(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names of those that differ) between two .safetensors or torch files."""
    import torch
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, Any]:
        if path.suffix == ".safetensors":
            return dict(flatten_tensors(load_file(str(path))))
        return dict(flatten_tensors(torch.load(path, map_location="cpu", weights_only=False)))

    ta, tb = load(a), load(b)
    differ = sorted(set(ta) ^ set(tb))
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            differ.append(key)
    return len(set(ta) | set(tb)), differ


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_lines(device: str) -> list[str]:
    """Device, versions, commit and date: the header every table carries."""
    import torch

    from bench.records.environment import git_state, package_versions
    from bench.records.fields import utc_now

    versions = package_versions()
    git = git_state()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = (f"- GPU: **{torch.cuda.get_device_name(0)}** ({props.total_memory / 2**30:.0f} GiB, "
               f"{torch.cuda.device_count()} visible), CUDA {torch.version.cuda}, "
               f"cuDNN {torch.backends.cudnn.version()}")
    else:
        gpu = "- GPU: none (CPU run: a smoke test of the code paths, not a measurement)"
    sha = git["git_sha"] or "unknown"
    return [gpu,
            f"- CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores",
            f"- torch {torch.__version__}, deepspeed {versions.get('deepspeed')}, "
            f"diffusers {versions.get('diffusers')}, timm {versions.get('timm')}, Python {platform.python_version()}",
            f"- commit {sha}{' (with uncommitted changes)' if git['git_dirty'] else ''}",
            f"- date {utc_now()}"]


@dataclasses.dataclass
class PartContext:
    """What a part function gets: its sizes, the device, a scratch directory and a deadline."""

    part: str
    plan: dict[str, Any]
    device: str
    smoke: bool
    work_dir: Path
    deadline: float
    """Wall-clock time (``time.time()``) by which the part must be done; loops stop early when it comes close."""
    result_path: Path | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def time_left(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        print(f"  [{self.part}] {text}", flush=True)
        self.notes.append(text)

    def save(self, rows: list[dict[str, Any]] | None = None) -> None:
        """Write what the part has so far: if it is killed at its time limit, the finished rows survive."""
        if rows is not None:
            self.rows = rows
        if self.result_path is not None:
            payload = {"rows": self.rows, "info": self.info, "notes": self.notes}
            tmp = self.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(payload, default=str))
            tmp.replace(self.result_path)


def run_checked(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in its own session; on timeout it is killed with everything it started."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise TimeoutError(f"{shlex.join(cmd[:6])} ... did not finish within {timeout:.0f} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid``, whatever session it runs in (torchrun starts its workers in their own)."""
    found, stack = [], [pid]
    while stack:
        for child in child_pids(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, all its descendants and its process group: nothing of a part outlives its time limit."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, signal.SIGSTOP)  # no new children while the tree is walked
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------------------------------------------------
# (a) training throughput and MFU
# ---------------------------------------------------------------------------------------------------------------------


def measure_peak_bf16(device: str, n: int, iters: int, repeats: int = 3) -> float:
    """Achieved dense bf16 matmul FLOP/s on ``device``: best of ``repeats`` timings of ``iters`` n x n x n products."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n**3 * iters / best


def diffusers_forward_gmacs(plan: dict[str, Any], arch: str) -> float:
    """Forward GMACs per image of diffusers' DiT, counted like ours (``bench.models.accounting.flop_counter``, meta
    device): a cross-check that both implementations compute the same model."""
    import torch
    import train_step

    from bench.models.accounting import flop_counter

    with torch.device("meta"):
        model = train_step.build_model("diffusers", arch, plan["input_size"], plan["in_channels"], plan["num_classes"])
        x = torch.empty(1, plan["in_channels"], plan["input_size"], plan["input_size"])
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long)
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(x, timestep=t, class_labels=y)
    return counter.get_total_flops() / 2 / 1e9


def part_a(ctx: PartContext) -> list[dict[str, Any]]:
    """Ours vs diffusers, DeepSpeed ZeRO-2 bf16, one fresh ``train_step.py`` child per configuration."""
    import train_step

    from bench.models.accounting import forward_gmacs_for_arch

    plan = ctx.plan
    peak = measure_peak_bf16(ctx.device, plan["matmul_n"], plan["matmul_iters"])
    ctx.info["peak_measured_flops"] = peak
    ctx.info["peak_datasheet_flops"] = train_step.peak_bf16_flops() if ctx.device == "cuda" else None
    ctx.note(f"peak dense bf16 matmul ({plan['matmul_n']}^3): {peak / 1e12:.4g} TFLOP/s")
    rows: list[dict[str, Any]] = []
    slowest = 0.0
    for arch in plan["archs"]:
        gmacs = forward_gmacs_for_arch(arch, plan["input_size"], plan["in_channels"], plan["num_classes"])
        row: dict[str, Any] = dict(arch=arch, batch=plan["batch"], precision=plan["precision"], gmacs=gmacs,
                                   gmacs_diffusers=diffusers_forward_gmacs(plan, arch))
        for impl in train_step.IMPLEMENTATIONS:
            if ctx.time_left() < 1.3 * slowest + 5:
                ctx.note(f"{arch} {impl}: skipped, {ctx.time_left():.0f} s of the budget left")
                continue
            cfg = dict(impl=impl, arch=arch, input_size=plan["input_size"], in_channels=plan["in_channels"],
                       num_classes=plan["num_classes"], batch_size=plan["batch"], precision=plan["precision"],
                       warmup=plan["warmup"], steps=plan["steps"], engine="deepspeed", device=ctx.device, repeat=0)
            start = time.perf_counter()
            proc = run_checked([sys.executable, train_step.__file__, "--child", json.dumps(cfg)],
                               timeout=ctx.time_left() - 2, capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
            slowest = max(slowest, time.perf_counter() - start)
            if proc.returncode != 0:
                raise RuntimeError(f"train_step child failed for {arch} {impl}:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            row[impl] = {k: result[k] for k in ("images_per_s", "step_s", "params", "peak_mem_mib")}
            ctx.note(f"{arch} {impl:9s}: {result['images_per_s']:.1f} img/s, peak {result['peak_mem_mib']:.0f} MiB "
                     f"(child {time.perf_counter() - start:.0f} s)")
        flops_per_image = 3 * 2 * gmacs * 1e9  # forward + backward = 3 forwards, 2 FLOPs per MAC
        for impl in train_step.IMPLEMENTATIONS:
            if impl in row:
                achieved = row[impl]["images_per_s"] * flops_per_image
                row[impl].update(tflops=achieved / 1e12, mfu=achieved / peak,
                                 mfu_datasheet=achieved / ctx.info["peak_datasheet_flops"]
                                 if ctx.info["peak_datasheet_flops"] else None)
        if "ours" in row and "diffusers" in row:
            row["ratio"] = row["ours"]["images_per_s"] / row["diffusers"]["images_per_s"]
        rows.append(row)
        ctx.save(rows)
    return rows


def render_a(rows: list[dict], info: dict, plan: dict) -> list[str]:
    peak, sheet = info.get("peak_measured_flops"), info.get("peak_datasheet_flops")
    lines = [f"Setup: {plan['input_size']}x{plan['input_size']}x{plan['in_channels']} latents, {plan['num_classes']} "
             f"classes, learned sigma, batch {plan['batch']}, {plan['precision']}, DeepSpeed ZeRO-2 through "
             "`bench.run.engine` (AdamW lr 1e-4, MSE to a fixed target); each configuration a fresh "
             f"`benchmarks/train_step.py --child` process, {plan['warmup']} warm-up + {plan['steps']} timed steps.",
             "",
             f"Peak dense bf16 FLOP/s measured in this run ({plan['matmul_n']}^3 bf16 matmul, best of 3 x "
             f"{plan['matmul_iters']}): **{(peak or 0) / 1e12:.4g} TFLOP/s**; datasheet: "
             + (f"{sheet / 1e12:.0f} TFLOP/s." if sheet else "unknown for this device."),
             "MFU = images/s x 3 x 2 x forward GMACs/image (ours, `bench.models.accounting`; the same model FLOPs for "
             "both implementations) / peak FLOP/s.", "",
             "| model | batch | precision | fwd GMACs/img ours (diffusers) | ours img/s | diffusers img/s | "
             "**ours / diffusers** | ours TFLOP/s | ours MFU | diffusers MFU | ours MFU vs datasheet | "
             "diffusers MFU vs datasheet | peak MiB ours / diffusers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, d = r.get("ours", {}), r.get("diffusers", {})

        def f(x, spec):
            return "-" if x is None else format(x, spec)

        def pct(x):
            return "-" if x is None else f"{100 * x:.3g}%"

        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['precision']} | {r['gmacs']:.4g} ({r['gmacs_diffusers']:.4g}) | "
            f"{f(o.get('images_per_s'), '.1f')} | {f(d.get('images_per_s'), '.1f')} | "
            f"**{f(r.get('ratio'), '.3f')}x** | {f(o.get('tflops'), '.4g')} | {pct(o.get('mfu'))} | "
            f"{pct(d.get('mfu'))} | {pct(o.get('mfu_datasheet'))} | {pct(d.get('mfu_datasheet'))} | "
            f"{f(o.get('peak_mem_mib'), '.0f')} / {f(d.get('peak_mem_mib'), '.0f')} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# (b) KIND tailor compute
# ---------------------------------------------------------------------------------------------------------------------


def build_kind_for_timing(arch: str, plan: dict[str, Any], options: dict[str, Any], device: str):
    """A KIND ancestry of ``options`` with random values on ``device``, without its SVD initialisation.

    The structure comes from ``get_method("kind", options).build_ancestry`` on the meta device; parameters are
    materialised on the device and filled with N(0, 0.02) (step time does not depend on the values); the only
    buffer, the class gate table, is taken from the same method's build of a one-block model of the same width
    (``<arch>-d1``: a few SVDs), so the gate the grouped compute sees is exactly the method's.
    """
    import torch

    from methods import ArchSpec, get_method

    method = get_method("kind", options)

    def spec(name: str) -> ArchSpec:
        return ArchSpec(name=name, input_size=plan["input_size"], in_channels=plan["in_channels"])

    with torch.device("meta"):
        model = method.build_ancestry(spec(arch), plan["num_classes"])
    model = model.to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    shallow = method.build_ancestry(spec(f"{arch}-d1"), plan["num_classes"])
    buffers, shallow_buffers = dict(model.named_buffers()), dict(shallow.named_buffers())
    if set(buffers) != set(shallow_buffers):
        raise RuntimeError(f"KIND buffers differ between {arch} and its one-block build: "
                           f"{sorted(set(buffers) ^ set(shallow_buffers))}; cannot materialise without the SVD init")
    with torch.no_grad():
        for name, buf in buffers.items():
            buf.copy_(shallow_buffers[name])
    method.mark_trainable(model)
    return model


def part_b(ctx: PartContext) -> list[dict[str, Any]]:
    """Dense, and KIND masked/grouped at the paper and full rank presets: one process, steps rotated per round."""
    import kind_layer
    import torch

    from bench.models.accounting import count_params, forward_gmacs
    from bench.models.dit import build_dit, parse_flavour
    from methods import ArchSpec, get_method

    plan = ctx.plan
    device = torch.device(ctx.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as kind_layer.py on CPU: random tiny factors would time denormal arithmetic
    rows: list[dict[str, Any]] = []
    for arch in plan["archs"]:
        if rows and ctx.time_left() < 0.6 * (ctx.plan["budget_s"] / len(plan["archs"])):
            ctx.note(f"{arch}: skipped, {ctx.time_left():.0f} s of the budget left")
            continue
        width = parse_flavour(arch).hidden_size
        cfg = dict(arch=arch, input_size=plan["input_size"], in_channels=plan["in_channels"],
                   num_classes=plan["num_classes"], batch_size=plan["batch"], precision=plan["precision"])
        torch.manual_seed(0)
        dense = build_dit(arch, input_size=plan["input_size"], in_channels=plan["in_channels"],
                          num_classes=plan["num_classes"], device=device)
        steps = {"dense": kind_layer.step_function(cfg, "train", dense, device)}
        meta = {"dense": dict(preset="-", n_g=None, n_t=None, mode="dense", gmacs=forward_gmacs(dense),
                              params=count_params(dense)["total"])}
        for preset in ("paper", "full"):
            n_g, n_t = kind_ranks(preset, width)
            options = {"n_learngenes": n_g, "n_tailors": n_t, "tailor_compute": "masked"}
            torch.manual_seed(0)
            model = build_kind_for_timing(arch, plan, options, ctx.device)
            step = kind_layer.step_function(cfg, "train", model, device)
            spec = ArchSpec(name=arch, input_size=plan["input_size"], in_channels=plan["in_channels"])
            with torch.device("meta"):  # what grouped computes for a class sample: N_G + K_act components, ungated
                as_class = get_method("kind", {"gate": "none", "n_learngenes": n_g, "n_tailors": max(1, n_t // 2)}
                                      ).build_ancestry(spec, plan["num_classes"])
            gmacs = {"masked": forward_gmacs(model), "grouped": forward_gmacs(as_class)}
            for mode in ("masked", "grouped"):
                name = f"{preset}-{mode}"
                steps[name] = kind_layer.with_tailor_compute(model, mode, step)
                meta[name] = dict(preset=preset, n_g=n_g, n_t=n_t, mode=mode, gmacs=gmacs[mode],
                                  params=count_params(model)["total"])
        names = list(steps)
        start = time.perf_counter()
        for _ in range(plan["warmup"]):
            for name in names:
                kind_layer.timed(steps[name], device)
        warm_s = time.perf_counter() - start
        per_round = warm_s / max(plan["warmup"], 1)
        times: dict[str, list[float]] = {name: [] for name in names}
        for index in range(plan["rounds"]):
            if index >= 2 and ctx.time_left() < 1.5 * per_round + 5:
                ctx.note(f"{arch}: stopped after {index} of {plan['rounds']} rounds (budget)")
                break
            round_start = time.perf_counter()
            for offset in range(len(names)):  # rotate the order so load drifts hit every model alike
                name = names[(index + offset) % len(names)]
                times[name].append(kind_layer.timed(steps[name], device)[0])
            per_round = time.perf_counter() - round_start
        ref = times["dense"]
        for name in names:
            ratios = [t / r for t, r in zip(times[name], ref)]
            median = statistics.median(times[name])
            rows.append(dict(arch=arch, batch=plan["batch"], precision=plan["precision"], **meta[name],
                             s_step=median, images_per_s=plan["batch"] / median, rounds=len(ratios),
                             ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                             dense_gmacs=meta["dense"]["gmacs"]))
        ctx.note(f"{arch}: " + ", ".join(f"{r['mode'] if r['preset'] == '-' else r['preset'] + '/' + r['mode']} "
                                         f"{r['ratio']:.2f}x" for r in rows if r["arch"] == arch))
        del steps, dense, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ctx.save(rows)
    return rows


def render_b(rows: list[dict], info: dict, plan: dict) -> list[str]:
    lines = [f"Setup: training step (forward with labels dropped at p = {LABEL_DROP} through `force_drop_ids`, MSE, "
             "backward, AdamW `foreach=False`: `benchmarks/kind_layer.py`'s step), "
             f"{plan['input_size']}x{plan['input_size']}x{plan['in_channels']} latents, "
             f"{plan['num_classes']} classes, batch {plan['batch']}, {plan['precision']}"
             f"{' autocast' if plan['precision'] == 'bf16' else ''}. KIND: "
             "q/k/v/o/fc1/fc2 decomposed, random class gate with K_act = N_T/2, null class = learngenes only; "
             "`masked` evaluates every tailor and masks it, `grouped` each gate group's active tailors only (same "
             "outputs and gradients; `kind.layers.set_tailor_compute` switches one model between them). Presets: "
             "`paper` N_T = round(3d/32), N_G = round(23d/64) - N_T; `full` N_G = N_T = d/2. KIND weights are random "
             "(structure from `get_method('kind', ...)`, no SVD init). All models in one process, steps rotated "
             f"per round, {plan['warmup']} warm-up round(s); ratio = median over rounds of KIND step / dense step of "
             "the same round. Fwd GMACs: masked = every tailor; grouped = a class sample (N_G + K_act components; a "
             "null sample needs N_G only). Target (KIND issue 5): training <= 1.3x dense.", "",
             "| model | preset | N_G + N_T | tailor compute | fwd GMACs/img | params | s/step (median) | img/s | "
             "**/ dense** (median, range, rounds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = "-" if r["n_g"] is None else f"{r['n_g']} + {r['n_t']}"
        lines.append(f"| {r['arch']} | {r['preset']} | {ranks} | {r['mode']} | {r['gmacs']:.4g} "
                     f"({r['gmacs'] / r['dense_gmacs']:.2f}x) | {r['params'] / 1e6:.1f}M | {r['s_step']:.4f} | "
                     f"{r['images_per_s']:.1f} | **{r['ratio']:.3f}x** ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}, "
                     f"{r['rounds']}) |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# (c) preemption under torchrun: SIGUSR1, requeue code, bit-identical resume
# ---------------------------------------------------------------------------------------------------------------------


def trainer_overrides(plan: dict[str, Any], device: str) -> list[str]:
    return [f"--model.arch={plan['arch']}", "--model.in_channels=3", f"--model.input_size={plan['image_size']}",
            f"--data.image_size={plan['image_size']}", f"--data.per_class={plan['per_class']}",
            f"--schedule.global_batch={plan['global_batch']}", f"--schedule.steps={plan['steps']}",
            f"--schedule.ckpt_every={plan['steps']}", "--schedule.log_every=1", "--schedule.ema_decay=0.99",
            "--method.stage=ancestry", "--engine.backend=deepspeed", "--engine.zero_stage=2",
            f"--engine.precision={plan['precision']}",
            f"--engine.dist_backend={'nccl' if device == 'cuda' else 'gloo'}"]


def torchrun_command(overrides: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            str(Path(__file__).resolve()), "--deterministic-trainer", *overrides, f"--run.out_dir={out}"]


def deterministic_trainer(argv: list[str]) -> int:
    """The trainer's own entry (``bench.run.train.main``) with deterministic kernels (see part (c))."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    from bench.run.train import main as train_main

    return train_main(argv)


def _run_dir(out: Path) -> Path | None:
    runs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
    return runs[0] if len(runs) == 1 else None


def _logged_steps(out: Path) -> int:
    run = _run_dir(out)
    log = run / "train.jsonl" if run else None
    return len(log.read_text().splitlines()) if log and log.is_file() else 0


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train.jsonl").read_text().splitlines()]


def compare_runs(run_a: Path, run_b: Path, steps: int) -> list[tuple[str, str, bool]]:
    """(what, observed, equal) for the export, every tensor file of the final checkpoint and the loss curve of two
    finished runs."""
    out = []
    n, differ = compare_tensor_files(run_a / "export.safetensors", run_b / "export.safetensors")
    out.append(("export.safetensors", f"{n - len(differ)}/{n} tensors equal"
                + (f"; differ: {differ[:4]}" if differ else ""), n > 0 and not differ))
    final = f"checkpoints/{steps:07d}"
    files = sorted(p.relative_to(run_a / final) for p in (run_a / final).rglob("*")
                   if p.suffix in (".pt", ".safetensors"))
    total, bad = 0, []
    for rel in files:
        if not (run_b / final / rel).is_file():
            bad.append(f"{rel} missing")
            continue
        n, differ = compare_tensor_files(run_a / final / rel, run_b / final / rel)
        total += n
        bad += [f"{rel}:{key}" for key in differ]
    out.append((f"final checkpoint ({final}: model, ZeRO-2 optimizer, EMA)",
                f"{total - len(bad)}/{total} tensors equal in {len(files)} files"
                + (f"; differ: {bad[:4]}" if bad else ""), total > 0 and not bad))
    la, lb = _losses(run_a), _losses(run_b)
    out.append(("loss curve", f"{sum(x == y for x, y in zip(la, lb))} of {len(la)} / {len(lb)} equal",
                len(la) == len(lb) == steps and la == lb))
    return out


def part_c(ctx: PartContext) -> list[dict[str, Any]]:
    """Uninterrupted and interrupted torchrun trainings side by side; SIGUSR1 to the latter's worker; resume;
    compare."""
    from bench.run.preemption import EXIT_REQUEUE

    plan = ctx.plan
    root = ctx.work_dir / "preempt"
    root.mkdir(parents=True, exist_ok=True)
    overrides = trainer_overrides(plan, ctx.device)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if ctx.device == "cpu":
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    ctx.info["command"] = shlex.join(["torchrun", "--standalone", "--nproc_per_node", "1",
                                      "benchmarks/gpu_acceptance.py", "--deterministic-trainer", *overrides,
                                      "--run.out_dir=<dir>"])
    rows: list[dict[str, Any]] = []

    def check(name: str, expected: Any, observed: Any, ok: bool) -> None:
        rows.append(dict(check=name, expected=str(expected), observed=str(observed), ok=bool(ok)))
        ctx.note(f"{'PASS' if ok else 'FAIL'} {name}: {observed}")
        ctx.save(rows)

    def launch(out_name: str, log_name: str) -> tuple[subprocess.Popen, Path, Any]:
        log = open(root / f"{log_name}.stderr", "w")  # noqa: SIM115 - closed after the process ends
        proc = subprocess.Popen(torchrun_command(overrides, root / out_name), cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        return proc, root / out_name, log

    def finish(proc: subprocess.Popen, log, timeout: float) -> int:
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise TimeoutError(f"a torchrun did not finish within the part's budget (logs in {root})") from None
        finally:
            log.close()

    start = time.perf_counter()
    straight, straight_out, straight_log = launch("straight", "straight")
    split, split_out, split_log = launch("split", "interrupted")
    # On a GPU a second uninterrupted run tells a resume bug from kernel nondeterminism, should the runs differ.
    control = launch("control", "control") if plan["control_run"] else None
    try:
        while _logged_steps(split_out) < plan["signal_after"]:
            if split.poll() is not None:
                tail = (root / "interrupted.stderr").read_text()[-3000:]
                raise RuntimeError(f"the interrupted run exited ({split.returncode}) before it logged "
                                   f"{plan['signal_after']} steps:\n{tail}")
            if ctx.time_left() < 10:
                raise TimeoutError("the interrupted run did not start training within the budget")
            time.sleep(0.05)
        workers = child_pids(split.pid)
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
        signalled_at = _logged_steps(split_out)
        ctx.note(f"SIGUSR1 to worker(s) {workers} after {signalled_at} logged steps "
                 f"({time.perf_counter() - start:.1f} s after launch)")
        split_rc = finish(split, split_log, ctx.time_left() - 5)
        split_s = time.perf_counter() - start
    except BaseException:
        for proc in (straight, split, *(control[:1] if control else ())):
            kill_tree(proc)
        raise
    stderr = (root / "interrupted.stderr").read_text()
    run = _run_dir(split_out)
    marker = json.loads((run / "PREEMPTED").read_text()) if run and (run / "PREEMPTED").is_file() else None
    stopped = marker["step"] if marker else None
    check("workers signalled", "1 torchrun worker", f"{len(workers)} pid(s) {workers}", len(workers) == 1)
    check("torchrun exit code", "1 (torchrun's code for any failed worker)", split_rc, split_rc == 1)
    code = worker_exit_code(stderr)
    check("worker exit code", f"EXIT_REQUEUE = {EXIT_REQUEUE}", code, code == EXIT_REQUEUE)
    check("PREEMPTED marker", "reason SIGUSR1", marker, bool(marker) and marker.get("reason") == "SIGUSR1")
    done = run / "checkpoints" / f"{stopped:07d}" / "DONE" if run and stopped else None
    check("checkpoint at the stop", "checkpoints/<step>/DONE, 0 < step < steps",
          f"step {stopped}" if done and done.is_file() else "missing",
          bool(done and done.is_file()) and 0 < stopped < plan["steps"])
    if not marker:
        for proc in (straight, *(control[:1] if control else ())):
            kill_tree(proc)
        ctx.info["wall"] = {"interrupted": split_s}
        return rows

    resume_start = time.perf_counter()
    resume, _, resume_log = launch("split", "resumed")
    resume_rc = finish(resume, resume_log, ctx.time_left() - 5)
    resume_s = time.perf_counter() - resume_start
    straight_rc = finish(straight, straight_log, ctx.time_left() - 2)
    ctx.info["wall"] = {"interrupted": split_s, "resumed": resume_s}
    check("resumed run exit code", 0, resume_rc, resume_rc == 0)
    check("uninterrupted run exit code", 0, straight_rc, straight_rc == 0)
    if resume_rc != 0 or straight_rc != 0:
        if control is not None:
            kill_tree(control[0])
        ctx.note("stderr tails:\n" + (root / "resumed.stderr").read_text()[-2000:]
                 + (root / "straight.stderr").read_text()[-2000:])
        return rows
    run_a, run_b = _run_dir(straight_out), _run_dir(split_out)
    summary = json.loads((run_b / "summary.json").read_text())
    check("resumed from the checkpoint", f"resumed_from_step = {stopped}, no PREEMPTED left",
          f"resumed_from_step = {summary['resumed_from_step']}, PREEMPTED "
          f"{'present' if (run_b / 'PREEMPTED').exists() else 'removed'}",
          summary["resumed_from_step"] == stopped and not (run_b / "PREEMPTED").exists())
    deterministic = None
    if control is not None:
        control_rc = finish(control[0], control[2], ctx.time_left() - 2)
        same = compare_runs(run_a, _run_dir(control[1]), plan["steps"]) if control_rc == 0 else []
        deterministic = bool(same) and all(ok for _, _, ok in same)
        check("control: two uninterrupted runs bit-identical (kernel determinism)", "export, checkpoint, losses",
              f"exit {control_rc}; " + "; ".join(f"{what}: {observed}" for what, observed, _ in same),
              deterministic)
    for what, observed, ok in compare_runs(run_a, run_b, plan["steps"]):
        if not ok and deterministic is False:
            observed += " (inconclusive: two uninterrupted runs differ too, see the control row)"
        check(f"resumed = uninterrupted: {what} bit-identical", "every value equal", observed, ok)
    ctx.info["stopped_step"] = stopped
    return rows


def render_c(rows: list[dict], info: dict, plan: dict) -> list[str]:
    wall = ", ".join(f"{k} {v:.1f} s" for k, v in info.get("wall", {}).items() if v is not None)
    lines = [f"Setup: `torchrun --standalone --nproc_per_node 1` on the trainer (`bench.run.train.main` behind this "
             f"file's `--deterministic-trainer`): {plan['arch']} on {plan['image_size']} px synthetic images, global "
             f"batch {plan['global_batch']}, {plan['steps']} steps, DeepSpeed ZeRO-2 {plan['precision']}, "
             "deterministic kernels (`torch.use_deterministic_algorithms(True, warn_only=True)`, "
             "`CUBLAS_WORKSPACE_CONFIG=:4096:8`). An uninterrupted run and the interrupted one start together"
             + (" (with a second uninterrupted run as a control of kernel determinism)" if plan.get("control_run")
                else "") + "; "
             f"SIGUSR1 goes to the interrupted run's worker once it has logged {plan['signal_after']} steps (the "
             "torchrun agent is not signalled: as under `slurm/job.sbatch`, the signal reaches the training "
             "process); the same command then resumes it. Wall: " + (wall or "-") + ".",
             "", f"Trainer command: `{info.get('command', '-')}`", "",
             "| check | expected | observed | result |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['expected']} | {r['observed']} | {'PASS' if r['ok'] else '**FAIL**'} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# (d) sampling throughput
# ---------------------------------------------------------------------------------------------------------------------


def part_d(ctx: PartContext) -> list[dict[str, Any]]:
    """Images/s of the sampler's chunk function at cfg 1.5, DDPM, with the VAE decode."""
    import torch
    from diffusers import AutoencoderKL

    from bench.config.schema import SampleConfig, from_dict
    from bench.models.dit import build_dit
    from bench.models.vae import decode, load_vae
    from bench.run.sample import draw_chunk

    plan = ctx.plan
    device = torch.device(ctx.device)
    vae_dir = ctx.work_dir / f"vae-{plan['vae']}"
    torch.manual_seed(0)
    AutoencoderKL(**VAE_CONFIGS[plan["vae"]]).save_pretrained(vae_dir)
    vae = load_vae(vae_dir, device=device)

    def decoder(x):
        return decode(vae, x)

    ctx.info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    rows: list[dict[str, Any]] = []
    for arch in plan["archs"]:
        if rows and ctx.time_left() < 0.4 * plan["budget_s"]:
            ctx.note(f"{arch}: skipped, {ctx.time_left():.0f} s of the budget left")
            continue
        cfg = from_dict({"model": {"arch": arch, "in_channels": 4, "input_size": plan["input_size"]}})
        torch.manual_seed(0)
        model = build_dit(arch, input_size=plan["input_size"], in_channels=4, num_classes=plan["num_classes"],
                          device=device).eval()
        batch = plan["batch"]

        def chunk(num_steps: int, model=model, cfg=cfg, batch=batch) -> float:
            s = dataclasses.replace(SampleConfig(), num_steps=num_steps, cfg_scale=plan["cfg_scale"],
                                    per_proc_batch=batch, scheduler="ddpm")
            sync(device)
            start = time.perf_counter()
            images, _ = draw_chunk(model, cfg, s, range(batch), device, decoder)
            sync(device)
            if images.shape[0] != batch or images.dtype.name != "uint8":
                raise RuntimeError(f"draw_chunk returned {images.shape} {images.dtype}")
            return time.perf_counter() - start

        chunk(2)  # warm-up: kernels, cuDNN autotuning of the VAE
        t_short = min(chunk(plan["short_steps"]) for _ in range(plan["repeats"]))
        t_long = min(chunk(plan["long_steps"]) for _ in range(plan["repeats"]))
        del chunk
        per_step = (t_long - t_short) / (plan["long_steps"] - plan["short_steps"])
        resolved = per_step > 0 and t_short - plan["short_steps"] * per_step >= 0
        if not resolved:  # timing noise larger than the extra steps: charge everything to the steps (a bound)
            ctx.note(f"{arch}: s/step not resolved from {t_short:.3f} s / {t_long:.3f} s; using total / steps")
            per_step = t_long / plan["long_steps"]
        fixed = t_long - plan["long_steps"] * per_step
        rows.append(dict(arch=arch, batch=batch, cfg_scale=plan["cfg_scale"], s_step=per_step, fixed_s=fixed,
                         measured_steps=plan["long_steps"], images_per_s_measured=batch / t_long, resolved=resolved,
                         images_per_s_250=batch / (fixed + FULL_STEPS * per_step)))
        ctx.note(f"{arch}: {per_step * 1e3:.1f} ms/step at batch {batch} (x2 with cfg), fixed {fixed:.2f} s, "
                 f"{rows[-1]['images_per_s_250']:.3f} img/s at {FULL_STEPS} steps")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ctx.save(rows)
    return rows


def render_d(rows: list[dict], info: dict, plan: dict) -> list[str]:
    lines = [f"Setup: `bench.run.sample.draw_chunk` (the sampler's chunk: labels and per-sample generators, "
             f"`bench.diffusion.sample` with DDPM, cfg {plan['cfg_scale']} on [cond; uncond] = 2 x batch model rows "
             f"per step, VAE decode, uint8), DiT with random weights on {plan['input_size']}x{plan['input_size']}x4 "
             f"latents, {plan['vae']}-VAE architecture with random weights through `bench.models.vae.load_vae`; fp32 "
             f"as the sampler runs (TF32 matmul: {info.get('tf32_matmul')}). Two chunk lengths "
             f"({plan['short_steps']} and {plan['long_steps']} steps, best of {plan['repeats']}) after a warm-up "
             "chunk give s/step and the fixed "
             f"cost (labels, noise, decode); images/s at {FULL_STEPS} steps = batch / (fixed + {FULL_STEPS} x "
             "s/step).",
             "", f"| model | batch | cfg | s/step | fixed s/chunk | img/s at {plan['long_steps']} steps (measured) | "
             f"**img/s at {FULL_STEPS} steps** |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['batch']} | {r['cfg_scale']} | {r['s_step']:.4g} | {r['fixed_s']:.3g} | "
                     f"{r['images_per_s_measured']:.2f} | **{r['images_per_s_250']:.3f}** |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# (e) metric pipeline
# ---------------------------------------------------------------------------------------------------------------------


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


def part_e(ctx: PartContext) -> list[dict[str, Any]]:
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


def render_e(rows: list[dict], info: dict, plan: dict) -> list[str]:
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


PART_FUNCTIONS: dict[str, Callable[[PartContext], list[dict[str, Any]]]] = {
    "a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}
RENDERERS: dict[str, Callable[[list[dict], dict, dict], list[str]]] = {
    "a": render_a, "b": render_b, "c": render_c, "d": render_d, "e": render_e}


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
        rows = PART_FUNCTIONS[ctx.part](ctx)
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
    return dict(part=part, rows=result["rows"], info=result["info"], notes=result["notes"], wall_s=wall,
                budget_s=budget, error=error, failed_checks=checks_failed,
                ok=error is None and not checks_failed and bool(result["rows"]))


def render_part(outcome: dict[str, Any], plan: dict[str, Any], header: list[str], command: str, smoke: bool) -> str:
    part = outcome["part"]
    status = ("**PASS**" if outcome["ok"] else "**FAIL**" + (f": {outcome['error']}" if outcome["error"] else "")
              + (f"; failed checks: {', '.join(outcome['failed_checks'])}" if outcome["failed_checks"] else ""))
    lines = [f"# GPU acceptance ({part}): {PARTS[part][1]}{' — SMOKE RUN (toy sizes)' if smoke else ''}", "",
             f"Command: `{command}`", "", *header,
             f"- part wall time {outcome['wall_s']:.1f} s (budget {outcome['budget_s']} s); status {status}", ""]
    if smoke:
        lines += ["Smoke run: every code path at toy sizes; the numbers are not measurements.", ""]
    if outcome["rows"]:
        lines += RENDERERS[part](outcome["rows"], outcome["info"], plan)
    else:
        lines.append("No rows: the part did not get far enough.")
    if outcome["notes"]:
        lines += ["", "Log:", "", *[f"- {note}" for note in outcome["notes"]]]
    if outcome["info"].get("traceback"):
        lines += ["", "```", outcome["info"]["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def render_summary(outcomes: list[dict], header: list[str], command: str, smoke: bool, total_s: float,
                   files: dict[str, Path]) -> str:
    lines = [f"# GPU acceptance{' — SMOKE RUN' if smoke else ''}: summary", "", f"Command: `{command}`", "", *header,
             f"- total wall time {total_s:.1f} s" + ("" if smoke or total_s <= TOTAL_BUDGET_S else
                                                     f" (**over the {TOTAL_BUDGET_S} s target**)"), "",
             "| part | what | wall s | budget s | result | table |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        result = "PASS" if o["ok"] else "**FAIL**" + (f" ({o['error']})" if o["error"] else "") + (
            f" (failed: {', '.join(o['failed_checks'])})" if o["failed_checks"] else "")
        lines.append(f"| {o['part']} | {PARTS[o['part']][1]} | {o['wall_s']:.1f} | {o['budget_s']} | {result} | "
                     f"{files[o['part']].name} |")
    return "\n".join(lines) + "\n"


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; choose from {','.join(PARTS)}")
    return list(dict.fromkeys(parts))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_acceptance", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Parts: " + "; ".join(f"{k} = {v[1]}" for k, v in PARTS.items()))
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
        return deterministic_trainer(argv[1:])
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
    files = {p: args.out / f"gpu_acceptance_{p}_{PARTS[p][0]}_{suffix}.md" for p in args.parts}
    outcomes = []
    start = time.time()
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            work_dir = args.work_dir.resolve()  # the parts run from the repository root
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-acceptance-")))
        for part in args.parts:
            print(f"\n== part {part}: {PARTS[part][1]} (budget {plan[part]['budget_s']} s)", flush=True)
            outcome = run_part(part, plan[part], device, args.smoke, work_dir)
            outcomes.append(outcome)
            markdown = render_part(outcome, plan[part], header, command, args.smoke)
            files[part].write_text(markdown)
            print(markdown, flush=True)
            print(f"== part {part}: {'PASS' if outcome['ok'] else 'FAIL'} in {outcome['wall_s']:.1f} s "
                  f"(budget {plan[part]['budget_s']} s), written to {files[part]}", flush=True)
    total = time.time() - start
    summary = args.out / f"gpu_acceptance_{suffix}.md"
    summary.write_text(render_summary(outcomes, header, command, args.smoke, total, files))
    for o in outcomes:
        print(f"  part {o['part']}: {'PASS' if o['ok'] else 'FAIL'} {o['wall_s']:6.1f} s  {PARTS[o['part']][1]}")
    print(f"gpu_acceptance: total {total:.1f} s; summary in {summary}", flush=True)
    return 0 if all(o["ok"] for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
