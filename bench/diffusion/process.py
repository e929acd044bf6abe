"""The Gaussian diffusion process used for training: noise schedule, forward noising and the DiT training loss.

Math follows Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021 (Improved DDPM, "IDDPM"), the process that DiT
trains with: 1000 steps, linear betas, epsilon prediction, and optionally a learned variance trained by the
variational bound (the "hybrid" loss, plain MSE + VB, no rescaling).

The betas are taken from a diffusers ``DDPMScheduler`` built with the same settings, so the schedule used here for
training and the schedulers used for sampling (``bench.diffusion.sampling``) cannot disagree. diffusers keeps
float32 betas; we promote them to float64 and derive everything else in float64 (the VLB terms are differences
of nearly equal numbers at small t). Measured: this float64 ``alphas_cumprod`` differs from DiT's own
``np.linspace(..., float64)`` schedule by at most 2.3e-7 relative, diffusers' float32 cumprod by 3.6e-7.

Deviation from IDDPM, on purpose: the decoder NLL at t=0 uses the exact normal CDF (``torch.special``) instead of
IDDPM's tanh approximation, computed on the side of the mean where the difference of CDFs does not cancel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDPMScheduler

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")

# IDDPM's decoder assumes data in [-1, 1] quantised to 256 levels: each value owns a bin of width 2/255.
_HALF_BIN = 1.0 / 255.0
_EDGE = 0.999  # values beyond this are the first/last bin, which extend to -inf/+inf
_MIN_PROB = 1e-12  # floor before log, as IDDPM, so a far-off bin gives a finite (large) NLL


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats; arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of the 256-level bin holding ``x`` under N(means, exp(log_scales)^2).

    ``x`` is data in [-1, 1] on the uint8 grid (k / 127.5 - 1). The edge bins absorb the tails, so the
    probabilities of all 256 bins sum to one.
    """
    inv_std = torch.exp(-log_scales)
    upper = (x - means + _HALF_BIN) * inv_std
    lower = (x - means - _HALF_BIN) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) in log space: float32 ``ndtr`` is quantised near 0 and Phi(upper) - Phi(lower)
    # cancels near 1, so take the tail side (mirror right of the mean) and log_ndtr of both edges.
    right_tail = lower > 0
    log_big = torch.where(right_tail, log_survival_lower, log_cdf_upper)
    log_small = torch.where(right_tail, torch.special.log_ndtr(-upper), torch.special.log_ndtr(lower))
    log_bin_mass = log_big + _log1mexp((log_small - log_big).clamp(max=-1e-30))
    log_bin_mass = log_bin_mass.clamp(min=math.log(_MIN_PROB))
    return torch.where(x < -_EDGE, log_cdf_upper, torch.where(x > _EDGE, log_survival_lower, log_bin_mass))


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012)."""
    near_zero = a > -math.log(2.0)
    # Each branch sees a harmless stand-in where it is not selected, so its gradient there is finite, not NaN.
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, a, -1.0))),
        torch.log1p(-torch.exp(torch.where(near_zero, -1.0, a))),
    )


def mean_over_sample(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: per-sample losses."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """The forward process q(x_t | x_0) and the DiT/IDDPM training loss.

    Args:
        num_timesteps: number of training diffusion steps T (DiT: 1000).
        beta_schedule: ``"linear"`` (DiT; betas from 1e-4 to 0.02, scaled by 1000/T as IDDPM does so that other T
            keep the same overall noise level) or ``"squaredcos_cap_v2"`` (IDDPM's cosine schedule).
        learn_sigma: the model outputs 2C channels, epsilon and a variance interpolation value v in [-1, 1]
            (log var = frac * log(beta_t) + (1 - frac) * log(posterior_var_t), frac = (v + 1) / 2), trained by the
            VB term. If False the model outputs C channels and the reverse variance is fixed to beta_t (DiT's
            FIXED_LARGE).
    """

    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear", learn_sigma: bool = True) -> None:
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.learn_sigma = bool(learn_sigma)

        betas = DDPMScheduler(**self.scheduler_config()).betas.to(torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; IDDPM replaces it by the t=1 value so its log stays finite.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - self.alphas_cumprod)
        )
        # Fixed-large variance (used when the variance is not learned), with the same t=0 fix.
        self.fixed_large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Move the float64 tables to ``device`` (once, instead of a host-to-device copy per loss call)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments that make any diffusers DDPM-family scheduler use exactly this noise schedule."""
        scale = 1000.0 / self.num_timesteps
        return {
            "num_train_timesteps": self.num_timesteps,
            "beta_start": scale * 1e-4,
            "beta_end": scale * 0.02,
            "beta_schedule": self.beta_schedule,
        }

    # ----------------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------------

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t], shaped to broadcast over ``like`` and in its precision (at least float32)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        values = table.to(like.device)[t].to(dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def _check_timesteps(self, t: torch.Tensor, batch: int) -> None:
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"timesteps must have shape ({batch},), got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got [{int(t.min())}, {int(t.max())}]")

    def split_model_output(
        self, model_output: torch.Tensor, channels: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(epsilon, v or None) from a raw model output, after checking its channel count."""
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels, expected {expected} "
                f"({'2 x ' if self.learn_sigma else ''}{channels} input channels, learn_sigma={self.learn_sigma})"
            )
        if not self.learn_sigma:
            return model_output, None
        eps, v = torch.split(model_output, channels, dim=1)
        return eps, v

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Timesteps drawn uniformly from {0, ..., T-1} (DiT's training distribution)."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    # ----------------------------------------------------------------------------------------------------------
    # Forward process and posterior
    # ----------------------------------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, a draw from q(x_t | x_0)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        self._check_timesteps(t, x0.shape[0])
        signal = self._at(self.sqrt_alphas_cumprod, t, x0)
        return signal * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (clipped) log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 implied by x_t and a noise prediction (inverse of ``q_sample``)."""
        scale = self._at(self.sqrt_recip_alphas_cumprod, t, x_t)
        return scale * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def p_mean_log_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of p(x_{t-1} | x_t) from a raw model output (x_0 not clipped, as DiT)."""
        eps, v = self.split_model_output(model_output, x_t.shape[1])
        if v is None:
            log_variance = self._at(self.fixed_large_log_variance, t, x_t).expand_as(x_t)
        else:
            # IDDPM: interpolate in log space between the two natural bounds, beta_t and the posterior variance.
            frac = (v + 1.0) / 2.0
            max_log = self._at(torch.log(self.betas), t, x_t)
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)
        return mean, log_variance

    # ----------------------------------------------------------------------------------------------------------
    # Training loss
    # ----------------------------------------------------------------------------------------------------------

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample VB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t>0, decoder NLL at t=0."""
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        mean, log_variance = self.p_mean_log_variance(model_output, x_t, t)
        kl = mean_over_sample(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -mean_over_sample(
            discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_variance)
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model_fn: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample DiT training losses for a batch.

        Calls ``model_fn(x_t, t, **model_kwargs)``. Returns ``{"loss", "mse", "vb"}``, each of shape (N,):
        ``mse`` is the epsilon MSE averaged over C, H, W; ``vb`` the VB term in bits/dim; also ``x_t`` (the noised
        input) and ``model_output`` (raw, in the loss dtype). With a learned variance
        ``loss = mse + vb`` where the VB term sees the epsilon output through a stop-gradient (IDDPM: the VB only
        trains the variance, the MSE alone trains the mean). With a fixed variance ``loss = mse`` and ``vb`` is the
        bound of the fixed-variance model, detached, for monitoring only.
        The loss math runs in at least float32 whatever the model's output precision.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, t, **(model_kwargs or {}))
        compute_dtype = torch.promote_types(model_output.dtype, torch.float32)
        model_output = model_output.to(compute_dtype)
        eps, v = self.split_model_output(model_output, x0.shape[1])
        x0_c, x_t_c = x0.to(compute_dtype), x_t.to(compute_dtype)

        mse = mean_over_sample((noise.to(compute_dtype) - eps) ** 2)
        # x_t and the raw output ride along for regularisers that need them (distillation from a teacher).
        inputs = {"x_t": x_t, "model_output": model_output}
        if v is None:
            with torch.no_grad():
                vb = self.vb_terms_bpd(model_output, x0_c, x_t_c, t)
            return {"loss": mse, "mse": mse, "vb": vb, **inputs}
        frozen_mean_output = torch.cat([eps.detach(), v], dim=1)
        vb = self.vb_terms_bpd(frozen_mean_output, x0_c, x_t_c, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb, **inputs}
