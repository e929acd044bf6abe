"""Tests for bench/models/accounting.py: DiT's published compute and parameter counts, and the generic
meta-device counter."""

import psutil
import pytest
import torch
from torch import nn

from bench.models.accounting import count_params, flop_counter, forward_gmacs, forward_gmacs_for_arch
from bench.models.dit import DiT, build_dit


# DiT paper / README "Gflops" (= forward GMACs per image, no CFG doubling).
@pytest.mark.parametrize(
    "arch, input_size, published",
    [("DiT-XL/2", 32, 118.6), ("DiT-B/2", 32, 23.0), ("DiT-S/2", 32, 6.06), ("DiT-XL/2", 64, 524.5)],
)
def test_published_gmacs(arch, input_size, published):
    assert forward_gmacs_for_arch(arch, input_size=input_size) == pytest.approx(published, rel=5e-3)


# Parameter counts of the released DiTs at 256x256 (docs/harness.md §6 table), pos_embed included.
@pytest.mark.parametrize("arch, millions", [("DiT-XL/2", 675.13), ("DiT-B/2", 130.51), ("DiT-S/2", 32.96)])
def test_published_params(arch, millions):
    counts = count_params(build_dit(arch, device="meta"))
    assert counts["total"] / 1e6 == pytest.approx(millions, rel=1e-3)
    hidden = {"DiT-XL/2": 1152, "DiT-B/2": 768, "DiT-S/2": 384}[arch]
    assert counts["frozen"] == 256 * hidden  # the fixed sin-cos position embedding
    assert counts["trainable"] == counts["total"] - counts["frozen"]


def analytic_dit_macs(depth: int, d: int, tokens: int, patch: int, in_ch: int, out_ch: int) -> int:
    """Hand count of DiT forward MACs for one image (matmul-like ops only, as DiT's convention)."""
    per_block = (
        12 * tokens * d * d  # qkv 3d^2 + proj d^2 + fc1 4d^2 + fc2 4d^2 per token
        + 2 * tokens * tokens * d  # Q K^T and attn @ V
        + 6 * d * d  # adaLN modulation, once per image (c is one vector per sample)
    )
    embedders = tokens * in_ch * patch * patch * d + 256 * d + d * d  # patch conv + timestep MLP (labels: lookup)
    final = 2 * d * d + tokens * d * patch * patch * out_ch  # final adaLN + linear to patch pixels
    return depth * per_block + embedders + final


@pytest.mark.parametrize("arch, input_size, in_ch", [("DiT-T/2", 8, 4), ("DiT-M/2", 16, 3), ("DiT-M/4", 16, 4)])
def test_counter_matches_hand_formula(arch, input_size, in_ch):
    model = build_dit(arch, input_size=input_size, in_channels=in_ch, num_classes=10, device="meta")
    tokens = (input_size // model.patch_size) ** 2
    expected = analytic_dit_macs(model.depth, model.hidden_size, tokens, model.patch_size, in_ch, 2 * in_ch)
    assert forward_gmacs(model) * 1e9 == pytest.approx(expected, rel=1e-12)
    assert forward_gmacs(model, batch_size=3) == pytest.approx(forward_gmacs(model), rel=1e-12)


def test_xl_counted_on_meta_without_allocating():
    process = psutil.Process()
    rss_before = process.memory_info().rss
    model = build_dit("DiT-XL/2", input_size=64, device="meta")
    gmacs = forward_gmacs(model, batch_size=4)
    rss_growth = process.memory_info().rss - rss_before
    assert gmacs > 500
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    # Real fp32 XL/2 weights alone are 2.7 GB, its batch-4 activations far more; the meta run needs next to nothing.
    assert rss_growth < 200 * 2**20


def test_real_model_is_neither_moved_nor_modified():
    model = build_dit("DiT-T/2", input_size=8, num_classes=10)
    model.train()
    model.blocks[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gmacs = forward_gmacs(model)
    assert gmacs == forward_gmacs(build_dit("DiT-T/2", input_size=8, num_classes=10, device="meta"))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.blocks[0].training and model.blocks[1].training


class LowRankLinear(nn.Module):
    """A factorised stand-in for an nn.Linear (the shape of surgery the learngene methods do)."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features)

    def forward(self, x):
        return self.up(self.down(x))


def test_module_surgery_is_counted_automatically():
    model = build_dit("DiT-M/2", input_size=16, num_classes=10, device="meta")
    dense = forward_gmacs(model)
    rank, d, tokens = 16, model.hidden_size, 64
    with torch.device("meta"):
        for block in model.blocks:
            block.mlp.fc1 = LowRankLinear(block.mlp.fc1, rank)
    saved_per_block = tokens * (4 * d * d - rank * (d + 4 * d))
    assert (dense - forward_gmacs(model)) * 1e9 == pytest.approx(model.depth * saved_per_block, rel=1e-12)


def test_flop_counter_counts_cpu_fused_attention():
    """On real CPU tensors SDPA runs a fused kernel that plain FlopCounterMode has no formula for; ours counts it.

    Forward equals the MATH backend's explicit bmm's. Backward follows torch's formula for the GPU flash kernels
    (2.5x forward: the fused backward recomputes Q K^T), where the MATH backend's saved-softmax backward is 2x.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    forward_flops = 2 * (2 * 4 * 64 * 64 * 16) * 2  # Q K^T and P V: B*H*T*T*hd MACs each, 2 FLOPs per MAC
    with flop_counter() as fused_forward, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math_forward, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert fused_forward.get_total_flops() == math_forward.get_total_flops() == forward_flops
    with flop_counter() as fused_train:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    assert fused_train.get_total_flops() == forward_flops + 2.5 * forward_flops


def test_real_cpu_forward_count_equals_meta_count():
    model = build_dit("DiT-T/2", input_size=8, num_classes=10)
    with flop_counter() as counter, torch.no_grad():
        model(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([3]))
    assert counter.get_total_flops() / 2e9 == pytest.approx(forward_gmacs(model), rel=1e-12)


def test_gmacs_follow_model_inputs():
    four = forward_gmacs_for_arch("DiT-M/2", input_size=16, in_channels=4, num_classes=10)
    three = forward_gmacs_for_arch("DiT-M/2", input_size=16, in_channels=3, num_classes=10)
    tokens, d, p = 64, 192, 2
    # One input channel fewer: patch conv loses T*p*p*d MACs, final linear (2C outputs) loses 2*T*p*p*d.
    assert (four - three) * 1e9 == pytest.approx(3 * tokens * p * p * d, rel=1e-12)
    assert forward_gmacs_for_arch("DiT-M/2", 16, 4, 1000) == pytest.approx(four, rel=1e-12)  # a lookup: no MACs


def test_count_params_trainable_frozen_and_tied():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    counts = count_params(model)
    assert counts["frozen"] == 16 * 64
    for param in model.blocks.parameters():
        param.requires_grad_(False)
    block_params = sum(p.numel() for p in model.blocks.parameters())
    frozen = count_params(model)
    assert frozen["total"] == counts["total"]
    assert frozen["frozen"] == 16 * 64 + block_params
    model.blocks[1].mlp.fc1 = model.blocks[0].mlp.fc1  # tie: the shared weight counts once
    assert count_params(model)["total"] == counts["total"] - (64 * 256 + 256)


def test_forward_gmacs_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        forward_gmacs(build_dit("DiT-T/2", device="meta"), batch_size=0)
    with pytest.raises(ValueError, match=r"DiT-like model with attributes \['input_size', 'in_channels'"):
        forward_gmacs(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown DiT flavour"):
        forward_gmacs_for_arch("DiT-Z/2")
