"""Inception plumbing with random weights: docs/metrics.md §16 T19-T21 and T23 (T22, the sample I/O, has its own
file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.metrics.networks.inception import SPATIAL_DIM, InceptionV3TF, load_inception, spatial_features
from bench.metrics.networks.tf_resize import tf1_bilinear_resize
from bench.metrics.sample_io import to_uint8_dit


def ramp(dtype=torch.float64):
    return torch.arange(256, dtype=dtype).view(1, 1, 1, 256).expand(1, 1, 256, 256).contiguous()


def test_t19_tf1_bilinear_ramp():
    out = tf1_bilinear_resize(ramp(), (299, 299))
    expected = torch.clamp(torch.arange(299, dtype=torch.float64) * 256 / 299, max=255)
    assert out.shape == (1, 1, 299, 299)
    assert torch.max(torch.abs(out[0, 0] - expected[None, :])) <= 1e-12
    half_pixel = F.interpolate(ramp(), size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.max(torch.abs(half_pixel - out)) > 0.05  # PyTorch's convention gives different pixels (P1)


def test_t19_matches_torch_fidelity_resize():
    tfi = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = torch.rand(2, 3, 256, 200, generator=torch.Generator().manual_seed(0)) * 255
    theirs = tfi.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.max(torch.abs(tf1_bilinear_resize(x, (299, 299)) - theirs)) <= 1e-5


def test_t20_equivalence_with_torch_fidelity(weights_dir, inception_model):
    tfx = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    path = weights_dir / "inception/pt_inception-2015-12-05-6726825d.pth"
    theirs = tfx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(path))
    images = torch.randint(0, 256, (2, 96, 96, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        ours = inception_model(images)
        pool, logits = theirs(images.permute(0, 3, 1, 2).contiguous())
    for a, b in ((ours.pool, pool), (ours.logits_unbiased, logits)):
        assert torch.max(torch.abs(a - b)) <= 1e-5 * torch.max(torch.abs(b))
    assert ours.pool.std(0).mean() > 1e-3  # random weights still give image-dependent features


def test_t21_spatial_flattening_is_nhwc():
    c, h, w = torch.meshgrid(torch.arange(192), torch.arange(17), torch.arange(17), indexing="ij")
    tap = (c * 10000 + h * 100 + w).double()[None].repeat(2, 1, 1, 1)
    flat = spatial_features(tap)
    assert flat.shape == (2, SPATIAL_DIM) == (2, 2023)
    for hh, ww, cc in [(0, 0, 0), (0, 0, 6), (3, 5, 2), (16, 16, 6), (16, 0, 4)]:
        assert flat[1, (hh * 17 + ww) * 7 + cc] == cc * 10000 + hh * 100 + ww
    assert flat.max() < 7 * 10000  # only channels 0..6


def test_t21_model_taps_mixed_6d_branch1x1(inception_model):
    captured = {}
    hook = inception_model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("t", o))
    try:
        images = torch.randint(0, 256, (2, 64, 64, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
        with torch.no_grad():
            out = inception_model(images)
    finally:
        hook.remove()
    tap = captured["t"]
    assert tap.shape == (2, 192, 17, 17) and tap.min() >= 0  # post BN+ReLU
    assert torch.equal(out.spatial, tap.permute(0, 2, 3, 1)[..., :7].reshape(2, -1))


def test_logits_have_no_bias(inception_model):
    images = torch.randint(0, 256, (2, 80, 80, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        out = inception_model(images)
    assert torch.allclose(out.logits_unbiased, out.pool @ inception_model.fc.weight.T, rtol=0, atol=1e-5)
    assert out.logits_unbiased.shape == (2, 1008)


def test_batch_composition_does_not_change_features(inception_model):
    images = torch.randint(0, 256, (2, 64, 64, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    with torch.no_grad():
        together = inception_model(images).pool
        apart = torch.cat([inception_model(images[i:i + 1]).pool for i in range(2)])
    assert torch.max(torch.abs(together - apart)) <= 1e-5 * torch.max(torch.abs(together))


def test_t23_uint8_conversion():
    assert to_uint8_dit(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    x = np.random.default_rng(0).uniform(-1.2, 1.2, 100_000)
    expected = np.clip(np.floor(127.5 * (x + 1) + 0.5), 0, 255)  # round-half-up of 127.5(x+1)
    assert np.array_equal(to_uint8_dit(torch.from_numpy(x)), expected.astype(np.uint8))
    assert to_uint8_dit(np.array([0.5 / 127.5 - 1])).tolist() == [1]  # exactly half rounds up


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        load_inception(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, bad)
    with pytest.raises(ValueError, match="not a TF-2015 Inception state dict"):
        load_inception(bad)
    with pytest.raises(ValueError, match="3 channels"):
        InceptionV3TF()(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))


def test_strict_fp32_disables_and_restores_tf32():
    from bench.metrics.networks.numerics import strict_fp32, tf32_enabled

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = conv.fp32_precision = "tf32"  # what a TF32-happy sampler leaves behind (P8)
    try:
        assert tf32_enabled()
        with strict_fp32():
            assert not tf32_enabled()
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
