"""Strict float32 for feature extraction (pitfall P8): no TF32, no autocast, settings restored afterwards.

DiT's sampler turns TF32 matmuls on, and cuDNN convolutions allow TF32 by default; Inception/DINOv2 features
computed under TF32 drift at the 1e-3 level, which moves FID outside tolerance. Everything the metrics run goes
through ``strict_fp32()``.

PyTorch >= 2.9 has per-backend ``fp32_precision`` flags and raises if the legacy ``allow_tf32`` flags are *read*
after the new ones were set to differing values ("a mix of the legacy and new APIs"). So we use the new API whenever
it exists and touch the legacy one only on older PyTorch.
"""

from __future__ import annotations

import contextlib

import torch


def _precision_backends() -> list:
    return [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]


def _has_new_api() -> bool:
    return all(hasattr(b, "fp32_precision") for b in _precision_backends())


@contextlib.contextmanager
def strict_fp32():
    if _has_new_api():
        saved = [b.fp32_precision for b in _precision_backends()]
        for b in _precision_backends():
            b.fp32_precision = "ieee"
    else:  # PyTorch < 2.9
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                 torch.get_float32_matmul_precision())
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        if _has_new_api():
            for b, value in zip(_precision_backends(), saved):
                b.fp32_precision = value
        else:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[0], saved[1]
            torch.set_float32_matmul_precision(saved[2])


def tf32_enabled() -> bool:
    """Would a float32 matmul or convolution currently be allowed to use TF32?"""
    if _has_new_api():
        return any(b.fp32_precision == "tf32" for b in _precision_backends()[:2])
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
