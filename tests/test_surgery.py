"""Module surgery (methods.surgery): suffix matching on whole components, unmatched targets fail, reinit."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.models.dit import build_dit  # noqa: E402
from methods import ArchSpec, MethodError, Task, get_method  # noqa: E402
from methods.surgery import (  # noqa: E402
    check_reinit_names,
    find_linears,
    freeze_all,
    matches_suffix,
    module_param_names,
    reinit_modules,
    replace_linears,
    resolve_modules,
)


@pytest.fixture()
def dit():
    torch.manual_seed(0)
    return build_dit("DiT-T/2", input_size=8, num_classes=10)


class Wrapped(nn.Module):
    """A stand-in replacement layer that keeps the wrapped Linear (what a method's factory would return)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_suffix_matches_whole_components_only():
    assert matches_suffix("blocks.3.attn.qkv", "attn.qkv")
    assert matches_suffix("blocks.3.attn.qkv", "qkv")
    assert matches_suffix("final_layer.linear", "final_layer.linear")
    assert not matches_suffix("blocks.3.attn.qkv", "kv")
    assert not matches_suffix("blocks.3.mlp.fc1", "c1")
    assert not matches_suffix("blocks.3.attn.qkv", "attn")


def test_find_linears_by_suffix(dit):
    assert list(find_linears(dit, ["attn.qkv"])) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert list(find_linears(dit, ["fc1"])) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    # A suffix shared by the blocks and the final layer matches both.
    assert list(find_linears(dit, ["adaLN_modulation.1"])) == [
        "blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"]
    assert list(find_linears(dit, ["final_layer.linear"])) == ["final_layer.linear"]


def test_unmatched_target_names_it_and_lists_candidates(dit):
    with pytest.raises(MethodError) as err:
        find_linears(dit, ["attn.qkv", "attn.qvk"])
    message = str(err.value)
    assert "'attn.qvk'" in message and "did you mean 'attn.qkv'" in message
    assert "mlp.fc2" in message and "final_layer.linear" in message  # candidates, each block kind listed once
    assert "blocks.1.attn.qkv" not in message
    assert "\n" not in message


def test_partial_component_target_is_unmatched(dit):
    with pytest.raises(MethodError, match="'c1' matches no nn.Linear"):
        find_linears(dit, ["c1"])


@pytest.mark.parametrize("bad", ["", ".qkv", "attn.", None])
def test_malformed_targets_are_errors(dit, bad):
    with pytest.raises(MethodError, match="dotted module-name suffix"):
        find_linears(dit, [bad])


def test_replace_linears_reports_and_replaces(dit):
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        for p in dit.parameters():  # DiT's zero-initialised gates would hide a broken replacement
            p.add_(0.05 * torch.randn_like(p))
    before = dit.eval()(x, t, y)
    report = replace_linears(dit, ["attn.qkv", "mlp.fc2"], lambda name, linear: Wrapped(linear))
    assert report.replaced == ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    assert report.by_target == {"attn.qkv": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"],
                                "mlp.fc2": ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]}
    assert isinstance(dit.blocks[1].attn.qkv, Wrapped)
    torch.testing.assert_close(dit(x, t, y), before, rtol=0, atol=0)


def test_unmatched_target_leaves_model_untouched(dit):
    with pytest.raises(MethodError, match="'nope'"):
        replace_linears(dit, ["attn.qkv", "nope"], lambda name, linear: Wrapped(linear))
    assert type(dit.blocks[0].attn.qkv) is nn.Linear


def test_factory_must_return_a_module(dit):
    with pytest.raises(MethodError, match="not an nn.Module"):
        replace_linears(dit, ["attn.qkv"], lambda name, linear: "oops")


def test_freeze_all(dit):
    freeze_all(dit)
    assert not any(p.requires_grad for p in dit.parameters())


def test_reinit_follows_dit_init(dit):
    with torch.no_grad():
        for p in dit.parameters():
            p.fill_(1.0)
    reinit_modules(dit, ["y_embedder", "final_layer"])
    table = dit.y_embedder.embedding_table.weight
    assert table.shape == (11, 64)  # 10 classes + the null class
    assert 0.015 < table.std().item() < 0.025 and abs(table.mean().item()) < 0.01
    for p in dit.final_layer.parameters():
        assert torch.count_nonzero(p) == 0
    assert torch.all(dit.blocks[0].attn.qkv.weight == 1.0)  # nothing else touched


def test_reinit_names_are_validated():
    with pytest.raises(MethodError, match="cannot re-initialise 'blocks'"):
        check_reinit_names(["blocks"])
    with pytest.raises(MethodError, match="twice"):
        check_reinit_names(["y_embedder", "y_embedder"])


def test_resolve_modules_and_param_names(dit):
    assert set(resolve_modules(dit, ["final_layer"])) == {"final_layer"}
    assert module_param_names(dit, ["y_embedder"]) == {"y_embedder.embedding_table.weight"}
    with pytest.raises(MethodError, match=r"module 'final' not found in DiT \(top-level modules: x_embedder"):
        resolve_modules(dit, ["final"])


def test_lora_unmatched_target_is_our_error_before_any_weights_load():
    # No ancestry is passed: the target check must fail first, in our words, not peft's.
    method = get_method("lora", {"targets": ("attn.qkv", "attn.qkvz")})
    with pytest.raises(MethodError, match="'attn.qkvz' matches no nn.Linear"):
        method.build(ArchSpec(input_size=8), Task("t", 5), None)


def test_lora_target_only_inside_fully_trained_module_is_an_error():
    method = get_method("lora", {"targets": ("final_layer.linear",)})
    with pytest.raises(MethodError, match="only matches Linears inside modules trained in full"):
        method.build(ArchSpec(input_size=8), Task("t", 5), None)
