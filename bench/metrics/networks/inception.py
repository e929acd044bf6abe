"""Inception-v3 with the 2015 TensorFlow graph's semantics, as used by the ADM evaluator (docs/metrics.md §3.1–3.2).

One forward gives the three ADM features:

* ``pool``: pool_3, the 8×8 average pool after Mixed_7c (N, 2048), for FID, P/R;
* ``spatial``: mixed_6/conv = Mixed_6d.branch1x1 after BN+ReLU, permuted to NHWC, first 7 channels, flattened in
  H, W, C order (N, 17·17·7 = 2023), for sFID (pitfall P9);
* ``logits_unbiased``: pool_3 @ W_softmax without the bias (N, 1008), for IS.

Input: uint8 NHWC RGB at any size; the graph's TF1 bilinear resize to 299 and (x − 128)/128 happen inside.

The blocks are torchvision's, so parameter names are torchvision's and torch-fidelity's and the converted TF
weights ``pt_inception-2015-12-05-6726825d.pth`` load with ``strict=True``. Only the forwards of the blocks whose
pooling differs in the TF graph are restated: average pools ignore the zero padding (``count_include_pad=False``)
and the last block (Mixed_7c) max-pools. We do not run torch-fidelity's module at run time: it exposes no
mixed_6/conv tap, unpickles weights with ``weights_only=False``, and is only a test dependency here. It is the
independent implementation we test against (T20).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import inception as tv

from bench.metrics.networks.tf_resize import tf1_bilinear_resize
from bench.metrics.networks.weights import load_torch_state

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(tv.InceptionA):
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))]


class _MixedC(tv.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))]


class _MixedE(tv.InceptionE):
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool  # the 2015 graph max-pools in its last block (Mixed_7c)

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pooled)]


@dataclasses.dataclass
class InceptionOutputs:
    pool: torch.Tensor
    spatial: torch.Tensor
    logits_unbiased: torch.Tensor


def spatial_features(mixed_6d_branch1x1: torch.Tensor) -> torch.Tensor:
    """ADM's sFID feature from the NCHW (N, 192, 17, 17) tap: NHWC, first 7 channels, flatten (h·17 + w)·7 + c."""
    n, c, h, w = mixed_6d_branch1x1.shape
    if (h, w) != (SPATIAL_GRID, SPATIAL_GRID) or c < SPATIAL_CHANNELS:
        raise ValueError(f"expected (N, >=7, 17, 17) for the mixed_6/conv tap, got {tuple(mixed_6d_branch1x1.shape)}")
    return mixed_6d_branch1x1.permute(0, 2, 3, 1)[..., :SPATIAL_CHANNELS].reshape(n, SPATIAL_DIM)


class InceptionV3TF(nn.Module):
    """The TF-2015 Inception-v3 graph (state-dict keys as in torch-fidelity's ``FeatureExtractorInceptionV3``)."""

    def __init__(self):
        super().__init__()
        conv = tv.BasicConv2d  # conv (no bias) → BN(eps=1e-3) → ReLU
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = tv.InceptionB(288)
        self.Mixed_6b = _MixedC(768, channels_7x7=128)
        self.Mixed_6c = _MixedC(768, channels_7x7=160)
        self.Mixed_6d = _MixedC(768, channels_7x7=160)
        self.Mixed_6e = _MixedC(768, channels_7x7=192)
        self.Mixed_7a = tv.InceptionD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        """``images``: uint8 NHWC (or float NHWC holding 0..255 values)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).to(self.fc.weight.dtype)
        x = tf1_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
        pool, tap = self.trunk((x - 128.0) / 128.0)
        logits = pool @ self.fc.weight.T  # IS uses the softmax *without* its bias (ADM, improved-gan)
        return InceptionOutputs(pool=pool.float(), spatial=spatial_features(tap).float(),
                                logits_unbiased=logits.float())

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised NCHW 299×299 input → (pool_3 (N, 2048), mixed_6/conv tap (N, 192, 17, 17))."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d._forward(x)  # mixed_6/conv is its 1x1 branch, the first 192 channels
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(dim=(2, 3)), branches[0]


def load_inception(weights_path: str | os.PathLike, device: torch.device | str = "cpu") -> InceptionV3TF:
    """Build the network and load a local state dict strictly (never downloads)."""
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights not found: {weights_path}")
    state = load_torch_state(weights_path, "Inception weights")
    model = InceptionV3TF()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{weights_path} is not a TF-2015 Inception state dict: "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    return model.to(device).eval().requires_grad_(False)


def random_inception_state_dict(seed: int = 0, calibrate_images: int = 4) -> dict:
    """A seeded random state dict with BN statistics calibrated on random images, for offline tests.

    Calibration makes the running statistics match the random convolutions, so activations stay O(1) through all
    blocks and the features are informative enough for FID/P/R plumbing tests.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = InceptionV3TF()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
            nn.init.uniform_(m.weight, 0.5, 1.5, generator=gen)
            nn.init.uniform_(m.bias, -0.1, 0.3, generator=gen)
    images = torch.randint(0, 256, (calibrate_images, 96, 96, 3), generator=gen, dtype=torch.uint8)
    model.train()
    with torch.no_grad():
        model(images)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def extract(model: InceptionV3TF, images: np.ndarray | torch.Tensor, device=None) -> InceptionOutputs:
    """Features of one uint8 NHWC batch, on ``device`` (default: the model's)."""
    device = device or model.fc.weight.device
    return model(torch.as_tensor(images).to(device))
