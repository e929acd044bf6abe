"""Part (a): training throughput and model FLOPs utilisation of our DiT vs diffusers' ``DiTTransformer2DModel``.

DiT-B/2 and DiT-L/2, bf16, batch 32, DeepSpeed ZeRO-2: every configuration is a child of ``benchmarks/train_step.py``
(``--engine deepspeed``: the trainer's own ``bench.run.engine``), in a fresh process; ours/diffusers as a ratio.
MFU = images/s x 3 x forward FLOPs per image (``bench.models.accounting``, 2 FLOPs per MAC; the same model FLOPs for
both implementations) / the peak dense bf16 FLOP/s measured in this run with a large bf16 matmul (the datasheet peak
is shown too).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from gpu_acceptance_parts.common import PartContext, run_checked, sync


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


def run(ctx: PartContext) -> list[dict[str, Any]]:
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


def render(rows: list[dict], info: dict, plan: dict) -> list[str]:
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
