"""Class-conditional sampling with diffusers schedulers and classifier-free guidance.

Three samplers, each a diffusers scheduler configured from ``GaussianDiffusion.scheduler_config()`` so that it uses
exactly the training noise schedule:

- ``"ddpm"``: ancestral DDPM, DiT's evaluation sampler. ``DDPMScheduler(variance_type="learned_range",
  clip_sample=False)`` consumes the model's 2C-channel output (epsilon + variance interpolation v). Its timesteps are
  set explicitly to IDDPM's evenly respaced grid (``respaced_timesteps``, DiT's ``space_timesteps(T, "N")``), which
  diffusers then treats as a respaced chain (beta_t = 1 - abar_t / abar_prev). Models without learned sigma use
  ``variance_type="fixed_large"`` (DiT's FIXED_LARGE).
- ``"ddim"``: ``DDIMScheduler`` with eta = 0, fed epsilon only.
- ``"dpm++"``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``, fed epsilon only.

Parity with DiT's process (measured in ``tests/test_diffusion.py``):

- Timesteps. IDDPM respacing takes round(k * (T-1)/(N-1)) with a stride accumulated in floating point. For N = 250,
  T = 1000 (DiT's default) diffusers' ``timestep_spacing="linspace"`` gives the same 250 steps; ``"leading"``
  (0, 4, ..., 996) and ``"trailing"`` (3, 7, ..., 999) do not. For 278 other N in 1..1000 (N = 21, 23, 31, ...)
  ``linspace`` differs from IDDPM by rounding at exact halves or accumulated error, so we pass the IDDPM grid as
  custom timesteps, which is exact for every N.
- One DDPM step. diffusers' own float32 ``alphas_cumprod`` makes its step lose precision at small t: the respaced
  beta_t = 1 - abar_t / abar_prev and 1 - abar_t cancel in float32, up to 3.6e-5 absolute per step at unit-scale
  samples. We therefore hand the DDPM/DDIM schedulers our float64 table (same betas); the step then computes its
  coefficients in float64 and applies them in float32, which is DiT's recipe. Measured against a float64 IDDPM
  reference step over all 250 steps (same model output, same noise): <= 5.8e-7 absolute, DiT's own float32
  recipe <= 5.5e-7, diffusers vs DiT-float32 <= 4.8e-7 (a few ulps); whole chains with an exact Gaussian
  denoiser: 4.5e-7 (25 steps), 1.1e-6 (250 steps). The step's posterior log variance at the final step differs
  (diffusers: log(1e-20), IDDPM: clipped to the t=1 value), but no noise is added there, so samples do not
  depend on it.
- ``DPMSolverMultistepScheduler(variance_type="learned_range")`` drops the variance by keeping the first 3 channels
  (an RGB assumption), which would corrupt 4-channel latents; we slice epsilon ourselves and leave its
  ``variance_type`` unset.
- ``DDIMScheduler`` steps from t to t - T // N whatever its timestep list says, so it cannot follow IDDPM's uneven
  grid. We use ``"trailing"`` (999, 995, ..., 3 -> final alpha 1) when N divides T, else ``"leading"``; both give
  a self-consistent chain.

Reproducibility: pass one ``torch.Generator`` per sample. The initial noise and every step's noise for sample i
come from generator i alone (diffusers' ``randn_tensor`` draws per-sample from a list), so sample i does not depend
on batch size, batch composition or world size (up to the model's own batch-size numerics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from bench.diffusion.process import GaussianDiffusion
from bench.diffusion.schedulers import SCHEDULERS

Generators = torch.Generator | Sequence[torch.Generator] | None


def respaced_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """IDDPM/DiT evenly respaced timesteps (``space_timesteps(T, "N")``), descending from T-1 (if N > 1) to 0.

    The stride (T-1)/(N-1) is fractional; it is accumulated in floating point and rounded (half to even) at each
    step, exactly as DiT does, so the set is bit-identical to DiT's for every N.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [1, {num_timesteps}], got {num_steps}")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    position, steps = 0.0, []
    for _ in range(num_steps):
        steps.append(round(position))
        position += stride
    return sorted(set(steps), reverse=True)


def _use_float64_schedule(scheduler, diffusion: GaussianDiffusion) -> None:
    """Give a DDPM/DDIM scheduler our float64 ``alphas_cumprod`` (derived from the very same betas).

    Why: their ``step`` derives the respaced beta_t = 1 - abar_t / abar_prev and 1 - abar_t from this table. In
    float32 those differences cancel at small t (abar ~ 0.999), which costs ~1e-4 relative in the step coefficients
    and ~3e-5 absolute per step (measured), against ~5e-7 for DiT's float64 coefficients. With a float64 table the
    coefficients are 0-dim float64 tensors, and torch's type promotion keeps the sample arithmetic in the sample's
    own dtype, exactly DiT's recipe (coefficients in float64, applied in float32). The parity test pins this.
    """
    scheduler.alphas_cumprod = diffusion.alphas_cumprod.to("cpu", copy=True)  # where diffusers keeps it


def build_scheduler(
    name: str, diffusion: GaussianDiffusion, num_steps: int, device: torch.device | str | None = None,
    clip_denoised: bool = False,
) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler:
    """A diffusers scheduler for ``name`` on ``diffusion``'s noise schedule, with its timesteps set.

    ``clip_denoised`` clips each step's predicted x_0 to [-1, 1] (pixel-space images); DPM-Solver++ has no plain
    clip, so it gets diffusers' dynamic thresholding capped at 1, which clips the same way."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= diffusion.num_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {diffusion.num_timesteps}], got {num_steps!r}")
    config = diffusion.scheduler_config()
    if name == "ddpm":
        variance_type = "learned_range" if diffusion.learn_sigma else "fixed_large"
        # DiT samples latents with clip_denoised=False (latents are not in [-1, 1]); pixel models clip.
        scheduler = DDPMScheduler(**config, variance_type=variance_type, clip_sample=clip_denoised,
                                  prediction_type="epsilon")
        scheduler.set_timesteps(timesteps=respaced_timesteps(diffusion.num_timesteps, num_steps), device=device)
        _use_float64_schedule(scheduler, diffusion)
    elif name == "ddim":
        spacing = "trailing" if diffusion.num_timesteps % num_steps == 0 else "leading"
        scheduler = DDIMScheduler(
            **config, clip_sample=clip_denoised, set_alpha_to_one=True, prediction_type="epsilon",
            timestep_spacing=spacing)
        scheduler.set_timesteps(num_steps, device=device)
        _use_float64_schedule(scheduler, diffusion)
    else:
        clip = {"thresholding": True, "sample_max_value": 1.0} if clip_denoised else {}
        scheduler = DPMSolverMultistepScheduler(
            **config, algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", **clip)
        scheduler.set_timesteps(num_steps, device=device)
    return scheduler


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for a model with {num_classes} classes, got [{low}, {high}]"
        )
    return labels.long()


def _check_generators(generators: Generators, batch: int) -> Generators:
    if generators is None or isinstance(generators, torch.Generator):
        return generators
    generators = list(generators)
    if len(generators) != batch:
        raise ValueError(f"need one generator per sample: got {len(generators)} generators for {batch} labels")
    return generators


def _model_output(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    cfg_scale: float,
    guide_channels: int | None,
) -> torch.Tensor:
    """Raw model output for the batch; with guidance, the guided output of the conditional half."""
    if cfg_scale == 1.0:
        return model(x, t, labels)
    # DiT convention: [cond; uncond] halves in one forward, the null class id is num_classes.
    null_labels = torch.full_like(labels, model.num_classes)
    x_in, t_in, y_in = torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels])
    output = model.forward_with_cfg(x_in, t_in, y_in, cfg_scale, guide_channels=guide_channels)
    return output[: x.shape[0]]


def _step(scheduler, name: str, output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, generators: Generators):
    channels = x.shape[1]
    if name == "ddpm":  # the learned-range DDPM step consumes the variance channels too
        return scheduler.step(output, t, x, generator=generators).prev_sample
    eps = output[:, :channels]
    if name == "ddim":
        # With x_0 clipped, ADM's ddim_sample re-derives epsilon from the clipped x_0; diffusers keeps the raw
        # epsilon beside it unless told, and under the cosine schedule (abar ~ 2e-9 at t = 999) the first steps clip
        # hard, so the raw epsilon drives x_t away from the clipped x_0: samples got worse with more steps.
        clipped = bool(scheduler.config.clip_sample)
        return scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=clipped, generator=generators).prev_sample
    return scheduler.step(eps, t, x, generator=generators).prev_sample


def sample(
    model: torch.nn.Module,
    labels: torch.Tensor,
    *,
    shape: Sequence[int],
    scheduler: str = "ddpm",
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guide_channels: int | None = None,
    noise: torch.Tensor | None = None,
    generators: Generators = None,
    diffusion: GaussianDiffusion | None = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Draw one sample per label from ``model`` and return the final x_0 batch, shape (N, *shape), float32.

    Args:
        model: ``model(x, t, y)`` returning (N, 2C or C, H, W); attributes ``num_classes``, ``in_channels``,
            ``learn_sigma``; with ``cfg_scale > 1`` also ``forward_with_cfg(x, t, y, cfg_scale, guide_channels=)``.
            It is run under ``torch.no_grad`` in eval mode (DiT drops labels in train mode), then its mode restored.
        labels: (N,) class ids in [0, model.num_classes).
        shape: per-sample shape (C, H, W).
        scheduler: one of ``SCHEDULERS``.
        num_steps: sampling steps (DiT: 250 DDPM steps).
        cfg_scale: classifier-free guidance scale; 1.0 disables guidance (one forward per step, as DiT).
        guide_channels: channels guidance applies to, passed to ``forward_with_cfg`` (DiT's JAX parity uses 3).
        noise: optional initial x_T of shape (N, *shape); otherwise drawn from ``generators``.
        generators: one ``torch.Generator`` per sample (reproducible per sample), a single one, or None (global RNG).
        diffusion: the training process (noise schedule); default ``GaussianDiffusion(learn_sigma=model.learn_sigma)``.
        clip_denoised: clip every step's predicted x_0 to [-1, 1] (images in pixel space; never for latents).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1.0 (1.0 disables guidance), got {cfg_scale}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[0] != model.in_channels:
        raise ValueError(
            f"shape must be per-sample (C, H, W) with C = model.in_channels = {model.in_channels}, got {shape}"
        )
    if diffusion is None:
        diffusion = GaussianDiffusion(learn_sigma=model.learn_sigma)
    elif diffusion.learn_sigma != model.learn_sigma:
        raise ValueError(f"diffusion.learn_sigma={diffusion.learn_sigma} but model.learn_sigma={model.learn_sigma}")

    device = _model_device(model)
    labels = _check_labels(labels, model.num_classes).to(device)
    batch = labels.shape[0]
    generators = _check_generators(generators, batch)
    if noise is None:
        x = randn_tensor((batch, *shape), generator=generators, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != (batch, *shape):
        raise ValueError(f"noise must have shape {(batch, *shape)}, got {tuple(noise.shape)}")
    else:
        x = noise.to(device=device, dtype=torch.float32)

    # Timesteps stay on the CPU (as diffusers' DiTPipeline keeps them): the schedulers index CPU tables with them.
    steps = build_scheduler(scheduler, diffusion, num_steps, clip_denoised=clip_denoised)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for t in steps.timesteps:
                t_batch = torch.full((batch,), int(t), device=device, dtype=torch.long)
                x_in = steps.scale_model_input(x, t)
                output = _model_output(model, x_in, t_batch, labels, cfg_scale, guide_channels).float()
                diffusion.split_model_output(output, shape[0])  # channel-count check with a clear error
                x = _step(steps, scheduler, output, t, x, generators)
    finally:
        model.train(was_training)
    return x
