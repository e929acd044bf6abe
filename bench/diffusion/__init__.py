"""Diffusion process (training loss) and samplers, written by kindbench on top of diffusers schedulers."""

from bench.diffusion.process import BETA_SCHEDULES, GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from bench.diffusion.sampling import SCHEDULERS, build_scheduler, respaced_timesteps, sample

__all__ = [
    "BETA_SCHEDULES",
    "SCHEDULERS",
    "GaussianDiffusion",
    "build_scheduler",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "respaced_timesteps",
    "sample",
]
