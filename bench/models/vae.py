"""The SD-VAE (diffusers `AutoencoderKL`), loaded only from a local directory, plus encode/decode helpers.

Latent DiTs train on `scale * (z - shift)` where z is a VAE posterior sample; for the SD-VAE
(`stabilityai/sd-vae-ft-ema` or `-ft-mse`, the DiT paper's choice) scale = 0.18215 and there is no shift. Both come
from the VAE config (`scaling_factor`, `shift_factor`) when present.

Weights are never downloaded at run time. Get them once on a machine with network:

    AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema").save_pretrained("/path/to/sd-vae-ft-ema")

and point `KINDBENCH_VAE_DIR` (or the data config) at that directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers takes seconds to import; only load_vae needs it at run time
    from diffusers import AutoencoderKL

VAE_DIR_ENV = "KINDBENCH_VAE_DIR"
DEFAULT_SCALE_FACTOR = 0.18215
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_HOW_TO_GET = (
    "save an AutoencoderKL there with save_pretrained (e.g. AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema')"
    f".save_pretrained(DIR) on a machine with network) and pass DIR or set {VAE_DIR_ENV}"
)


def resolve_vae_dir(path: str | Path | None = None) -> Path:
    """`path`, or `$KINDBENCH_VAE_DIR` when path is None; checks that config and weights are there."""
    if path is None:
        env = os.environ.get(VAE_DIR_ENV)
        if not env:
            raise FileNotFoundError(f"no VAE directory given and {VAE_DIR_ENV} is not set; {_HOW_TO_GET}")
        path = env
    vae_dir = Path(path).expanduser()
    expected = f"{CONFIG_FILE} and {WEIGHT_FILES[0]}"
    if not vae_dir.is_dir():
        raise FileNotFoundError(f"VAE directory {vae_dir} does not exist (expected {expected} in it); {_HOW_TO_GET}")
    if not (vae_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"VAE directory {vae_dir} has no {CONFIG_FILE}; {_HOW_TO_GET}")
    vae_weights_file(vae_dir)
    return vae_dir


def vae_weights_file(vae_dir: str | Path) -> Path:
    """The weights file of a saved AutoencoderKL (safetensors preferred)."""
    for name in WEIGHT_FILES:
        candidate = Path(vae_dir) / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"VAE directory {vae_dir} has no weights file (expected one of {list(WEIGHT_FILES)}); {_HOW_TO_GET}"
    )


def load_vae(
    path: str | Path | None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load an AutoencoderKL from a local directory only (never the Hub), in eval mode with frozen weights."""
    vae_dir = resolve_vae_dir(path)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, torch_dtype=dtype)
    vae = vae.to(device).eval()
    vae.requires_grad_(False)
    return vae


def vae_scale_factor(vae: AutoencoderKL) -> float:
    """Latent scale (`scaling_factor` from the config; 0.18215, the SD-VAE value, when absent)."""
    value = getattr(vae.config, "scaling_factor", None)
    return float(DEFAULT_SCALE_FACTOR if value is None else value)


def vae_shift_factor(vae: AutoencoderKL) -> float:
    """Latent shift (`shift_factor` from the config; 0 for the SD-VAE)."""
    value = getattr(vae.config, "shift_factor", None)
    return float(0.0 if value is None else value)


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled latent units, float32, on the VAE's device) of images NCHW in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(f"expected images (N, {vae.config.in_channels}, H, W), got {tuple(images.shape)}")
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def decode(vae: AutoencoderKL, latents_scaled: torch.Tensor) -> torch.Tensor:
    """Images NCHW in [-1, 1] (float32) from scaled latents (the DiT's space)."""
    latents = latents_scaled / vae_scale_factor(vae) + vae_shift_factor(vae)
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample
    return images.float().clamp(-1.0, 1.0)
