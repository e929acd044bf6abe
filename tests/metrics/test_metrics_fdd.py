"""FDD plumbing (DINOv2 via timm, dgm-eval preprocessing): docs/metrics.md §16 T24-T26."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DINO_ARCH

from bench.metrics.networks import dinov2 as dino


def test_t24_pil_bicubic_matches_torchvision():
    from PIL import Image
    from torchvision import transforms as T

    images = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    ours = dino.preprocess(images)
    assert torch.equal(ours, dino.preprocess(images))  # deterministic
    tv = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    theirs = torch.stack([tv(Image.fromarray(img)) for img in images])
    assert ours.shape == (3, 3, 224, 224)
    assert torch.max(torch.abs(ours - theirs)) <= 1e-6
    assert dino.MEAN == (0.485, 0.456, 0.406) and dino.STD == (0.229, 0.224, 0.225)
    fast = dino.preprocess(images, "torch_antialias")
    assert fast.shape == ours.shape and 0 < torch.mean(torch.abs(fast - ours)) < 0.05  # close, not the same


def _bicubic_weights(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return (((t - 5) * t + 8) * t - 4) * a
    return 0.0


def _manual_resample(grid, out, scale):
    """Separable bicubic with PyTorch's scale_factor mapping src = (dst + 0.5)/scale − 0.5, clamped taps."""
    m = grid.shape[0]

    def axis_matrix():
        w = np.zeros((out, m))
        for j in range(out):
            src = (j + 0.5) / scale - 0.5
            i0 = int(np.floor(src))
            for tap in range(i0 - 1, i0 + 3):
                w[j, min(max(tap, 0), m - 1)] += _bicubic_weights(src - tap)
        return w

    w = axis_matrix()
    return np.einsum("ij,jkc,lk->ilc", w, grid, w)


def test_t25_pos_embed_rule():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 37 * 37, 1024, generator=torch.Generator().manual_seed(0))
    ours = dino.dinov2_pos_embed(pos, 16)
    assert ours.shape == (1, 257, 1024)
    assert torch.equal(ours[:, 0], pos[:, 0])  # CLS row kept
    grid = pos[:, 1:].reshape(1, 37, 37, 1024).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert torch.allclose(ours[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 1024), atol=1e-6)
    # independent check of the offset semantics on a few channels
    manual = _manual_resample(pos[0, 1:, :4].reshape(37, 37, 4).double().numpy(), 16, 16.1 / 37)
    assert np.max(np.abs(ours[0, 1:, :4].reshape(16, 16, 4).double().numpy() - manual)) <= 1e-4
    timm_rule = resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1)  # antialiased, size 16 (pitfall P20)
    assert timm_rule.shape == ours.shape and torch.max(torch.abs(timm_rule - ours)) > 1e-2
    with pytest.raises(ValueError, match="square grid"):
        dino.dinov2_pos_embed(torch.zeros(1, 1 + 10, 8), 4)


def test_t26_timm_plumbing_small(weights_dir):
    path = weights_dir / "dinov2/dinov2_vits14_pretrain.pth"
    model = dino.build_dinov2(path, DINO_ARCH)
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.pos_embed, dino.dinov2_pos_embed(state["pos_embed"], 16))
    assert torch.equal(model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    feats = dino.extract(model, images)
    assert feats.shape == (2, 384) and torch.isfinite(feats).all()
    # the CLS token after the final norm (timm's pooled output is exactly that)
    with torch.no_grad():
        tokens = model.forward_features(dino.preprocess(images))
    assert torch.allclose(feats, tokens[:, 0], atol=1e-6)
    # timm's own pos-embed rule gives different features (P20, quantified in A3)
    timm_model = dino.build_dinov2(path, DINO_ARCH, pos_embed_rule="timm")
    assert torch.max(torch.abs(dino.extract(timm_model, images) - feats)) > 1e-4


def test_t26_safetensors_layout_loads_the_same(tmp_path, weights_dir):
    from safetensors.torch import save_file

    state = torch.load(weights_dir / "dinov2/dinov2_vits14_pretrain.pth", weights_only=True)
    state.pop("mask_token")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    a = dino.build_dinov2(weights_dir / "dinov2/dinov2_vits14_pretrain.pth", DINO_ARCH)
    b = dino.build_dinov2(tmp_path / "model.safetensors", DINO_ARCH)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_strict_loading_rejects_wrong_checkpoint(tmp_path):
    bad = dino.random_fb_checkpoint(DINO_ARCH)
    bad.pop("norm.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="norm.weight"):
        dino.build_dinov2(tmp_path / "bad.pth", DINO_ARCH)
    with pytest.raises(FileNotFoundError):
        dino.build_dinov2(tmp_path / "missing.pth", DINO_ARCH)


@pytest.mark.slow
def test_t26_vit_large_smoke(tmp_path):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(dino.random_fb_checkpoint("vit_large_patch14_dinov2"), path)
    model = dino.build_dinov2(path, "vit_large_patch14_dinov2")
    feats = dino.extract(model, np.random.default_rng(2).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8))
    assert feats.shape == (2, 1024) and torch.isfinite(feats).all()
