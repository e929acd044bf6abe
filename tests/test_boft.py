"""Native BOFT (``baselines.boft``) against peft's own BOFT construction, and its cost.

peft is the reference for the parametrisation: its permutation builder and Cayley transform are called here
directly, and its dense rotation is assembled exactly as ``peft.tuners.boft.layer.Linear.get_delta_weight`` does
(block-diagonal Cayley blocks, ``P D Pᵀ`` per factor, factors multiplied ``M_{m-1} ... M_0``).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
from peft.tuners.boft import BOFTLayer  # noqa: E402

from baselines.boft import ButterflyOrthogonalLinear, butterfly_permutation  # noqa: E402
from methods import ArchSpec, get_method  # noqa: E402
from methods.budget import build_for_count  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft warns that its CUDA extension is missing


def peft_permutation(width: int, block_size: int, factors: int, factor: int) -> torch.Tensor:
    blocks = width // block_size
    return BOFTLayer.block_butterfly_perm(None, width, blocks // 2 ** factor, block_size // 2, factors - 1)


def peft_rotation(boft_R: torch.Tensor) -> torch.Tensor:
    """peft's dense R for trained blocks ``boft_R`` (m, in / b, b, b), built as its ``get_delta_weight`` does."""
    factors, blocks, size, _ = boft_R.shape
    width = blocks * size
    cayley = BOFTLayer.cayley_batch(None, boft_R.reshape(-1, size, size)).reshape(factors, blocks, size, size)
    diagonal = torch.stack([torch.block_diag(*cayley[i]) for i in range(factors)])
    perms = torch.stack([BOFTLayer.perm2mat(None, peft_permutation(width, size, factors, i))
                         for i in range(factors)]).to(boft_R.dtype)
    per_factor = torch.bmm(perms, torch.bmm(diagonal, perms.transpose(1, 2)))
    rotation = per_factor[0]
    for i in range(1, factors):
        rotation = per_factor[i] @ rotation
    return rotation


@pytest.mark.parametrize(("width", "block_size", "factors"), [(64, 4, 1), (64, 4, 2), (64, 8, 3), (96, 6, 2)])
def test_permutations_match_peft(width, block_size, factors):
    for factor in range(factors):
        assert torch.equal(butterfly_permutation(width, block_size, factor),
                           peft_permutation(width, block_size, factors, factor))


def _layer(in_features: int, out_features: int, block_size: int, factors: int, dropout: float = 0.0):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, dtype=torch.float64)
    layer = ButterflyOrthogonalLinear(linear, block_size, factors, dropout)
    with torch.no_grad():
        layer.boft_R.normal_(0, 0.3)
        layer.boft_s.normal_(1, 0.1)
    return linear, layer


@pytest.mark.parametrize(("block_size", "factors"), [(4, 1), (4, 2), (8, 3), (2, 4)])
def test_rotation_is_pefts_and_orthogonal_and_never_formed_in_the_forward(block_size, factors):
    linear, layer = _layer(32, 24, block_size, factors)
    eye = torch.eye(32, dtype=torch.float64)
    rotation = layer.rotate(eye)
    torch.testing.assert_close(rotation, peft_rotation(layer.boft_R.detach()), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation @ rotation.T, eye, rtol=0, atol=1e-12)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    expected = (x @ rotation) @ linear.weight.T * layer.boft_s + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.to_linear()(x), expected, rtol=0, atol=1e-12)


def test_one_factor_matches_a_peft_injected_layer():
    # peft builds one butterfly factor on CPU; give it our trained values and compare whole-layer outputs.
    linear, layer = _layer(32, 24, 8, 1)
    holder = nn.Module()
    holder.proj = nn.Linear(32, 24, dtype=torch.float64)
    holder.proj.load_state_dict(linear.state_dict())
    peft.inject_adapter_in_model(peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1,
                                                 target_modules=["proj"]), holder)
    with torch.no_grad():
        holder.proj.boft_R["default"].copy_(layer.boft_R)
        holder.proj.boft_s["default"].copy_(layer.boft_s[:, None])
    x = torch.randn(4, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), holder.proj(x), rtol=0, atol=1e-10)


def test_zero_init_is_the_frozen_layer_and_dropout_only_acts_in_training():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    layer = ButterflyOrthogonalLinear(linear, 4, 2, dropout=0.5)
    x = torch.randn(6, 32)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-6)  # R = I, s = 1 at init
    with torch.no_grad():
        layer.boft_R.normal_(0, 0.5)
    layer.eval()
    evaluated = layer(x)
    assert torch.equal(evaluated, layer(x))  # deterministic out of training
    layer.train()
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), evaluated, atol=1e-4)  # some blocks replaced by the identity
    assert layer.training  # merging must not leave the layer in eval mode
    torch.testing.assert_close(layer.to_linear()(x), evaluated, rtol=0, atol=1e-5)


def test_trained_cost_stays_at_the_dense_models_at_dit_b():
    """peft's BOFT counted 1150 forward GMACs as trained against 23 merged at DiT-B/2 (it forms in x in rotations);
    the native layer adds only the block matmuls on the activations."""
    method = get_method("boft")  # defaults: b = 8, m = 2
    model = build_for_count(method, ArchSpec("DiT-B/2"), 150)
    accounting = method.count(model)
    assert accounting.gmacs_fwd_trained < 1.05 * accounting.gmacs_fwd_sampled
    assert {tuple(p.shape[:2]) for n, p in model.named_parameters() if n.endswith("boft_R")} == {(2, 96), (2, 384)}
