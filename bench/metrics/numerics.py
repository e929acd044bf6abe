"""Strict float32 for feature extraction (pitfall P8): no TF32, no autocast, settings restored afterwards.

DiT's sampler turns TF32 matmuls on; Inception/DINOv2 features computed under TF32 drift at the 1e-3 level, which
moves FID outside tolerance. Everything the metrics run goes through ``strict_fp32()``.
"""

from __future__ import annotations

import contextlib

import torch


def tf32_flags() -> dict:
    return {
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


@contextlib.contextmanager
def strict_fp32():
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved["cudnn_allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_allow_tf32"]
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
