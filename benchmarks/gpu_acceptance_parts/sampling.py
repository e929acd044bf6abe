"""Part (d): sampling throughput (images/s) at cfg 1.5.

The sampler's own chunk function (``bench.run.sample.draw_chunk``: DDPM, per-sample generators, fp32 as the sampler
runs, SD-VAE decode with random weights in the SD-VAE architecture); two chunk lengths give s/step and the fixed cost,
from which images/s at DiT's 250 steps follows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from gpu_acceptance_parts.common import PartContext, sync

FULL_STEPS = 250  # DiT's DDPM sampling steps

# The SD-VAE architecture (stabilityai/sd-vae-ft-ema's config; random weights here) and a tiny one for the smoke run.
VAE_CONFIGS = {
    "sd": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215),
    "tiny": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=16),
}


def run(ctx: PartContext) -> list[dict[str, Any]]:
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


def render(rows: list[dict], info: dict, plan: dict) -> list[str]:
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
