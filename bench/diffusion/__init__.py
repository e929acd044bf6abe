"""The diffusion process (training loss), written by kindbench on top of diffusers' noise schedules.

The samplers live in ``bench.diffusion.sampling``; they are not imported here, so that a training job's code
fingerprint (``bench.records.fingerprint``) does not cover sampling code it never runs."""

from bench.diffusion.process import BETA_SCHEDULES, GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from bench.diffusion.schedulers import SCHEDULERS

__all__ = [
    "BETA_SCHEDULES",
    "SCHEDULERS",
    "GaussianDiffusion",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
]
