"""TensorFlow-1 legacy bilinear resize (``align_corners=False``, no half-pixel centres), docs/metrics.md §3.1.

The 2015 Inception graph resizes its input with this rule:

    src = dst · (in / out),  i0 = floor(src),  i1 = min(i0 + 1, in − 1),  value = x[i0] + (x[i1] − x[i0]) · (src − i0)

PyTorch's ``F.interpolate(..., align_corners=False)`` uses half-pixel centres instead, which gives different pixels
(pitfall P1). Coordinates are computed in the input dtype, as TF does in float32.
"""

from __future__ import annotations

import torch


def _axis_weights(in_size: int, out_size: int, dtype, device):
    scale = torch.tensor(in_size / out_size, dtype=dtype, device=device)
    src = torch.arange(out_size, dtype=dtype, device=device) * scale
    lo = torch.floor(src).long().clamp_max(in_size - 1)
    hi = (lo + 1).clamp_max(in_size - 1)
    frac = src - lo.to(dtype)
    return lo, hi, frac


def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize NCHW floating-point ``x`` to ``size`` = (H, W) with TF1 legacy bilinear semantics."""
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(f"expected a floating-point NCHW tensor, got {x.dtype} of shape {tuple(x.shape)}")
    out_h, out_w = size
    # Width first, then height: TF's kernel lerps the top and bottom rows horizontally, then lerps vertically.
    lo, hi, frac = _axis_weights(x.shape[3], out_w, x.dtype, x.device)
    left, right = x[:, :, :, lo], x[:, :, :, hi]
    x = left + (right - left) * frac[None, None, None, :]
    lo, hi, frac = _axis_weights(x.shape[2], out_h, x.dtype, x.device)
    top, bottom = x[:, :, lo, :], x[:, :, hi, :]
    return top + (bottom - top) * frac[None, None, :, None]
