"""The shared factorised Linear (methods.decomposed): exactness of the SVD init, merge, masks and groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from methods.decomposed import DecomposedLinear, SplitDecomposedLinear, svd_factors

SHAPES = [(24, 24), (48, 16), (16, 40)]  # (in, out): square, tall (out < in), wide


def linear(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.xavier_uniform_(layer.weight)  # DiT's init of its Linears
    if bias:
        nn.init.normal_(layer.bias)
    return layer


def batch(n_in: int, n: int = 3, tokens: int = 5) -> torch.Tensor:
    return torch.randn(n, tokens, n_in, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_svd_init_equals_the_dense_layer(n_in, n_out, bias):
    dense = linear(n_in, n_out, bias)
    layer = DecomposedLinear.from_linear(dense, min(n_in, n_out))
    x = batch(n_in)
    assert (layer(x) - dense(x)).abs().max() <= 1e-5
    assert (layer.merged_weight() - dense.weight).abs().max() <= 1e-6
    assert (layer.bias is None) == (not bias)


def test_components_are_in_descending_singular_value_order_and_truncation_is_optimal():
    dense = linear(32, 32, bias=False)
    full = torch.linalg.svdvals(dense.weight.double())
    layer = DecomposedLinear.from_linear(dense, 10)
    assert torch.all(layer.sigma[:-1] >= layer.sigma[1:])
    torch.testing.assert_close(layer.sigma.double(), full[:10], rtol=1e-6, atol=1e-6)
    # Eckart-Young: the rank-10 truncation leaves exactly the discarded singular values as its Frobenius error.
    error = torch.linalg.matrix_norm(dense.weight.double() - layer.merged_weight().double())
    assert error.item() == pytest.approx(full[10:].square().sum().sqrt().item(), rel=1e-5)


def test_groups_split_the_components_in_order_and_name_their_parameters():
    dense = linear(20, 20)
    single = DecomposedLinear.from_linear(dense, 20)
    grouped = DecomposedLinear.from_linear(dense, {"kind_learngene": 12, "kind_tailor": 8})
    names = [n for n, _ in grouped.named_parameters()]
    assert names == ["kind_learngene_U", "kind_learngene_sigma", "kind_learngene_V",
                     "kind_tailor_U", "kind_tailor_sigma", "kind_tailor_V", "bias"]
    assert [n for n, _ in single.named_parameters()] == ["U", "sigma", "V", "bias"]
    torch.testing.assert_close(grouped.kind_tailor_sigma, single.sigma[12:])
    torch.testing.assert_close(grouped.kind_learngene_U, single.U[:, :12])
    assert grouped.group_slice("kind_tailor") == slice(12, 20) and grouped.rank == 20
    x = batch(20)
    assert (grouped(x) - dense(x)).abs().max() <= 1e-5


def test_freezing_one_group_leaves_its_gradient_empty():
    layer = DecomposedLinear.from_linear(linear(16, 16), {"a": 8, "b": 8})
    for p in layer.group_parameters("a").values():
        p.requires_grad_(False)
    layer(batch(16)).square().sum().backward()
    assert all(p.grad is None for p in layer.group_parameters("a").values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.group_parameters("b").values())


def test_a_shared_mask_matches_the_merged_linear_of_that_mask():
    layer = DecomposedLinear.from_linear(linear(24, 16), 16)
    mask = (torch.arange(16) % 3 != 0).float()
    x = batch(24)
    torch.testing.assert_close(layer(x, mask), layer.to_linear(mask)(x), rtol=0, atol=1e-5)
    assert (layer(x, mask) - layer(x)).abs().max() > 1e-3  # the mask really changes the output


def test_a_per_sample_mask_gives_each_sample_its_own_components():
    layer = DecomposedLinear.from_linear(linear(24, 24), 24)
    generator = torch.Generator().manual_seed(3)
    masks = (torch.rand(4, 24, generator=generator) > 0.5).float()
    x = batch(24, n=4)
    together = layer(x, masks)
    for i in range(4):
        alone = layer.to_linear(masks[i])(x[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-5)


def test_a_per_sample_mask_costs_rank_space_macs_only():
    """No per-sample dense matrix: r * (in + out) MACs per token, never in * out per sample."""
    n_in, n_out, rank, n, tokens = 64, 96, 16, 4, 10
    layer = DecomposedLinear(n_in, n_out, rank)
    x = torch.randn(n, tokens, n_in)
    with FlopCounterMode(display=False) as counter:
        layer(x, torch.ones(n, rank))
    assert counter.get_total_flops() // 2 == n * tokens * rank * (n_in + n_out)


@pytest.mark.parametrize(("mask", "message"), [
    (torch.ones(5), r"shape \(8,\) or \(batch, 8\)"),
    (torch.ones(2, 8), "per-sample mask of batch 2"),
    (torch.ones(3, 2, 8), r"shape \(8,\) or \(batch, 8\)"),
])
def test_bad_masks_are_clear_errors(mask, message):
    layer = DecomposedLinear(8, 8, 8)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(3, 4, 8), mask)


def test_merge_mask_must_be_one_vector():
    layer = DecomposedLinear(8, 8, 8)
    with pytest.raises(ValueError, match="exact for one mask only"):
        layer.to_linear(torch.ones(3, 8))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: svd_factors(torch.randn(4, 6), 5), r"rank 5 is out of range for a \(4, 6\) weight"),
    (lambda: svd_factors(torch.randn(4), 1), "needs a 2-D weight"),
    (lambda: DecomposedLinear(4, 4, {"a": -1}), "non-negative int size"),
    (lambda: DecomposedLinear(4, 4, {"bad name": 1}), "must be a Python identifier"),
    (lambda: DecomposedLinear(4, 4, 4).load_svd(torch.randn(3, 4)), r"does not fit a DecomposedLinear \(4, 4\)"),
    (lambda: DecomposedLinear(4, 4, 4, bias=False).load_svd(torch.randn(4, 4), torch.randn(4)), "without a bias"),
])
def test_bad_construction_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bf16_forward_is_close_to_fp32():
    layer = DecomposedLinear.from_linear(linear(32, 32), 32)
    x = batch(32)
    reference = layer(x)
    low = copy.deepcopy(layer).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = layer(x, torch.ones(3, 32))
    assert autocast.dtype == torch.bfloat16 and torch.isfinite(autocast.float()).all()


def test_zero_rank_group_is_allowed_and_contributes_nothing():
    layer = DecomposedLinear.from_linear(linear(16, 16), {"kept": 6, "dropped": 0})
    reference = DecomposedLinear.from_linear(linear(16, 16), 6)
    x = batch(16)
    torch.testing.assert_close(layer(x), reference(x))


def test_meta_device_construction_allocates_nothing():
    layer = DecomposedLinear(1024, 4096, {"a": 512, "b": 512}, device="meta")
    assert all(p.is_meta for p in layer.parameters())
    out = layer(torch.empty(2, 7, 1024, device="meta"), torch.empty(2, 1024, device="meta"))
    assert out.shape == (2, 7, 4096)


# ---- split (fused qkv -> q, k, v) ---------------------------------------------------------------------------------


def make_split(dense: nn.Linear, rank: int) -> SplitDecomposedLinear:
    return SplitDecomposedLinear.from_linear(dense, ("q", "k", "v"),
                                             lambda n_in, n_out: DecomposedLinear(n_in, n_out, rank, bias=False))


def test_split_layer_equals_the_fused_linear_and_keeps_its_bias():
    dense = linear(16, 48)
    split = make_split(dense, 16)
    x = batch(16)
    assert (split(x) - dense(x)).abs().max() <= 1e-5
    merged = split.to_linear()
    assert (merged.weight - dense.weight).abs().max() <= 1e-6
    torch.testing.assert_close(merged.bias, dense.bias)
    assert [n for n, _ in split.named_parameters()] == ["bias", "q.U", "q.sigma", "q.V", "k.U", "k.sigma", "k.V",
                                                        "v.U", "v.sigma", "v.V"]
    # Each part is the SVD of its own row block, not of the fused matrix.
    torch.testing.assert_close(split.k.sigma.double(), torch.linalg.svdvals(dense.weight[16:32].double()),
                               rtol=1e-6, atol=1e-6)


def test_split_layer_masks_every_part():
    split = make_split(linear(16, 48), 8)
    mask = torch.zeros(2, 8)
    mask[0, :4] = 1
    out = split(batch(16, n=2), mask)
    torch.testing.assert_close(out[1], split.bias.expand_as(out[1]))  # every component off: bias only
    torch.testing.assert_close(out[:1], split.to_linear(mask[0])(batch(16, n=2)[:1]), rtol=0, atol=1e-5)


def test_split_layer_validation():
    with pytest.raises(ValueError, match="cannot split 10 output rows into 3 equal parts"):
        make_split(linear(4, 10), 2)
    with pytest.raises(ValueError, match="must have no bias"):
        SplitDecomposedLinear({"q": DecomposedLinear(4, 4, 2)}, None)
    with pytest.raises(ValueError, match="same shape"):
        SplitDecomposedLinear({"q": DecomposedLinear(4, 4, 2, bias=False),
                               "k": DecomposedLinear(4, 5, 2, bias=False)}, None)
