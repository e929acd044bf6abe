"""DINOv2 features for FDD, built with timm and matched to dgm-eval (docs/metrics.md §7).

* Model: timm ``vit_large_patch14_dinov2`` at ``img_size=224``, ``num_classes=0``: the output is the CLS token after
  the final LayerNorm (1024-d), as the torch.hub model returns.
* Weights: a local raw FB checkpoint (``dinov2_vitl14_pretrain.pth``) or timm's ``model.safetensors``; timm's own
  ``checkpoint_filter_fn`` converts the keys, loaded with ``strict=True``.
* Position embedding: the checkpoint's 37×37 grid is resampled once with DINOv2's own rule (bicubic,
  ``scale_factor = (16 + 0.1)/37``, no antialias), *before* timm sees it, because timm's rule (antialiased bicubic to
  size 16) gives different features (pitfall P20).
* Preprocessing (``pil_bicubic_uint8``, dgm-eval's default and EDM2's ``'pil'`` mode): PIL bicubic resize of the
  uint8 RGB image to 224×224 (re-quantised to uint8), /255, ImageNet mean/std. ``torch_antialias`` (EDM2's fast
  mode) is offered and labelled as such.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.networks.weights import load_torch_state

IMAGE_SIZE = 224
PATCH = 14
INTERPOLATE_OFFSET = 0.1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("pil_bicubic_uint8", "torch_antialias")
DEFAULT_ARCH = "vit_large_patch14_dinov2"
DINOV2_HUB_NAMES = {"vit_small_patch14_dinov2": "vits14", "vit_base_patch14_dinov2": "vitb14",
                    "vit_large_patch14_dinov2": "vitl14", "vit_giant_patch14_dinov2": "vitg14"}


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """Resample a (1, 1 + M², D) position embedding to (1, 1 + grid², D) with DINOv2's hub rule; CLS row kept."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected pos_embed of shape (1, 1+M^2, D), got {tuple(pos_embed.shape)}")
    n_patches = pos_embed.shape[1] - 1
    m = int(math.isqrt(n_patches))
    if m * m != n_patches:
        raise ValueError(f"pos_embed has {n_patches} patch tokens, not a square grid")
    if m == grid:
        return pos_embed.clone()
    dim = pos_embed.shape[2]
    cls_row, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    scale = (grid + offset) / m
    patches = F.interpolate(patches.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                            mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):
        raise ValueError(f"DINOv2 pos-embed rule produced {tuple(patches.shape[-2:])}, expected {(grid, grid)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, patches], dim=1)


def _read_state_dict(path: str | os.PathLike) -> dict:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return load_torch_state(path, "DINOv2 weights")


def build_dinov2(weights_path: str | os.PathLike | None, arch: str = DEFAULT_ARCH, *, image_size: int = IMAGE_SIZE,
                 pos_embed_rule: str = "dinov2", device: torch.device | str = "cpu") -> torch.nn.Module:
    """The timm DINOv2 backbone returning the final-norm CLS token; ``weights_path=None`` keeps random weights.

    ``pos_embed_rule='timm'`` leaves the resampling to timm (only for quantifying P20 in acceptance A3).
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if image_size % PATCH:
        raise ValueError(f"image_size must be a multiple of {PATCH}, got {image_size}")
    model = timm.create_model(arch, pretrained=False, img_size=image_size, num_classes=0)
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"DINOv2 weights not found: {weights_path}")
        state = _read_state_dict(weights_path)
        if "pos_embed" not in state:
            raise ValueError(f"{weights_path}: no pos_embed; not a DINOv2 ViT checkpoint")
        if pos_embed_rule == "dinov2":
            state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], image_size // PATCH)
        elif pos_embed_rule != "timm":
            raise ValueError(f"unknown pos_embed_rule {pos_embed_rule!r}")
        state = checkpoint_filter_fn(state, model)  # FB → timm key conversion; resamples only if still mismatched
        model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def preprocess(images: np.ndarray, mode: str = "pil_bicubic_uint8", image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 NHWC → normalised float32 NCHW at ``image_size``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown FDD resize mode {mode!r}; choose one of {RESIZE_MODES}")
    if mode == "pil_bicubic_uint8":
        from PIL import Image

        resized = np.stack([
            np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BICUBIC))
            for img in images
        ])
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
    else:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        x = x / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract(model: torch.nn.Module, images: np.ndarray, mode: str = "pil_bicubic_uint8") -> torch.Tensor:
    """CLS features (N, D) of one uint8 NHWC batch."""
    device = next(model.parameters()).device
    size = model.patch_embed.img_size[0]
    return model(preprocess(images, mode, size).to(device)).float()


def random_fb_checkpoint(arch: str = "vit_small_patch14_dinov2", seed: int = 0) -> dict:
    """A seeded random checkpoint in the raw FB layout (518-px 37×37 pos_embed, ``mask_token``), for tests."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=518, num_classes=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # timm's init (pos_embed noise 0.02, LayerScale 1e-5) makes every output ≈ the constant CLS token. Give the
    # embedding structure (so resampling rules are distinguishable) and the residual branches weight (as the hub's
    # init_values=1.0), so random features depend on the image.
    gen = torch.Generator().manual_seed(seed)
    state["pos_embed"] = torch.randn(state["pos_embed"].shape, generator=gen)
    for key in state:
        if key.endswith(("ls1.gamma", "ls2.gamma")):
            state[key] = torch.ones_like(state[key])
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state
