"""The samplers' names, apart from their code: the config schema validates against them, and importing the samplers
(diffusers' schedulers) there would put the sampling code into every training job's code fingerprint."""

SCHEDULERS = ("ddpm", "ddim", "dpm++")
