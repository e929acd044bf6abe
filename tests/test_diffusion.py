"""Diffusion process and samplers: closed forms, stop-gradient, diffusers parity with DiT's IDDPM process.

The DDPM parity tests hold a small float64 reference of IDDPM's respaced learned-range p_sample step, written here
from the math (Ho et al. 2020 eq. 6-7, 11; Nichol & Dhariwal 2021 eq. 15; respaced betas 1 - abar_t / abar_prev),
and compare diffusers' ``DDPMScheduler`` step as configured by ``bench.diffusion.sampling`` against it.
Measured on this machine (float32 samples of unit scale, 250 DiT steps, every step):
  - diffusers step vs float64 reference: <= 5.8e-7 absolute, the same as DiT's own float32 recipe (5.5e-7);
  - without our float64 ``alphas_cumprod`` table, diffusers' float32 table costs up to 3.6e-5 at small t.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DDPMScheduler  # noqa: E402

from bench.diffusion import (  # noqa: E402
    SCHEDULERS,
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from bench.diffusion.sampling import build_scheduler, respaced_timesteps, sample  # noqa: E402

C, H, W = 4, 8, 8
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------------------------
# A tiny stand-in with DiT's interface (model(x, t, y), forward_with_cfg, num_classes/in_channels/learn_sigma)
# ----------------------------------------------------------------------------------------------------------------


class TinyEpsModel(nn.Module):
    """Per-sample conv net conditioned on t and y; records what each forward saw."""

    def __init__(self, learn_sigma: bool = True, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.num_classes, self.learn_sigma = C, NUM_CLASSES, learn_sigma
        self.label_embed = nn.Embedding(NUM_CLASSES + 1, hidden)  # +1: the null class for guidance
        self.time_proj = nn.Linear(1, hidden)
        self.conv_in = nn.Conv2d(C, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, 2 * C if learn_sigma else C, 3, padding=1)
        self.calls: list[dict] = []
        self.cfg_calls: list[tuple] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append({"batch": x.shape[0], "y": y.clone(), "t": t.clone(), "training": self.training})
        cond = self.label_embed(y) + self.time_proj(t.float()[:, None] / 1000.0)
        out = self.conv_out(torch.nn.functional.silu(self.conv_in(x) + cond[:, :, None, None]))
        if not self.learn_sigma:
            return out
        eps, v = out.split(C, dim=1)
        return torch.cat([eps, torch.tanh(v)], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        self.cfg_calls.append((cfg_scale, guide_channels))
        guide = C if guide_channels is None else guide_channels
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :guide], out[:, guide:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class GaussianDataModel(nn.Module):
    """The exact noise predictor for data x_0 ~ N(mu_y, std^2) per pixel, with class means mu_y in [-1, 1].

    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu_y) / (abar std^2 + 1 - abar). The variance output is the
    constant ``v`` (v = -1: the posterior variance). Samplers driven by it must reproduce N(mu_y, std^2).
    """

    def __init__(self, std: float = 0.5, v: float = -1.0) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.learn_sigma, self.std, self.v = C, NUM_CLASSES, True, std, v
        self.register_buffer("class_means", torch.linspace(-1, 1, NUM_CLASSES + 1, dtype=torch.float64))
        self.register_buffer("abar", dit_alphas_cumprod())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].view(-1, 1, 1, 1)
        mu = self.class_means[y].view(-1, 1, 1, 1)
        eps = ((1 - abar).sqrt() * (x.double() - abar.sqrt() * mu) / (abar * self.std**2 + 1 - abar)).float()
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(num_timesteps=1000, beta_schedule="linear", learn_sigma=True)


def dit_alphas_cumprod(num_timesteps: int = 1000) -> torch.Tensor:
    """DiT/IDDPM's own float64 linear schedule (betas scaled by 1000/T)."""
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_timesteps,schedule", [(1000, "linear"), (500, "linear"), (1000, "squaredcos_cap_v2")])
def test_schedule_equals_diffusers(num_timesteps, schedule):
    process = GaussianDiffusion(num_timesteps=num_timesteps, beta_schedule=schedule)
    reference = DDPMScheduler(**process.scheduler_config())
    assert process.betas.dtype == torch.float64
    assert torch.equal(process.betas.float(), reference.betas)
    torch.testing.assert_close(process.alphas_cumprod.float(), reference.alphas_cumprod, rtol=1e-6, atol=0)
    for name in SCHEDULERS:  # every sampler runs on this very schedule
        scheduler = build_scheduler(name, process, 10)
        torch.testing.assert_close(scheduler.alphas_cumprod.double(), process.alphas_cumprod, rtol=1e-6, atol=0)


def test_linear_schedule_matches_dit_float64_schedule():
    process = GaussianDiffusion(num_timesteps=500)
    assert process.scheduler_config()["beta_start"] == pytest.approx(2e-4)  # IDDPM's 1000/T scaling
    relative = ((process.alphas_cumprod - dit_alphas_cumprod(500)).abs() / dit_alphas_cumprod(500)).max().item()
    assert relative < 5e-7  # measured 2.3e-7 at T=1000: diffusers' betas are float32


def test_bad_process_arguments():
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'.*linear, squaredcos_cap_v2"):
        GaussianDiffusion(beta_schedule="cosine")
    with pytest.raises(ValueError, match="num_timesteps"):
        GaussianDiffusion(num_timesteps=1)


# ----------------------------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------------------------


def test_normal_kl_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    assert normal_kl(m1, lv1, m1, lv1).abs().max().item() < 1e-12
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discretized_likelihood_sums_to_one_over_256_bins(dtype):
    grid = (torch.arange(256, dtype=dtype) / 127.5 - 1.0)[:, None]  # every uint8 level, one column per Gaussian
    means = torch.tensor([[-1.2, -0.3, 0.0, 0.41, 0.97, 2.0]], dtype=dtype)
    log_scales = torch.log(torch.tensor([[0.5, 0.01, 0.3, 0.002, 0.05, 1.0]], dtype=dtype))
    log_probs = discretized_gaussian_log_likelihood(grid, means, log_scales)
    total = torch.logsumexp(log_probs.double(), dim=0).exp()
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=tolerance)


def test_discretized_likelihood_interior_bin_is_accurate_in_the_tails():
    """A bin far right of the mean has a tiny mass; float32 must not lose it to cancellation of CDFs near 1."""
    x, mean, scale = torch.tensor([0.5]), torch.tensor([0.0]), 0.1
    got = discretized_gaussian_log_likelihood(x, mean, torch.log(torch.tensor([scale])))
    f64 = torch.float64
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=f64), torch.tensor(scale, dtype=f64))
    edges = torch.tensor([0.5 - 1 / 255, 0.5 + 1 / 255], dtype=torch.float64)
    expected = torch.log(normal.cdf(-edges[0]) - normal.cdf(-edges[1]))  # mirrored: exact in float64
    assert abs(got.item() - expected.item()) < 1e-4


def test_q_sample_moments(diffusion):
    t_value, x0_value = 300, 0.7
    x0 = torch.full((64, C, 32, 32), x0_value, dtype=torch.float64)
    t = torch.full((64,), t_value, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t = diffusion.q_sample(x0, t, noise)
    abar = dit_alphas_cumprod()[t_value].item()
    n = x_t.numel()
    assert abs(x_t.mean().item() - math.sqrt(abar) * x0_value) < 5 * math.sqrt((1 - abar) / n)
    assert abs(x_t.var().item() - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n)


def test_posterior_matches_bayes_rule(diffusion):
    """q(x_{t-1}|x_t,x_0) from Gaussian conditioning, independently of the coefficient formulas."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, C, H, W, generator=g, dtype=torch.float64)
    x_t = torch.randn(5, C, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 500, 999])
    abar, abar_prev = diffusion.alphas_cumprod[t], diffusion.alphas_cumprod[t - 1]
    alpha = abar / abar_prev
    precision = 1.0 / (1.0 - abar_prev) + alpha / (1.0 - alpha)
    variance = (1.0 / precision).view(-1, 1, 1, 1)
    from_x0 = (abar_prev.sqrt() / (1.0 - abar_prev)).view(-1, 1, 1, 1) * x0
    from_x_t = (alpha.sqrt() / (1.0 - alpha)).view(-1, 1, 1, 1) * x_t
    expected_mean = variance * (from_x0 + from_x_t)
    mean, log_variance = diffusion.q_posterior(x0, x_t, t)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(log_variance, variance.log().expand_as(x_t), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------------------------------------------


def _oracle_losses(diffusion, t, v_value, dtype=torch.float64):
    """Losses of a 'model' returning the true noise and a constant variance value v."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(t.shape[0], C, H, W, generator=g, dtype=dtype) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=dtype)

    def model_fn(x_t, t, y):
        return torch.cat([noise, torch.full_like(noise, v_value)], dim=1)

    return diffusion.training_losses(model_fn, x0, t, {"y": torch.zeros_like(t)}, noise=noise)


def test_true_noise_and_true_posterior_variance_give_zero_loss_for_t_positive(diffusion):
    t = torch.tensor([1, 5, 250, 999])
    losses = _oracle_losses(diffusion, t, v_value=-1.0)  # v = -1 selects the posterior variance exactly
    assert set(losses) == {"loss", "mse", "vb", "x_t", "model_output"}
    assert all(losses[k].shape == (4,) for k in ("loss", "mse", "vb"))
    assert losses["x_t"].shape == (4, C, H, W) and losses["model_output"].shape == (4, 2 * C, H, W)
    assert losses["mse"].abs().max().item() == 0.0
    assert losses["vb"].abs().max().item() < 1e-9
    wrong_variance = _oracle_losses(diffusion, t, v_value=1.0)["vb"]  # beta_t instead of the posterior variance
    assert (wrong_variance[:3] > 1e-6).all()  # at t=999 the two bounds nearly coincide (2e-13 bits)
    # closed form for a pure variance mismatch, in bits: 0.5 (r - 1 - log r), r = posterior var / beta
    r = diffusion.posterior_variance[t] / diffusion.betas[t]
    torch.testing.assert_close(wrong_variance, 0.5 * (r - 1 - r.log()) / math.log(2), rtol=1e-6, atol=1e-12)


def test_vb_at_t0_is_the_decoder_nll(diffusion):
    t = torch.zeros(2, dtype=torch.long)
    vb = _oracle_losses(diffusion, t, v_value=-1.0)["vb"]
    # With the true noise the predicted mean is x_0 itself; every interior bin has the same closed-form mass.
    sigma = math.exp(0.5 * diffusion.posterior_log_variance_clipped[0].item())
    interior_bits = -math.log2(math.erf((1 / 255) / (sigma * math.sqrt(2))))
    assert 0.5 < interior_bits < 5.0
    torch.testing.assert_close(vb, torch.full_like(vb, interior_bits), rtol=1e-3, atol=0)  # edge bins are rare


def test_vb_gradient_stops_at_eps_but_reaches_variance(diffusion):
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(6, C, H, W, generator=g) * 2 - 1
    output = torch.randn(6, 2 * C, H, W, generator=g).requires_grad_(True)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    losses = diffusion.training_losses(lambda x_t, t: output, x0, t)
    (grad,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert torch.isfinite(grad).all() and grad[:, :C].abs().max().item() == 0.0
    assert (grad[:, C:].flatten(1).abs().amax(dim=1) > 0).all()
    (grad_mse,) = torch.autograd.grad(losses["loss"].sum(), output)
    assert grad_mse[:, :C].abs().max().item() > 0  # the eps output is trained by the MSE


def test_fixed_variance_loss_is_mse_and_vb_is_detached():
    process = GaussianDiffusion(learn_sigma=False)
    model = TinyEpsModel(learn_sigma=False)
    x0 = torch.rand(3, C, H, W) * 2 - 1
    t = process.sample_timesteps(3, torch.Generator().manual_seed(0))
    losses = process.training_losses(model, x0, t, {"y": torch.tensor([1, 2, 3])})
    assert torch.equal(losses["loss"], losses["mse"])
    assert not losses["vb"].requires_grad and torch.isfinite(losses["vb"]).all()
    losses["loss"].mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_tables_move_to_a_device(diffusion):
    moved = GaussianDiffusion().to("meta")
    assert moved.alphas_cumprod.device.type == "meta" and moved.betas.dtype == torch.float64
    assert diffusion.alphas_cumprod.device.type == "cpu"  # a different instance is untouched


def test_training_losses_with_tiny_model_backpropagates(diffusion):
    model = TinyEpsModel()
    x0 = torch.rand(4, C, H, W) * 2 - 1
    t = diffusion.sample_timesteps(4, torch.Generator().manual_seed(5))
    losses = diffusion.training_losses(model, x0, t, {"y": torch.tensor([0, 1, 2, 3])})
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    losses["loss"].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_training_losses_bad_input(diffusion):
    x0 = torch.zeros(2, C, H, W)
    with pytest.raises(ValueError, match=r"model output has 4 channels, expected 8"):
        diffusion.training_losses(lambda x, t: torch.zeros(2, C, H, W), x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        diffusion.q_sample(x0, torch.tensor([0, 1000]), torch.zeros_like(x0))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        diffusion.q_sample(x0, torch.tensor([1]), torch.zeros_like(x0))


def test_sample_timesteps_uniform_and_seeded(diffusion):
    a = diffusion.sample_timesteps(20000, torch.Generator().manual_seed(7))
    b = diffusion.sample_timesteps(20000, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() <= 999
    counts = torch.bincount(a // 100, minlength=10).double()
    assert (counts - 2000).abs().max() < 5 * math.sqrt(2000)


# ----------------------------------------------------------------------------------------------------------------
# Sampler parity with DiT's process (1000 linear steps, learned sigma, 250 respaced steps)
# ----------------------------------------------------------------------------------------------------------------


def reference_p_sample(abar_table, steps_ascending, k, x, output, noise, learn_sigma=True):
    """IDDPM p_sample on the respaced chain, float64: step k of ``steps_ascending`` (k=0 is the last step)."""
    one = torch.ones((), dtype=torch.float64)

    def respaced(j):  # abar, abar_prev, beta of respaced step j
        abar = abar_table[steps_ascending[j]]
        abar_prev = abar_table[steps_ascending[j - 1]] if j > 0 else one
        return abar, abar_prev, 1 - abar / abar_prev

    abar, abar_prev, beta = respaced(k)
    a1, ap1, b1 = respaced(1)
    log_posterior_clipped = torch.log(beta * (1 - abar_prev) / (1 - abar) if k > 0 else b1 * (1 - ap1) / (1 - a1))
    x, output, noise = x.double(), output.double(), noise.double()
    eps = output[:, :C]
    x0 = (1 / abar).sqrt() * x - (1 / abar - 1).sqrt() * eps
    mean = beta * abar_prev.sqrt() / (1 - abar) * x0 + (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar) * x
    if learn_sigma:
        frac = (output[:, C:] + 1) / 2
        log_variance = frac * torch.log(beta) + (1 - frac) * log_posterior_clipped
    else:  # FIXED_LARGE
        log_variance = torch.log(beta) if k > 0 else log_posterior_clipped
    return mean + (k > 0) * torch.exp(0.5 * log_variance) * noise


def test_timestep_spacing_that_reproduces_dit_respacing():
    dit_250 = respaced_timesteps(1000, 250)
    assert len(dit_250) == 250 and dit_250[0] == 999 and dit_250[-1] == 0 and dit_250[1] == 995
    by_spacing = {}
    for spacing in ("linspace", "leading", "trailing"):
        scheduler = DDPMScheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(250)
        by_spacing[spacing] = scheduler.timesteps.tolist()
    assert by_spacing["linspace"] == dit_250  # the only diffusers spacing that matches DiT at 250 steps
    assert by_spacing["leading"] != dit_250 and by_spacing["leading"][0] == 996
    assert by_spacing["trailing"] != dit_250 and by_spacing["trailing"][-1] == 3
    # ... but not at every N: IDDPM rounds an accumulated fractional stride, so we pass custom timesteps.
    scheduler = DDPMScheduler(timestep_spacing="linspace")
    scheduler.set_timesteps(21)
    assert scheduler.timesteps.tolist() != respaced_timesteps(1000, 21)
    for n in (1, 21, 25, 250, 1000):
        process = GaussianDiffusion()
        assert build_scheduler("ddpm", process, n).timesteps.tolist() == respaced_timesteps(1000, n)


def test_respaced_timesteps_known_values():
    assert respaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert respaced_timesteps(1000, 1) == [0]
    assert respaced_timesteps(10, 4) == [9, 6, 3, 0]
    # 10 * 49.95 accumulates to 499.4999..., so IDDPM takes 499 where linspace's exact 499.5 rounds to 500.
    assert respaced_timesteps(1000, 21)[9:12] == [549, 499, 450]
    with pytest.raises(ValueError, match="num_steps"):
        respaced_timesteps(1000, 1001)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddpm_step_matches_iddpm_reference_at_every_one_of_250_steps(learn_sigma):
    process = GaussianDiffusion(learn_sigma=learn_sigma)
    scheduler = build_scheduler("ddpm", process, 250)
    steps = sorted(respaced_timesteps(1000, 250))
    worst = 0.0
    for i, t in enumerate(scheduler.timesteps):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(2, C, H, W, generator=g)
        output = torch.randn(2, C, H, W, generator=g)
        if learn_sigma:
            output = torch.cat([output, torch.rand(2, C, H, W, generator=g) * 2 - 1], dim=1)
        noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(i))
        got = scheduler.step(output, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        expected = reference_p_sample(dit_alphas_cumprod(), steps, 249 - i, x, output, noise, learn_sigma)
        worst = max(worst, (got.double() - expected).abs().max().item())
    assert worst < 2e-6  # measured 5.8e-7: float32 rounding, as in DiT's own float32 p_sample


def test_ddpm_chain_matches_iddpm_reference_with_a_model():
    """Whole 25-step sampling chain, same per-sample noise: our sampler vs the float64 reference loop."""
    model = GaussianDataModel()
    labels, seeds = torch.tensor([0, 3, 9]), [11, 12, 13]
    got = sample(model, labels, shape=(C, H, W), scheduler="ddpm", num_steps=25, generators=generators(seeds))

    steps = sorted(respaced_timesteps(1000, 25))
    gens = generators(seeds)  # diffusers draws per sample: x_T, then one draw per step with t > 0
    x = torch.cat([torch.randn(1, C, H, W, generator=g) for g in gens]).double()
    for k in range(24, -1, -1):
        t = torch.full((3,), steps[k], dtype=torch.long)
        output = model(x.float(), t, labels)
        noise = torch.cat([torch.randn(1, C, H, W, generator=g) for g in gens]) if k > 0 else torch.zeros_like(x)
        x = reference_p_sample(dit_alphas_cumprod(), steps, k, x, output, noise)
    assert (got.double() - x).abs().max().item() < 5e-6  # measured 4.5e-7 (1.1e-6 over 250 steps)
    assert got.abs().max() > 0.1  # not a degenerate chain


@pytest.mark.parametrize("scheduler,num_steps", [("ddpm", 250), ("ddim", 50), ("dpm++", 20)])
def test_samplers_reproduce_the_data_distribution_with_the_exact_denoiser(scheduler, num_steps):
    """End to end: with the exact eps of Gaussian data, samples have the data's per-class mean and std."""
    model = GaussianDataModel(std=0.5)
    labels = torch.tensor([0] * 16 + [9] * 16)  # class means -1.0 and 0.8
    out = sample(model, labels, shape=(C, 16, 16), scheduler=scheduler, num_steps=num_steps,
                 generators=torch.Generator().manual_seed(0))
    for rows, mean in ((slice(0, 16), -1.0), (slice(16, 32), 0.8)):
        assert abs(out[rows].mean().item() - mean) < 0.03  # measured |error| <= 0.013
        assert abs(out[rows].std().item() - 0.5) < 0.04  # measured 0.47..0.49 (finite-step bias)


# ----------------------------------------------------------------------------------------------------------------
# Sampler behaviour
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler,cfg_scale", [("ddpm", 1.0), ("ddpm", 4.0), ("ddim", 1.0), ("dpm++", 1.5)])
def test_samples_do_not_depend_on_batch_split(scheduler, cfg_scale):
    model = TinyEpsModel()
    labels, seeds = torch.tensor([1, 4, 7, 2]), [100, 101, 102, 103]
    kwargs = dict(shape=(C, H, W), scheduler=scheduler, num_steps=6, cfg_scale=cfg_scale)
    whole = sample(model, labels, generators=generators(seeds), **kwargs)
    first = sample(model, labels[:2], generators=generators(seeds[:2]), **kwargs)
    second = sample(model, labels[2:], generators=generators(seeds[2:]), **kwargs)
    assert torch.isfinite(whole).all() and whole.shape == (4, C, H, W)
    assert (torch.cat([first, second]) - whole).abs().max().item() <= 1e-6
    other_seed = sample(model, labels[:1], generators=generators([999]), **kwargs)
    assert (other_seed - whole[:1]).abs().max() > 1e-3


def test_guidance_uses_null_label_and_eval_mode_and_restores_mode():
    model = TinyEpsModel().train()
    labels = torch.tensor([3, 5])
    guided = sample(model, labels, shape=(C, H, W), num_steps=3, cfg_scale=2.0, generators=generators([1, 2]))
    assert model.training  # restored
    assert model.cfg_calls == [(2.0, None)] * 3
    assert all(not call["training"] for call in model.calls)
    assert all(call["batch"] == 4 and call["y"].tolist() == [3, 5, NUM_CLASSES, NUM_CLASSES] for call in model.calls)
    assert [int(call["t"][0]) for call in model.calls] == respaced_timesteps(1000, 3)
    model.calls.clear()
    plain = sample(model, labels, shape=(C, H, W), num_steps=3, cfg_scale=1.0, generators=generators([1, 2]))
    assert all(call["batch"] == 2 for call in model.calls)
    assert (guided - plain).abs().max() > 1e-4 and not model.cfg_calls[3:]
    three = sample(model, labels, shape=(C, H, W), num_steps=3, cfg_scale=2.0, guide_channels=3,
                   generators=generators([1, 2]))
    assert model.cfg_calls[-1] == (2.0, 3) and (three - guided).abs().max() > 1e-4


def test_ddim_timesteps_form_a_consistent_chain(diffusion):
    for n in (10, 7):
        scheduler = build_scheduler("ddim", diffusion, n)
        stride = 1000 // n
        steps = scheduler.timesteps.tolist()
        assert all(a - b == stride for a, b in zip(steps, steps[1:])) and steps[-1] - stride < 0
    assert build_scheduler("ddim", diffusion, 10).timesteps[0] == 999


def test_ddim_with_clipping_re_derives_epsilon_from_the_clipped_x0_as_adm_does(diffusion):
    """ADM's ddim_sample: x0 = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)), eps' = (x_t - sqrt(abar_t) x0) /
    sqrt(1 - abar_t), x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps'. Keeping the raw eps beside the clipped
    x0 (diffusers' default) made the embedded models' DDIM samples worse with more steps."""
    model = TinyEpsModel(learn_sigma=True, seed=3)
    with torch.no_grad():
        model.conv_out.weight.mul_(40.0)  # predicted x0 far outside [-1, 1]: every step clips
    noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([1, 4])
    got = sample(model, labels, shape=(C, H, W), scheduler="ddim", num_steps=4, noise=noise.float(),
                 diffusion=diffusion, clip_denoised=True)
    abar = diffusion.alphas_cumprod.double()
    steps = build_scheduler("ddim", diffusion, 4).timesteps.tolist()
    x, clipped = noise, 0
    for t, prev in zip(steps, steps[1:] + [-1]):
        with torch.no_grad():
            eps = model(x.float(), torch.full((2,), t), labels)[:, :C].double()
        a_t, a_prev = abar[t], (abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        raw_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x0 = raw_x0.clamp(-1, 1)
        clipped += int((raw_x0 != x0).any())
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert clipped == len(steps)  # the case under test: clipping at every step
    torch.testing.assert_close(got.double(), x, atol=1e-4, rtol=1e-4)


def test_explicit_initial_noise_is_used():
    model = TinyEpsModel()
    noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0))
    a = sample(model, torch.tensor([0, 1]), shape=(C, H, W), scheduler="ddim", num_steps=4, noise=noise)
    b = sample(model, torch.tensor([0, 1]), shape=(C, H, W), scheduler="ddim", num_steps=4, noise=noise.clone())
    assert torch.equal(a, b)  # DDIM with eta=0 is deterministic given x_T


def test_sampler_bad_input():
    model = TinyEpsModel()
    kwargs = dict(shape=(C, H, W), num_steps=2)
    with pytest.raises(ValueError, match=r"unknown scheduler 'euler'; valid: ddpm, ddim, dpm\+\+"):
        sample(model, torch.tensor([0]), scheduler="euler", **kwargs)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*got \[0, 10\]"):
        sample(model, torch.tensor([0, 10]), **kwargs)
    with pytest.raises(ValueError, match="labels must lie"):
        sample(model, torch.tensor([-1]), **kwargs)
    with pytest.raises(ValueError, match="cfg_scale must be >= 1.0"):
        sample(model, torch.tensor([0]), cfg_scale=0.5, **kwargs)
    with pytest.raises(ValueError, match="one generator per sample: got 1 generators for 2 labels"):
        sample(model, torch.tensor([0, 1]), generators=generators([0]), **kwargs)
    with pytest.raises(ValueError, match="shape must be per-sample"):
        sample(model, torch.tensor([0]), shape=(1, C, H, W), num_steps=2)
    with pytest.raises(ValueError, match="num_steps must be an int in"):
        sample(model, torch.tensor([0]), shape=(C, H, W), num_steps=0)
    with pytest.raises(ValueError, match="learn_sigma"):
        sample(model, torch.tensor([0]), diffusion=GaussianDiffusion(learn_sigma=False), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# With the project's DiT
# ----------------------------------------------------------------------------------------------------------------


def _tiny_dit():
    dit = pytest.importorskip("bench.models.dit", reason="bench/models/dit.py is not written yet")
    torch.manual_seed(0)
    model = dit.build_dit("DiT-T/2", input_size=8, in_channels=C, num_classes=NUM_CLASSES)
    with torch.no_grad():  # adaLN-Zero starts as a zero map; give it a non-trivial output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_dit_training_loss_and_guided_sampling():
    model = _tiny_dit()
    process = GaussianDiffusion(learn_sigma=model.learn_sigma)
    x0 = torch.rand(4, C, H, W) * 2 - 1
    t = process.sample_timesteps(4, torch.Generator().manual_seed(0))
    losses = process.training_losses(model, x0, t, {"y": torch.tensor([0, 1, 2, 3])})
    losses["loss"].mean().backward()
    assert torch.isfinite(losses["loss"]).all() and losses["vb"].gt(0).all()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0

    labels, seeds = torch.tensor([1, 8, 3, 5]), [5, 6, 7, 8]
    kwargs = dict(shape=(C, H, W), scheduler="ddpm", num_steps=4, cfg_scale=1.5, diffusion=process)
    whole = sample(model, labels, generators=generators(seeds), **kwargs)
    halves = torch.cat(
        [sample(model, labels[i : i + 2], generators=generators(seeds[i : i + 2]), **kwargs) for i in (0, 2)]
    )
    assert torch.isfinite(whole).all()
    assert (halves - whole).abs().max().item() <= 1e-6
