"""Heur-LG, Auto-LG and Weight Selection beyond the contract table: descendants of another size than the ancestry.

The contract table builds every row from an ancestry of the row's own arch; here the ancestry is deeper (and for
Weight Selection wider) than the descendant. Expected tensors are written out independently: explicit index
lists for the selected channels, gradient norms from a plain ``backward()`` for Heur-LG's scores. Everything runs
on CPU on tiny DiT-T/2 variants (width 64, head size 16) at 8x8 inputs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from baselines.layer_probes import diffusion_for, linear_cka, make_probes, probe_loss  # noqa: E402
from baselines.learngene_layers import best_window, lowest  # noqa: E402
from bench.diffusion.process import GaussianDiffusion  # noqa: E402
from methods import ArchSpec, MethodError, Task, get_method  # noqa: E402
from methods.base import Export  # noqa: E402

ANCESTRY_CLASSES = 10
TASK_CLASSES = 6


def arch(name: str) -> ArchSpec:
    return ArchSpec(name=name, input_size=8, in_channels=4)


def random_ancestry(name: str, seed: int = 1234) -> Export:
    """A dense ancestry with random weights everywhere (DiT's zero-initialised gates included)."""
    torch.manual_seed(seed)
    model = arch(name).build(ANCESTRY_CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return Export("scratch", arch(name), ANCESTRY_CLASSES, {k: v.clone() for k, v in model.state_dict().items()})


def ancestor_model(ancestry: Export):
    model = ancestry.arch.build(ancestry.num_classes)
    model.load_state_dict(ancestry.state)
    return model


def under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def assert_module_equal(model, ancestry: Export, target: str, source: str):
    got, want = under(model.state_dict(), target + "."), under(ancestry.state, source + ".")
    assert got.keys() == want.keys() and got
    for key in got:
        assert torch.equal(got[key], want[key]), f"{target}.{key} differs from {source}.{key}"


def train_steps(method, model, steps: int = 3) -> list[float]:
    """A few AdamW steps of DiT's diffusion loss on random data; returns the losses."""
    groups = method.mark_trainable(model)
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-3, weight_decay=0.0)
    diffusion = GaussianDiffusion(learn_sigma=model.learn_sigma)
    generator = torch.Generator().manual_seed(3)
    model.train()
    losses = []
    for _ in range(steps):
        x0 = torch.randn(4, 4, 8, 8, generator=generator)
        t = diffusion.sample_timesteps(4, generator=generator)
        y = torch.randint(0, TASK_CLASSES, (4,), generator=generator)
        loss = diffusion.training_losses(model, x0, t, {"y": y})["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def deep():
    return random_ancestry("DiT-T/2-d6")


# --------------------------------------------------------------------------------------------------------------
#                                                   Heur-LG
# --------------------------------------------------------------------------------------------------------------


def test_heur_lg_descends_inherits_the_most_stable_block_on_top_and_trains(deep):
    method = get_method("heur_lg")
    before = dict(deep.state)
    model = method.build(arch("DiT-T/2-d3"), Task("t", TASK_CLASSES, stage="descend"), deep)
    assert len(model.blocks) == 3
    assert method.scores is not None and method.scores.shape == (6,)
    assert method.inherited == [int(torch.argmin(method.scores))]  # k = 3 // 3 = 1, the lowest score
    assert_module_equal(model, deep, "blocks.2", f"blocks.{method.inherited[0]}")
    for i in (0, 1):  # random blocks below, DiT's adaLN-Zero init
        assert not model.blocks[i].adaLN_modulation[-1].weight.any()
    for module in ("x_embedder", "t_embedder", "final_layer"):
        assert_module_equal(model, deep, module, module)
    assert model.y_embedder.embedding_table.num_embeddings == TASK_CLASSES + 1
    assert all(torch.equal(before[k], deep.state[k]) for k in before)  # the ancestry is not modified
    losses = train_steps(method, model)
    assert all(np.isfinite(losses))
    acc = method.count(model)
    random_blocks = sum(p.numel() for i in (0, 1) for p in model.blocks[i].parameters())
    assert acc.params_new == random_blocks + model.y_embedder.embedding_table.weight.numel()


def test_heur_lg_scores_are_normalised_gradient_norms(deep):
    ancestor = ancestor_model(deep)
    method = get_method("heur_lg", {"probe_batches": 2, "probe_batch_size": 3})
    chosen = method.choose_blocks(ancestor, 2)
    probes = make_probes(ancestor, 2, 3, 0, diffusion_for(ancestor))
    expected = torch.zeros(6, dtype=torch.float64)
    for probe in probes:  # independently: plain backward, per-block ||grad|| / ||weight||
        ancestor.zero_grad()
        probe_loss(ancestor, probe, diffusion_for(ancestor)).backward()
        for i, block in enumerate(ancestor.blocks):
            grad = torch.sqrt(sum(p.grad.double().square().sum() for p in block.parameters()))
            weight = torch.sqrt(sum(p.double().square().sum() for p in block.parameters()))
            expected[i] += grad / weight / 2
    torch.testing.assert_close(method.scores, expected, rtol=1e-6, atol=0)
    assert chosen == sorted(torch.argsort(expected)[:2].tolist())


def test_heur_lg_choice_follows_the_gradients(deep):
    """Blowing up the gradients of the chosen block (a hook on its parameters) moves the choice elsewhere."""
    ancestor = ancestor_model(deep)
    method = get_method("heur_lg")
    first = method.choose_blocks(ancestor, 1)[0]
    hooks = [p.register_hook(lambda g: g * 1e3) for p in ancestor.blocks[first].parameters()]
    second = method.choose_blocks(ancestor, 1)[0]
    for hook in hooks:
        hook.remove()
    assert second != first
    assert method.choose_blocks(ancestor, 1)[0] == first  # deterministic once the hooks are gone


def test_heur_lg_explicit_blocks_and_last_criterion(deep):
    task = Task("t", TASK_CLASSES, stage="descend")
    method = get_method("heur_lg", {"blocks": (1, 4), "placement": "bottom"})
    model = method.build(arch("DiT-T/2-d4"), task, deep)
    assert method.inherited == [1, 4] and method.scores is None
    assert_module_equal(model, deep, "blocks.0", "blocks.1")
    assert_module_equal(model, deep, "blocks.1", "blocks.4")
    method = get_method("heur_lg", {"criterion": "last", "inherit_blocks": 2})
    model = method.build(arch("DiT-T/2-d9"), task, deep)  # a deeper descendant grows random blocks below
    assert method.inherited == [4, 5]
    assert_module_equal(model, deep, "blocks.7", "blocks.4")
    assert_module_equal(model, deep, "blocks.8", "blocks.5")


@pytest.mark.parametrize(("name", "options", "target", "stage", "message"), [
    ("heur_lg", {}, "DiT-T/2-d3-w32", "descend", "width must stay 64"),
    ("heur_lg", {}, "DiT-T/2-d3", "transfer", "stage 'descend' builds another model size"),
    ("heur_lg", {"blocks": (0, 6)}, "DiT-T/2-d6", "descend", "from an ancestry of depth 6"),
    ("heur_lg", {"inherit_blocks": 4}, "DiT-T/2-d3", "descend", "cannot inherit 4 blocks"),
    ("auto_lg", {}, "DiT-T/2-d3", "domain", "does not support stage 'domain'"),
    ("weight_selection", {}, "DiT-T/2-d7", "descend", "initialises a smaller model"),
    ("weight_selection", {}, "DiT-T/4-d2", "descend", "patch size"),
])
def test_incompatible_requests_are_errors(deep, name, options, target, stage, message):
    with pytest.raises(MethodError, match=message):
        get_method(name, options).build(arch(target), Task("t", TASK_CLASSES, stage=stage), deep)


# --------------------------------------------------------------------------------------------------------------
#                                                   Auto-LG
# --------------------------------------------------------------------------------------------------------------


def test_linear_cka():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    assert linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, torch.randn(200, 16, generator=generator)) < 0.3


def test_window_and_lowest_selection():
    scores = torch.tensor([0.9, 0.2, 0.8, 0.7, 0.1], dtype=torch.float64)
    assert best_window(scores, 2) == [2, 3]
    assert best_window(scores, 1) == [0]
    assert lowest(scores, 2) == [1, 4]


def test_auto_lg_descends_with_the_most_similar_contiguous_blocks_and_trains(deep):
    method = get_method("auto_lg", {"inherit_blocks": 3, "finetune_steps": 5, "finetune_lr": 1e-2})
    model = method.build(arch("DiT-T/2-d4"), Task("t", TASK_CLASSES, stage="descend"), deep)
    scores = method.scores
    assert scores.shape == (6,) and (scores <= 1 + 1e-9).all() and (scores < 1 - 1e-6).any()  # fine-tuning moved
    start = method.inherited[0]
    assert method.inherited == [start, start + 1, start + 2] == best_window(scores, 3)
    for slot, block in zip((1, 2, 3), method.inherited):
        assert_module_equal(model, deep, f"blocks.{slot}", f"blocks.{block}")
    again = get_method("auto_lg", {"inherit_blocks": 3, "finetune_steps": 5, "finetune_lr": 1e-2})
    again.build(arch("DiT-T/2-d4"), Task("t", TASK_CLASSES, stage="descend"), deep)
    torch.testing.assert_close(again.scores, scores, rtol=0, atol=0)  # reproducible: own generators only
    assert all(np.isfinite(train_steps(method, model)))


# --------------------------------------------------------------------------------------------------------------
#                                              Weight Selection
# --------------------------------------------------------------------------------------------------------------


def test_weight_selection_takes_evenly_spaced_slices_and_trains():
    ancestry = random_ancestry("DiT-T/2")  # depth 2, width 64, 4 heads of 16
    method = get_method("weight_selection")
    model = method.build(arch("DiT-T/2-d1-w32"), Task("t", TASK_CLASSES, stage="descend"), ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    assert (len(model.blocks), model.hidden_size, model.num_heads) == (1, 32, 2)
    src = ancestry.state
    got = model.state_dict()
    r = list(range(0, 64, 2))  # residual channels
    heads = list(range(0, 16)) + list(range(32, 48))  # heads 0 and 2, all 16 channels each
    qkv = heads + [64 + i for i in heads] + [128 + i for i in heads]
    hidden = list(range(0, 256, 2))
    six = [c * 64 + i for c in range(6) for i in r]
    two = [c * 64 + i for c in range(2) for i in r]
    expected = {
        "blocks.0.attn.qkv.weight": src["blocks.0.attn.qkv.weight"][qkv][:, r],
        "blocks.0.attn.qkv.bias": src["blocks.0.attn.qkv.bias"][qkv],
        "blocks.0.attn.proj.weight": src["blocks.0.attn.proj.weight"][r][:, heads],
        "blocks.0.attn.proj.bias": src["blocks.0.attn.proj.bias"][r],
        "blocks.0.mlp.fc1.weight": src["blocks.0.mlp.fc1.weight"][hidden][:, r],
        "blocks.0.mlp.fc1.bias": src["blocks.0.mlp.fc1.bias"][hidden],
        "blocks.0.mlp.fc2.weight": src["blocks.0.mlp.fc2.weight"][r][:, hidden],
        "blocks.0.adaLN_modulation.1.weight": src["blocks.0.adaLN_modulation.1.weight"][six][:, r],
        "blocks.0.adaLN_modulation.1.bias": src["blocks.0.adaLN_modulation.1.bias"][six],
        "x_embedder.proj.weight": src["x_embedder.proj.weight"][r],
        "t_embedder.mlp.0.weight": src["t_embedder.mlp.0.weight"][r],
        "t_embedder.mlp.2.weight": src["t_embedder.mlp.2.weight"][r][:, r],
        "final_layer.adaLN_modulation.1.weight": src["final_layer.adaLN_modulation.1.weight"][two][:, r],
        "final_layer.linear.weight": src["final_layer.linear.weight"][:, r],
        "final_layer.linear.bias": src["final_layer.linear.bias"],
        "pos_embed": src["pos_embed"][..., r],
    }
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert not torch.equal(got["y_embedder.embedding_table.weight"], src["y_embedder.embedding_table.weight"][:7, r])
    assert method.count(model).params_new == model.y_embedder.embedding_table.weight.numel()
    assert all(np.isfinite(train_steps(method, model)))


def test_weight_selection_uneven_widths_and_spread_layers(deep):
    """64 -> 48 channels (3 of 4 heads) does not divide: round(linspace) indices; 6 -> 3 blocks spread evenly."""
    method = get_method("weight_selection", {"layer_selection": "even"})
    model = method.build(arch("DiT-T/2-d3-w48"), Task("t", TASK_CLASSES, stage="descend"), deep)
    r = np.round(np.linspace(0, 63, 48)).astype(int).tolist()
    hidden = np.round(np.linspace(0, 255, 192)).astype(int).tolist()
    heads = [c for h in (0, 2, 3) for c in range(16 * h, 16 * h + 16)]  # round(linspace(0, 3, 3)) = 0, 2, 3
    src, got = deep.state, model.state_dict()
    for slot, block in enumerate((0, 2, 4)):
        assert torch.equal(got[f"blocks.{slot}.mlp.fc2.weight"], src[f"blocks.{block}.mlp.fc2.weight"][r][:, hidden])
        proj = src[f"blocks.{block}.attn.proj.weight"]
        assert torch.equal(got[f"blocks.{slot}.attn.proj.weight"], proj[r][:, heads])
    assert all(np.isfinite(train_steps(method, model, steps=2)))


@pytest.mark.parametrize(("name", "options", "message"), [
    ("heur_lg", {"placement": "middle"}, "placement must be one of"),
    ("heur_lg", {"criterion": "cka"}, "criterion must be 'gradient' or 'last'"),
    ("heur_lg", {"blocks": (3, 1)}, "increasing, distinct"),
    ("heur_lg", {"blocks": (1, 3), "inherit_blocks": 3}, "lists 2 ids but inherit_blocks is 3"),
    ("heur_lg", {"targets": ("attn.qkv",)}, "'targets' does not apply"),
    ("auto_lg", {"finetune_steps": 0}, "finetune_steps must be a positive int"),
    ("auto_lg", {"probe_device": "tpu"}, "probe_device must be"),
    ("weight_selection", {"element_selection": "random"}, "element_selection must be one of"),
    ("weight_selection", {"reinit": ("blocks",)}, "cannot re-initialise 'blocks'"),
])
def test_config_validation(name, options, message):
    with pytest.raises(MethodError, match=message):
        get_method(name, options)
