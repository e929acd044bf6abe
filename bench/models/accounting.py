"""Parameter and compute accounting for DiT-style models, in DiT's convention.

Conventions (docs/harness.md §6):

* Compute is reported as **forward GMACs per image** (multiply-accumulates, one image, no classifier-free-guidance
  doubling). DiT's paper calls these "Gflops": DiT-XL/2 at 256x256 is 118.6, at 512x512 524.6.
* It is *measured*, not written down per architecture: one forward pass runs under
  ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device, so any module surgery (factorised Linears,
  adapters, gates) is counted automatically and no real weights are allocated, even for DiT-XL. FlopCounterMode
  counts 2 FLOPs per MAC for matmul-like ops only (linear, conv, bmm, attention); normalisations, activations,
  embedding lookups and elementwise ops are not counted, which matches DiT's convention.

This module is a leaf: it imports torch only (``forward_gmacs_for_arch`` imports the DiT lazily).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_params", "flop_counter", "forward_gmacs", "forward_gmacs_for_arch"]


def count_params(model: nn.Module) -> dict[str, int]:
    """Exact parameter counts: ``total``, ``trainable`` (requires_grad) and ``frozen``.

    Shared (tied) parameters are counted once. Works on meta-device models. DiT's fixed position embedding is a
    frozen parameter and is included in ``total``, as in DiT's own count (DiT-XL/2: 675.13M).
    """
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


# On CPU, scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode
# has no formula for (only the CUDA flash/efficient/cudnn kernels are registered), so attention would silently
# count 0 (docs/harness.md §11.4). On the meta device SDPA decomposes to bmm, which is counted; these formulas make
# the counter right on real CPU tensors too. Passed per counter (custom_mapping), never registered globally.
def _cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _cpu_sdpa_mapping() -> dict[Any, Any]:
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU fused attention (forward and backward). Reports FLOPs = 2 x MACs."""
    return FlopCounterMode(display=display, custom_mapping=_cpu_sdpa_mapping())


def forward_gmacs(model: nn.Module, *, batch_size: int = 1) -> float:
    """Forward GMACs per image of a DiT-like model, measured on the meta device (no real weights touched).

    The model must expose ``input_size``, ``in_channels`` and ``num_classes`` (as ``bench.models.dit.DiT`` does);
    it is called as ``model(x, t, y)``. It may live on any device: its parameters and buffers are swapped for meta
    stand-ins for the one forward (``torch.func.functional_call``), so the model itself is neither moved nor
    modified. ``batch_size`` images are run and the count is divided by it (DiT's FLOPs are linear in batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    missing = [name for name in ("input_size", "in_channels", "num_classes") if not hasattr(model, name)]
    if missing:
        raise ValueError(f"forward_gmacs needs a DiT-like model with attributes {missing}; got {type(model).__name__}")

    stand_ins = {name: torch.empty_like(t, device="meta") for name, t in model.named_parameters()}
    stand_ins.update({name: torch.empty_like(t, device="meta") for name, t in model.named_buffers()})
    dtype = next((t.dtype for t in stand_ins.values() if t.is_floating_point()), torch.float32)
    size = model.input_size
    x = torch.empty(batch_size, model.in_channels, size, size, device="meta", dtype=dtype)
    t = torch.zeros(batch_size, device="meta", dtype=torch.long)
    y = torch.zeros(batch_size, device="meta", dtype=torch.long)

    # Eval mode: label dropout draws random numbers and is irrelevant to compute; restore every module's flag after.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        counter = flop_counter()
        with torch.no_grad(), counter:
            torch.func.functional_call(model, stand_ins, (x, t, y))
    finally:
        for module, training in modes.items():
            module.training = training
    return counter.get_total_flops() / 2 / batch_size / 1e9


def forward_gmacs_for_arch(arch: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000) -> float:
    """Forward GMACs per image of a stock DiT flavour (``"DiT-XL/2"``), built on the meta device."""
    # Imported here so this module stays importable with torch alone (the DiT pulls in timm).
    from bench.models.dit import build_dit

    model = build_dit(arch, input_size=input_size, in_channels=in_channels, num_classes=num_classes, device="meta")
    return forward_gmacs(model)
