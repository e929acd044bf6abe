"""KIND (kind/): decomposition exactness, diversion by the class gate, merges, recombination and component files.

All on CPU with the tiny DiT-T/2 (2 blocks, width 64) at 8x8 inputs, with the ``full`` rank preset (N_G = N_T = 32,
full rank 64) unless a test says otherwise: exactness against the dense DiT needs full rank. The ``paper`` preset
(the default) has its own tests.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.models.dit import DiT  # noqa: E402
from kind.gate import GateContext, GateEmbedding, TailorGroups, build_gate_table, random_subset  # noqa: E402
from kind.layers import (  # noqa: E402
    LEARNGENE,
    TAILOR,
    KindLinear,
    decomposed_targets,
    gate_table,
    install_gate,
    kind_layers,
    set_tailor_compute,
)
from kind.recombine import ancestry_from_components, extract, infer_layout, select_tailors  # noqa: E402
from methods import ArchSpec, MethodError, Task, get_method  # noqa: E402
from methods.decomposed import SplitDecomposedLinear  # noqa: E402
from methods.transfer import load_export, save_export  # noqa: E402

TINY = ArchSpec(name="DiT-T/2", input_size=8, in_channels=4)
CLASSES = 10
NULL = CLASSES  # DiT's null-class id


def full_rank(name: str = "kind", options: dict | None = None):
    """A KIND-family method with the ``full`` rank preset unless ``options`` names one."""
    return get_method(name, {"ranks": "full", **(options or {})})


def perturb(model: nn.Module, seed: int = 5, scale: float = 0.1) -> nn.Module:
    """Random values everywhere DiT starts at zero (adaLN, final layer), so gradients and outputs are non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def ancestry_model(options: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb(full_rank("kind", options).build_ancestry(TINY, CLASSES))


def inputs(n: int = 4, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    return x, t


@pytest.fixture(scope="module")
def ancestry(tmp_path_factory):
    """A trained-looking KIND ancestry written and read back as the trainer's export would be."""
    model = ancestry_model()
    path = tmp_path_factory.mktemp("kind") / "export.safetensors"
    save_export(path, model.state_dict(), method="kind", arch=TINY, num_classes=CLASSES,
                  meta={"method_options": full_rank("kind").config.to_dict()})
    return load_export(path)


# --------------------------------------------------------------------------------------------------------------
#                                            The class gate table
# --------------------------------------------------------------------------------------------------------------


def test_random_gate_has_k_active_per_class_null_off_and_is_reproducible():
    table = build_gate_table("random", CLASSES, 32, seed=3)
    assert table.shape == (CLASSES + 1, 32)
    assert torch.all(table[:CLASSES].sum(dim=1) == 16)  # K_act = N_T / 2
    assert table[NULL].sum() == 0  # null class: learngenes only
    assert torch.equal(table, build_gate_table("random", CLASSES, 32, seed=3))
    assert not torch.equal(table, build_gate_table("random", CLASSES, 32, seed=4))
    assert len({tuple(row.tolist()) for row in table[:CLASSES]}) == CLASSES  # classes differ
    # The mask of class c depends on (seed, c) only, not on the number of classes.
    torch.testing.assert_close(build_gate_table("random", 25, 32, seed=3)[:CLASSES], table[:CLASSES])
    assert torch.equal(table[2].nonzero().flatten(), random_subset(32, 16, 3, 2))


def test_disjoint_gate_gives_each_group_its_own_block():
    table = build_gate_table("disjoint", 4, 10)
    assert torch.all(table[:4].sum(dim=0) == 1)  # every tailor belongs to exactly one class
    assert torch.all(table[:4].sum(dim=1) >= 2)
    grouped = build_gate_table("disjoint", 4, 10, class_groups=(0, 1, 0, 1))
    assert torch.equal(grouped[0], grouped[2]) and torch.equal(grouped[1], grouped[3])
    assert grouped[0] @ grouped[1] == 0


def test_superclass_groups_share_random_masks_and_null_options():
    table = build_gate_table("random", 4, 16, class_groups=(0, 0, 1, 1), null="random")
    assert torch.equal(table[0], table[1]) and not torch.equal(table[1], table[2])
    assert table[4].sum() == 8 and not any(torch.equal(table[4], table[c]) for c in range(4))
    assert torch.all(build_gate_table("random", 4, 16, null="all")[4] == 1)
    assert build_gate_table("random", 4, 16, null_row=False).shape == (4, 16)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"policy": "disjoint", "num_classes": 20, "n_tailors": 8}, "at least one tailor per gate group"),
    ({"policy": "random", "num_classes": 3, "n_tailors": 8, "class_groups": (0, 1)}, "lists 2 classes"),
    ({"policy": "random", "num_classes": 3, "n_tailors": 8, "active": 9}, r"gate_active must be in \[1, 8\]"),
    ({"policy": "soft", "num_classes": 3, "n_tailors": 8}, "gate policy must be one of"),
])
def test_bad_gate_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_gate_table(**kwargs)


# --------------------------------------------------------------------------------------------------------------
#                                  Decomposition: exact at init, DiT's names
# --------------------------------------------------------------------------------------------------------------


def test_at_init_every_decomposed_layer_equals_the_dense_layer_it_came_from():
    torch.manual_seed(11)
    stock = TINY.build(CLASSES)
    torch.manual_seed(11)
    model = full_rank("kind").build_ancestry(TINY, CLASSES)  # same seed: the same DiT weights before surgery
    replaced = decomposed_targets(model)
    assert sorted(replaced) == sorted(f"blocks.{b}.{p}" for b in range(2)
                                      for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    for name, layer in replaced.items():
        dense = stock.get_submodule(name)
        hidden = torch.randn(3, 5, dense.in_features)
        for part in kind_layers(layer).values() if isinstance(layer, SplitDecomposedLinear) else [layer]:
            part.kind_gate_context = None  # evaluate the layer alone with every tailor on
        assert (layer(hidden) - dense(hidden)).abs().max() <= 1e-5, name
        assert (layer.to_linear().weight - dense.weight).abs().max() <= 1e-5, name


def test_ungated_decomposed_dit_equals_the_dense_dit_end_to_end():
    """gate = none (every tailor on), full rank: the whole KIND DiT computes what the stock DiT computes."""
    torch.manual_seed(11)
    stock = perturb(TINY.build(CLASSES))
    torch.manual_seed(11)
    model = full_rank("kind", {"gate": "none"}).build_ancestry(TINY, CLASSES)
    dense_state = {k: v for k, v in stock.state_dict().items() if k in model.state_dict()}
    model.load_state_dict(dense_state, strict=False)  # the same perturbed adaLN/final layer/embedders
    for name, layer in decomposed_targets(model).items():  # and the same perturbed decomposed weights
        linear = stock.get_submodule(name)
        parts = layer.parts() if isinstance(layer, SplitDecomposedLinear) else [layer]
        rows = linear.out_features // len(parts)
        for index, part in enumerate(parts):
            part.load_svd(linear.weight[index * rows:(index + 1) * rows], None if len(parts) > 1 else linear.bias)
    x, t = inputs()
    y = torch.tensor([0, 3, 9, NULL])
    with torch.no_grad():
        assert (model.eval()(x, t, y) - stock.eval()(x, t, y)).abs().max() <= 1e-5


def test_module_paths_and_names_stay_dit_s():
    model = full_rank("kind").build_ancestry(TINY, CLASSES)
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.q.kind_learngene_U", "blocks.1.attn.qkv.v.kind_tailor_sigma",
            "blocks.1.mlp.fc2.kind_tailor_V", "blocks.0.attn.proj.bias", "y_embedder.embedding_table.weight",
            "blocks.0.adaLN_modulation.1.weight"} <= names
    assert "y_embedder.embedding_table.kind_gate" in model.state_dict()
    fused = full_rank("kind", {"split_qkv": False, "decompose_adaln": True}).build_ancestry(TINY, CLASSES)
    names = {n for n, _ in fused.named_parameters()}
    assert "blocks.0.attn.qkv.kind_learngene_U" in names and "blocks.0.adaLN_modulation.1.kind_tailor_U" in names
    assert "final_layer.adaLN_modulation.1.weight" in names  # only block matrices are decomposed
    assert fused.blocks[0].attn.qkv.kind_learngene_U.shape == (192, 32)


def test_ranks_must_fit_the_matrices():
    with pytest.raises(MethodError, match="exceeds the rank of blocks.0.attn.qkv"):
        full_rank("kind", {"n_learngenes": 40, "n_tailors": 40}).build_ancestry(TINY, CLASSES)
    with pytest.raises(MethodError, match="matches no Linear inside the DiT blocks"):
        full_rank("kind", {"targets": ("final_layer.linear",)}).build_ancestry(TINY, CLASSES)
    with pytest.raises(MethodError, match="matches no nn.Linear"):
        full_rank("kind", {"targets": ("attn.qvk",)}).build_ancestry(TINY, CLASSES)


# --------------------------------------------------------------------------------------------------------------
#                                      Diversion: the gate in forward and backward
# --------------------------------------------------------------------------------------------------------------


def tailor_columns_with_gradient(layer: KindLinear) -> torch.Tensor:
    """Which tailor components got a non-zero gradient (in U, sigma or V)."""
    grads = [layer.kind_tailor_U.grad.abs().sum(0), layer.kind_tailor_sigma.grad.abs(),
             layer.kind_tailor_V.grad.abs().sum(0)]
    return torch.stack(grads).sum(0) > 0


@pytest.mark.parametrize("compute", ["masked", "grouped", "auto"])
@pytest.mark.parametrize("label", [3, NULL])
def test_a_single_class_batch_trains_only_that_class_s_tailors(label, compute):
    model = ancestry_model({"tailor_compute": compute})
    gate = gate_table(model)[label]
    x, t = inputs()
    model.train()
    out = model(x, t, torch.full((4,), label), force_drop_ids=torch.zeros(4, dtype=torch.long))
    out.square().mean().backward()
    for name, layer in kind_layers(model).items():
        touched = tailor_columns_with_gradient(layer)
        assert torch.all(layer.kind_tailor_U.grad[:, gate == 0] == 0), name  # exactly zero, not just small
        assert torch.all(layer.kind_tailor_V.grad[:, gate == 0] == 0), name
        assert torch.all(layer.kind_tailor_sigma.grad[gate == 0] == 0), name
        assert torch.equal(touched, gate.bool()), name  # and every gated-on tailor does learn
        assert layer.kind_learngene_U.grad.abs().sum() > 0 and layer.kind_learngene_sigma.grad.abs().sum() > 0, name


def test_a_mixed_batch_gives_each_sample_its_own_gate():
    model = ancestry_model().eval()
    x, t = inputs(4)
    y = torch.tensor([1, 6, 1, NULL])
    together = model(x, t, y)
    for i in range(4):
        alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-5)
        # Independently of the gated forward: the DiT merged with exactly this sample's gate.
        merged = full_rank("kind").merge(copy.deepcopy(model), gate=int(y[i]))
        torch.testing.assert_close(together[i:i + 1], merged(x[i:i + 1], t[i:i + 1], y[i:i + 1]), rtol=0, atol=1e-5)
    assert (together[0] - model(x[:1], t[:1], torch.tensor([6]))[0]).abs().max() > 1e-3  # the gate matters


def test_mixed_batch_gradients_equal_the_sum_of_per_sample_gradients():
    model = ancestry_model().eval()
    x, t = inputs(3)
    y = torch.tensor([2, 5, NULL])
    model(x, t, y).square().sum().backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for i in range(3):
        model(x[i:i + 1], t[i:i + 1], y[i:i + 1]).square().sum().backward()
    for name, param in model.named_parameters():
        if name in batched:
            # Summation order differs (one batch vs three), so the tolerance follows each gradient's scale.
            scale = batched[name].abs().max().item()
            torch.testing.assert_close(param.grad, batched[name], rtol=1e-3, atol=1e-4 * scale + 1e-8)


def test_the_gate_follows_the_effective_label_after_dropout_and_force_drop():
    model = ancestry_model()
    x, t = inputs(4)
    y = torch.tensor([1, 2, 3, 4])
    embedding = model.y_embedder.embedding_table
    with torch.no_grad():
        forced = model.eval()(x, t, y, force_drop_ids=torch.tensor([0, 1, 0, 1]))
        as_null = model(x, t, torch.tensor([1, NULL, 3, NULL]))
        torch.testing.assert_close(forced, as_null, rtol=0, atol=0)
        # Training-mode random label dropout: every recorded gate is the gate of the label actually embedded.
        model.y_embedder.dropout_prob = 0.5
        torch.manual_seed(0)
        model.train()(x, t, y)
    recorded = embedding.context._masks[x.device][:, 32:]
    dropped = 0
    for i in range(4):
        is_null = torch.equal(recorded[i], embedding.kind_gate[NULL])
        assert is_null or torch.equal(recorded[i], embedding.kind_gate[y[i]])
        dropped += is_null
    torch.manual_seed(0)
    expected = int((torch.rand(4) < 0.5).sum())  # the draws token_drop made
    assert dropped == expected


def test_cfg_sampling_uses_the_class_gate_for_cond_and_the_null_gate_for_uncond():
    model = ancestry_model().eval()
    method = full_rank("kind")
    x, t = inputs(2)
    y = torch.tensor([4, 7])
    with torch.no_grad():
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full((2,), NULL)]),
                                        cfg_scale=1.5)
        uncond = method.merge(copy.deepcopy(model), gate="null")(x, t, torch.full((2,), NULL))
        for i in range(2):
            cond = method.merge(copy.deepcopy(model), gate=int(y[i]))(x[i:i + 1], t[i:i + 1], y[i:i + 1])
            expected = uncond[i:i + 1, :4] + 1.5 * (cond[:, :4] - uncond[i:i + 1, :4])
            torch.testing.assert_close(guided[i:i + 1, :4], expected, rtol=0, atol=1e-5)


def test_layers_outside_a_dit_forward_fail_loudly():
    model = ancestry_model()
    layer = model.blocks[0].mlp.fc1
    with pytest.raises(RuntimeError, match="no class gate was recorded"):
        layer(torch.randn(2, 3, 64))
    model.eval()(*inputs(4), torch.arange(4))
    with pytest.raises(RuntimeError, match="outside its DiT's forward"):
        layer(torch.randn(2, 3, 64))


def test_wrappers_and_deep_copies_carry_the_gate():
    model = ancestry_model().eval()
    clone = copy.deepcopy(model)
    context = clone.y_embedder.embedding_table.context
    assert context is not model.y_embedder.embedding_table.context
    assert all(layer.kind_gate_context is context for layer in kind_layers(clone).values())

    class Wrapper(nn.Module):  # what DDP/DeepSpeed engines do: hold the model, call its forward
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    x, t = inputs(4)
    y = torch.tensor([0, 5, 9, NULL])
    with torch.no_grad():
        torch.testing.assert_close(Wrapper(clone)(x, t, y), model(x, t, y), rtol=0, atol=0)
        out = torch.func.functional_call(model, dict(model.state_dict()), (x, t, y))
    torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("compute", ["masked", "grouped"])
def test_ddp_wrapped_model_keeps_diversion(tmp_path, compute):
    """torch DDP (gloo, world size 1): the surgery lives inside the module, so the wrapper changes nothing."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = ancestry_model({"tailor_compute": compute})
        ddp = nn.parallel.DistributedDataParallel(model)
        x, t = inputs(4)
        ddp(x, t, torch.full((4,), 6), force_drop_ids=torch.zeros(4, dtype=torch.long)).square().mean().backward()
        gate = gate_table(model)[6]
        for layer in kind_layers(model).values():
            assert torch.equal(tailor_columns_with_gradient(layer), gate.bool())
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
#                                   Tailor compute: grouped (active tailors only) vs masked
# --------------------------------------------------------------------------------------------------------------


def gated_pair(options: dict | None = None) -> tuple[nn.Module, nn.Module]:
    """The same perturbed ancestry twice: one computing tailors masked, one grouped."""
    masked = ancestry_model({**(options or {}), "tailor_compute": "masked"})
    grouped = copy.deepcopy(masked)
    set_tailor_compute(grouped, "grouped")
    return masked, grouped


@pytest.mark.parametrize("options", [{}, {"null_gate": "random"}, {"gate": "disjoint", "n_tailors": 20,
                                                                    "n_learngenes": 12}])
def test_grouped_tailors_match_masked_outputs_and_gradients(options):
    masked, grouped = gated_pair(options)
    x, t = inputs(7)
    # Repeated classes (one group of several samples), singletons, null labels, and a forced drop.
    y = torch.tensor([4, NULL, 4, 9, 1, NULL, 4])
    drop = torch.tensor([0, 0, 0, 0, 1, 0, 0])
    outs = []
    for model in (masked, grouped):
        model.eval()  # no random label dropout: force_drop_ids alone decides which labels are dropped
        out = model(x, t, y, force_drop_ids=drop)
        out.square().mean().backward()
        outs.append(out)
    # The grouped model really grouped: class 4's three samples share a group (no silent masked fallback).
    groups = grouped.y_embedder.embedding_table.context._groups[x.device]
    assert groups is not None and (0, 2, 6) in groups.samples
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    named = dict(grouped.named_parameters())
    for name, param in masked.named_parameters():
        other = named[name].grad
        assert (param.grad is None) == (other is None), name
        if param.grad is not None:
            scale = param.grad.abs().max().item()
            torch.testing.assert_close(other, param.grad, rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=name)


def test_grouped_tailors_keep_diversion_exact_in_a_mixed_batch():
    """Tailors no sample of the batch switches on get exactly zero gradient; the others all learn."""
    _, model = gated_pair()
    x, t = inputs(4)
    y = torch.tensor([2, 7, 2, NULL])
    model.train()(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.long)).square().mean().backward()
    table = gate_table(model)
    used = (table[2] + table[7]) > 0
    assert not used.all()  # the test needs tailors that nobody in the batch uses
    for name, layer in kind_layers(model).items():
        assert torch.all(layer.kind_tailor_U.grad[:, ~used] == 0), name
        assert torch.all(layer.kind_tailor_V.grad[:, ~used] == 0), name
        assert torch.all(layer.kind_tailor_sigma.grad[~used] == 0), name
        assert torch.equal(tailor_columns_with_gradient(layer), used), name


def test_grouped_tailors_give_zero_not_missing_gradients_to_an_all_null_batch():
    """As under the mask, unused tailors get a zero gradient (AdamW momentum and DDP see the same parameters)."""
    masked, grouped = gated_pair()
    x, t = inputs(2)
    for model in (masked, grouped):
        model(x, t, torch.full((2,), NULL)).square().mean().backward()
        for layer in kind_layers(model).values():
            assert layer.kind_tailor_U.grad is not None and torch.all(layer.kind_tailor_U.grad == 0)
            assert torch.all(layer.kind_tailor_sigma.grad == 0) and torch.all(layer.kind_tailor_V.grad == 0)


def test_grouped_tailors_under_bf16_autocast_stay_close_to_masked():
    masked, grouped = gated_pair()
    x, t = inputs(3)
    y = torch.tensor([3, NULL, 5])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_masked, out_grouped = masked.eval()(x, t, y), grouped.eval()(x, t, y)
    assert out_grouped.dtype == out_masked.dtype
    torch.testing.assert_close(out_grouped.float(), out_masked.float(), rtol=0.05, atol=0.05)


def test_tailor_groups_list_only_groups_with_active_tailors():
    rows = torch.tensor([[1., 0., 1.], [0., 0., 0.], [1., 0., 1.], [0., 1., 0.]])
    groups = TailorGroups.from_rows(rows)
    assert sorted(groups.samples) == [(0, 2), (3,)]  # sample 1 (no active tailor) needs its learngenes only
    by_samples = dict(zip(groups.samples, groups.tailor_index.split(groups.sizes)))
    assert by_samples[(0, 2)].tolist() == [0, 2] and by_samples[(3,)].tolist() == [1]
    assert TailorGroups.from_rows(torch.zeros(2, 3)).sizes == ()
    assert TailorGroups.from_rows(torch.tensor([[0.5, 1.0]])) is None  # a soft gate cannot skip tailors exactly
    assert TailorGroups.from_rows(torch.ones(2, 3, device="meta")) is None  # FLOP counting: masked


def test_tailor_compute_choice_and_its_errors():
    from kind.gate import GROUPED_MIN_SAMPLE_SIZE

    context = GateContext()
    # DiT-B/2 at 256 px (256 tokens of width 768) and the embedded DiT-T/2 at 16 px (64 tokens of width 64)
    large, small = torch.empty(2, 256, 768), torch.empty(64, 64, 64)
    elsewhere = torch.empty(2, 256, 768, device="meta")  # not a CPU (a GPU's tensors would be the same here)
    assert large[0].numel() >= GROUPED_MIN_SAMPLE_SIZE > small[0].numel()
    assert context.tailor_compute == "auto" and full_rank("kind").config.tailor_compute == "auto"
    # auto: grouped on CPUs for large samples only; masked for the embedded shapes and on other devices
    assert context.grouped(large) and not context.grouped(small) and not context.grouped(elsewhere)
    context.tailor_compute = "masked"
    assert not context.grouped(large)
    context.tailor_compute = "grouped"
    assert context.grouped(large) and context.grouped(small) and context.grouped(elsewhere)
    with pytest.raises(ValueError, match="tailor_compute must be one of"):
        context.tailor_compute = "fast"
    model = ancestry_model({"tailor_compute": "grouped"})
    assert model.y_embedder.embedding_table.context.tailor_compute == "grouped"
    install_gate(model, gate_table(model).clone())  # a re-installed gate keeps the choice
    assert model.y_embedder.embedding_table.context.tailor_compute == "grouped"
    with pytest.raises(MethodError, match="tailor_compute must be one of"):
        set_tailor_compute(model, "fast")
    with pytest.raises(MethodError, match="no class gate"):
        set_tailor_compute(full_rank("kind_nogate").build_ancestry(TINY, CLASSES), "grouped")


# --------------------------------------------------------------------------------------------------------------
#                                                  Merging
# --------------------------------------------------------------------------------------------------------------


def test_gated_ancestry_merges_exactly_for_every_class():
    model = ancestry_model().eval()
    method = full_rank("kind")
    x, t = inputs(2)
    for label in [*range(CLASSES), NULL]:
        y = torch.full((2,), label)
        merged = method.merge(copy.deepcopy(model), gate="null" if label == NULL else label).eval()
        assert type(merged) is DiT and not any(isinstance(m, (KindLinear, GateEmbedding)) for m in merged.modules())
        with torch.no_grad():
            assert (merged(x, t, y) - model(x, t, y)).abs().max() <= 1e-5, label


def test_merging_a_gated_model_needs_a_gate():
    model = ancestry_model()
    method = full_rank("kind")
    with pytest.raises(MethodError, match="exact for one gate only"):
        method.merge(copy.deepcopy(model))
    with pytest.raises(MethodError, match="merge gate must be a class id"):
        method.merge(copy.deepcopy(model), gate=CLASSES + 1)
    with pytest.raises(MethodError, match=r"shape \(32,\)"):
        method.merge(copy.deepcopy(model), gate=torch.ones(5))
    learngenes_only = method.merge(copy.deepcopy(model), gate="learngenes")
    null = method.merge(copy.deepcopy(model), gate="null")
    torch.testing.assert_close(learngenes_only.state_dict(), null.state_dict())  # null gate = learngenes only


def test_ancestry_accounting_counts_factorised_and_merged_macs(ancestry):
    method = full_rank("kind")
    model = ancestry_model()
    method.mark_trainable(model)  # as the trainer does, once, after build_ancestry
    acc = method.count(model)
    assert acc.params_inherited == 0 and acc.params_new == acc.params_total
    summary = method.summary(model)
    assert acc.gmacs_fwd_trained > summary["gmacs_fwd_merged"]  # full rank: r (m + n) > m n for every matrix
    # a gated ancestry samples unmerged (a merge is exact for one gate only), at its factorised cost
    assert acc.gmacs_fwd_sampled == pytest.approx(acc.gmacs_fwd_trained) == summary["gmacs_fwd_sampled"]
    learngene_params = sum(p.numel() for layer in kind_layers(model).values()
                           for p in layer.group_parameters(LEARNGENE).values())
    assert summary["learngene_params"] == learngene_params
    assert summary["tailor_params"] == learngene_params  # N_G = N_T
    assert summary["learngene_bytes"] == 4 * learngene_params
    assert summary["learngene_params"] + summary["tailor_params"] + summary["dense_params"] == acc.params_total
    assert summary["gmacs_fwd_factorised"] == pytest.approx(acc.gmacs_fwd_trained)


# --------------------------------------------------------------------------------------------------------------
#                                      Downstream: transfer, domain, descend
# --------------------------------------------------------------------------------------------------------------


def factors(model: nn.Module, group: str) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach() for n, layer in kind_layers(model).items()
            for k, v in layer.group_parameters(group).items()}


def test_transfer_freezes_learngenes_trains_all_tailors_without_a_gate(ancestry):
    method = full_rank("kind")
    model = method.build(TINY, Task("novel", 6, "transfer"), ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    assert gate_table(model) is None
    for key, value in factors(model, LEARNGENE).items():
        torch.testing.assert_close(value, ancestry.state[key], rtol=0, atol=0)
    for key, value in factors(model, TAILOR).items():
        torch.testing.assert_close(value, ancestry.state[key], rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("kind_tailor" in n) or n.startswith(("y_embedder.", "final_layer.")) for n in trainable)
    assert not any("kind_learngene" in n for n in trainable)
    assert {n for n in trainable if "kind_tailor" in n} == set(factors(model, TAILOR))
    gated = full_rank("kind", {"transfer_gate": "classes"}).build(TINY, Task("novel", 6, "transfer"), ancestry)
    assert gate_table(gated).shape == (7, 32) and gate_table(gated)[6].sum() == 0


def test_transfer_options_change_the_trainables(ancestry):
    method = full_rank("kind", {"train_learngene_sigma": True, "train_dense": True})
    model = method.build(TINY, Task("novel", 6, "transfer"), ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.mlp.fc1.kind_learngene_sigma" in trainable
    assert "blocks.0.mlp.fc1.kind_learngene_U" not in trainable
    assert "blocks.0.adaLN_modulation.1.weight" in trainable and "blocks.0.attn.qkv.bias" in trainable
    assert "pos_embed" not in trainable


def test_domain_shift_keeps_learngenes_and_draws_fresh_tailors(ancestry):
    torch.manual_seed(21)
    model = full_rank("kind").build(TINY, Task("celeba", 1, "domain"), ancestry)
    full_rank("kind").mark_trainable(model)  # as the trainer does, once, after build
    for key, value in factors(model, LEARNGENE).items():
        torch.testing.assert_close(value, ancestry.state[key], rtol=0, atol=0)
    # Fresh tailors are the SVD components N_G..N_G+N_T-1 of a freshly initialised DiT (same seed).
    torch.manual_seed(21)
    fresh = full_rank("kind").build_ancestry(TINY, 1)
    for key, value in factors(model, TAILOR).items():
        torch.testing.assert_close(value, factors(fresh, TAILOR)[key], rtol=0, atol=0)
        assert not torch.equal(value, ancestry.state[key])
    torch.testing.assert_close(model.blocks[0].adaLN_modulation[1].weight,
                               ancestry.state["blocks.0.adaLN_modulation.1.weight"])
    acc = full_rank("kind").count(model)
    tailor_params = sum(v.numel() for v in factors(model, TAILOR).values())
    assert acc.params_new == tailor_params + sum(p.numel() for p in model.y_embedder.parameters())


def test_whole_model_transfer_variant_inherits_the_tailors(ancestry):
    model = full_rank("kind_fulltransfer").build(TINY, Task("celeba", 1, "domain"), ancestry)
    for key, value in factors(model, TAILOR).items():
        torch.testing.assert_close(value, ancestry.state[key], rtol=0, atol=0)
    strict_method = full_rank("kind", {"domain_dense": "fresh", "train_dense": True})
    strict = strict_method.build(TINY, Task("celeba", 1, "domain"), ancestry)
    strict_method.mark_trainable(strict)  # as the trainer does, once, after build
    assert torch.all(strict.blocks[0].adaLN_modulation[1].weight == 0)  # DiT's adaLN-Zero init, not inherited
    assert strict.blocks[0].adaLN_modulation[1].weight.requires_grad


def test_gate_off_variant_pretrains_every_tailor_with_every_class():
    method = full_rank("kind_nogate")
    model = method.build_ancestry(TINY, CLASSES)
    assert gate_table(model) is None and method.config.gate == "none"
    perturb(model)(*inputs(4), torch.full((4,), 3)).square().mean().backward()
    for layer in kind_layers(model).values():
        assert torch.all(tailor_columns_with_gradient(layer))
    merged = method.merge(copy.deepcopy(model))  # no gate: exact for every class
    x, t = inputs(2)
    with torch.no_grad():
        for label in (0, NULL):
            y = torch.full((2,), label)
            assert (merged.eval()(x, t, y) - model.eval()(x, t, y)).abs().max() <= 1e-5


def test_descend_keeps_fewer_tailors_and_blocks(ancestry):
    method = full_rank("kind", {"descend_depth": 1, "descend_tailors": 8})
    model = method.build(TINY, Task("deploy", 6, "descend"), ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    assert len(model.blocks) == 1 and model.depth == 1
    layer = model.blocks[0].mlp.fc1
    assert (layer.n_learngenes, layer.n_tailors) == (32, 8)
    source = {f: ancestry.state[f"blocks.0.mlp.fc1.kind_tailor_{f}"] for f in ("U", "sigma", "V")}
    strength = source["sigma"].abs() * source["U"].norm(dim=0) * source["V"].norm(dim=0)
    keep = strength.topk(8).indices.sort().values
    torch.testing.assert_close(layer.kind_tailor_sigma, source["sigma"][keep], rtol=0, atol=0)
    torch.testing.assert_close(layer.kind_tailor_U, source["U"][:, keep], rtol=0, atol=0)
    full = full_rank("kind").build(TINY, Task("novel", 6, "transfer"), ancestry)
    full_rank("kind").mark_trainable(full)  # as the trainer does, once, after build
    assert method.count(model).gmacs_fwd_trained < method.count(full).gmacs_fwd_trained / 1.5
    x, t = inputs(2)
    with torch.no_grad():  # still a working, mergeable DiT
        merged = method.merge(copy.deepcopy(model)).eval()
        assert (merged(x, t, torch.tensor([0, 6])) - model.eval()(x, t, torch.tensor([0, 6]))).abs().max() <= 1e-5


def test_descend_selection_rules(ancestry):
    by_index = select_tailors(ancestry.state, 4, "index")
    assert all(torch.equal(v, torch.arange(4)) for v in by_index.values())
    by_class = select_tailors(ancestry.state, 0, "classes", classes=(1, 2))
    gate = ancestry.state["y_embedder.embedding_table.kind_gate"]
    expected = (gate[1] + gate[2]).clamp(max=1).nonzero().flatten()
    assert all(torch.equal(v, expected) for v in by_class.values())
    model = full_rank("kind", {"descend_select": "classes", "descend_classes": (1, 2), "descend_depth": 2,
                                "descend_blocks": "even"}).build(TINY, Task("deploy", 6, "descend"), ancestry)
    assert model.blocks[0].attn.proj.n_tailors == len(expected)


@pytest.mark.parametrize(("options", "arch", "message"), [
    ({"descend_depth": 3}, TINY, "cannot keep 3 of 2 blocks"),
    ({"descend_tailors": 33}, TINY, "cannot keep 33 tailors per matrix: the ancestry has N_T = 32"),
    ({"n_learngenes": 16}, TINY, "learngenes are transferred whole"),
    ({}, ArchSpec(name="DiT-M/2", input_size=8, in_channels=4), "only the depth .* can change"),
    ({"split_qkv": False}, TINY, "build with the same targets, decompose_adaln and split_qkv"),
    ({"descend_select": "classes", "descend_classes": (99,)}, TINY, r"descend_classes \[99\]"),
])
def test_descend_fails_clearly_where_shapes_cannot_fit(ancestry, options, arch, message):
    with pytest.raises(MethodError, match=message):
        full_rank("kind", options).build(arch, Task("deploy", 6, "descend"), ancestry)


def test_ancestry_checks(ancestry, tmp_path):
    method = full_rank("kind")
    with pytest.raises(MethodError, match="needs an ancestry"):
        method.build(TINY, Task("novel", 6, "transfer"), None)
    with pytest.raises(MethodError, match="same architecture"):
        method.build(ArchSpec(name="DiT-M/2", input_size=8), Task("novel", 6, "transfer"), ancestry)
    dense = TINY.build(CLASSES)
    save_export(tmp_path / "dense.safetensors", dense.state_dict(), method="kind", arch=TINY, num_classes=CLASSES)
    with pytest.raises(MethodError, match="not a KIND ancestry"):
        method.build(TINY, Task("novel", 6, "transfer"), load_export(tmp_path / "dense.safetensors"))
    with pytest.raises(MethodError, match="keep 'y_embedder' in kind's reinit"):
        full_rank("kind", {"reinit": ()}).build(TINY, Task("novel", 6, "transfer"), ancestry)
    same_labels = full_rank("kind", {"reinit": ()}).build(TINY, Task("same", CLASSES, "transfer"), ancestry)
    torch.testing.assert_close(same_labels.y_embedder.embedding_table.weight,
                               ancestry.state["y_embedder.embedding_table.weight"])


# --------------------------------------------------------------------------------------------------------------
#                                       Learngene and tailor files
# --------------------------------------------------------------------------------------------------------------


def test_component_files_round_trip_and_describe_themselves(ancestry, tmp_path):
    files = extract(ancestry, tmp_path)
    genes, tailors = load_export(files.learngenes), load_export(files.tailors)
    assert genes.meta["kind"]["part"] == "learngenes" and tailors.meta["kind"]["part"] == "tailors"
    layout = genes.meta["kind"]["layout"]
    assert (layout["n_learngenes"], layout["n_tailors"], layout["depth"]) == (32, 32, 2)
    assert layout["targets"] == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"] and layout["split"] == ["attn.qkv"]
    assert genes.meta["kind"]["source_options"]["gate"] == "random"
    assert not any("kind_tailor" in k for k in genes.state) and all("kind_learngene" not in k for k in tailors.state)
    assert "y_embedder.embedding_table.kind_gate" in tailors.state
    joined = ancestry_from_components(files.learngenes, files.tailors)
    assert set(joined.state) == set(ancestry.state)
    assert all(torch.equal(joined.state[k], ancestry.state[k]) for k in ancestry.state)
    # Models built from the files equal models built from the export.
    x, t = inputs(2)
    y = torch.tensor([0, 4])
    for stage in ("transfer", "descend"):
        torch.manual_seed(0)
        a = full_rank("kind").build(TINY, Task("t", 6, stage), joined).eval()
        torch.manual_seed(0)
        b = full_rank("kind").build(TINY, Task("t", 6, stage), ancestry).eval()
        with torch.no_grad():
            torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=0, atol=0)


def test_learngenes_alone_serve_the_domain_stage_only(ancestry, tmp_path):
    files = extract(ancestry, tmp_path)
    genes = ancestry_from_components(files.learngenes)
    assert infer_layout(genes.state).n_tailors is None
    model = full_rank("kind").build(TINY, Task("mri", 2, "domain"), load_export(files.learngenes))
    assert model.blocks[0].mlp.fc2.n_tailors == 32  # N_T recorded in the file's metadata
    for key, value in factors(model, LEARNGENE).items():
        torch.testing.assert_close(value, ancestry.state[key], rtol=0, atol=0)
    with pytest.raises(MethodError, match="needs the ancestry's tailors, but it holds learngenes only"):
        full_rank("kind").build(TINY, Task("novel", 6, "transfer"), genes)
    with pytest.raises(MethodError, match="a tailors file"):
        full_rank("kind").build(TINY, Task("novel", 6, "transfer"), load_export(files.tailors))


def test_component_files_refuse_mismatched_pairs_and_wrong_parts(ancestry, tmp_path):
    files = extract(ancestry, tmp_path / "a")
    other = ancestry_model(seed=3)
    other_files = extract(other, tmp_path / "b")
    with pytest.raises(MethodError, match="extracted from another model"):
        ancestry_from_components(files.learngenes, other_files.tailors)
    with pytest.raises(MethodError, match="is not a KIND learngenes file"):
        ancestry_from_components(files.tailors)
    with pytest.raises(FileNotFoundError, match="missing"):
        ancestry_from_components(tmp_path / "nowhere.safetensors")


def test_component_files_load_into_other_depth_and_rank_where_they_fit(ancestry, tmp_path):
    files = extract(ancestry, tmp_path)
    joined = ancestry_from_components(files.learngenes, files.tailors)
    shallow = full_rank("kind", {"descend_depth": 1, "descend_tailors": 4, "descend_select": "index"}).build(
        TINY, Task("deploy", 6, "descend"), joined)
    torch.testing.assert_close(shallow.blocks[0].attn.qkv.k.kind_tailor_U,
                               ancestry.state["blocks.0.attn.qkv.k.kind_tailor_U"][:, :4], rtol=0, atol=0)
    with pytest.raises(MethodError, match="KIND cannot add blocks|cannot keep 4 of 2 blocks"):
        full_rank("kind", {"descend_depth": 4}).build(TINY, Task("deploy", 6, "descend"), joined)
    with pytest.raises(MethodError, match="cannot change width|only the depth"):
        full_rank("kind").build(ArchSpec(name="DiT-M/2", input_size=8), Task("deploy", 6, "descend"), joined)


# --------------------------------------------------------------------------------------------------------------
#                                       Regulariser and configuration
# --------------------------------------------------------------------------------------------------------------


def test_orthogonality_regulariser_is_zero_at_init_and_trains_the_factors():
    method = full_rank("kind", {"ortho_reg": 0.5})
    torch.manual_seed(0)
    model = method.build_ancestry(TINY, CLASSES)
    assert method.extra_loss(model, {}).item() == pytest.approx(0.0, abs=1e-8)  # SVD factors are orthonormal
    perturb(model)
    loss = method.extra_loss(model, {})
    assert loss.item() > 0
    loss.backward()
    assert model.blocks[0].mlp.fc1.kind_tailor_U.grad.abs().sum() > 0
    assert full_rank("kind").extra_loss(model, {}).item() == 0.0  # default ortho_reg = 0


@pytest.mark.parametrize(("options", "message"), [
    ({"gate": "soft"}, "kind gate must be one of"),
    ({"null_gate": "zero"}, "kind null_gate must be one of"),
    ({"n_learngenes": 0}, "n_learngenes must be None or an int >= 1"),
    ({"targets": ()}, "at least one target"),
    ({"targets": ("adaLN_modulation.1",)}, "decompose_adaln"),
    ({"domain_dense": "fresh"}, "set train_dense = true"),
    ({"descend_select": "classes"}, "needs descend_classes"),
    ({"ortho_reg": -1.0}, "ortho_reg must be >= 0"),
    ({"reinit": ("blocks",)}, "cannot re-initialise 'blocks'"),
    ({"descend_blocks": "last"}, "descend_blocks must be one of"),
    ({"tailor_compute": "fast"}, "tailor_compute must be one of"),
])
def test_config_validation(options, message):
    with pytest.raises(MethodError, match=message):
        full_rank("kind", options)


def test_class_groups_must_match_the_classes():
    with pytest.raises(MethodError, match="class_groups lists 3 classes but the model has 10"):
        full_rank("kind", {"class_groups": (0, 1, 0)}).build_ancestry(TINY, CLASSES)
    with pytest.raises(MethodError, match="at least one tailor per gate group"):
        full_rank("kind", {"gate": "disjoint", "n_tailors": 8, "n_learngenes": 8}).build_ancestry(TINY, 20)


def test_a_second_gate_install_replaces_the_first():
    model = full_rank("kind").build_ancestry(TINY, CLASSES)
    install_gate(model, torch.ones(CLASSES + 1, 32))
    assert isinstance(model.y_embedder.embedding_table, GateEmbedding)
    assert torch.all(gate_table(model) == 1)
    assert type(model.y_embedder.embedding_table.weight) is nn.Parameter
    named = dict(model.named_parameters())
    assert model.y_embedder.embedding_table.weight is named["y_embedder.embedding_table.weight"]


# --------------------------------------------------------------------------------------------------------------
#                                         Through the real trainer
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_runs_kind_ancestry_then_transfer(run_train):
    first = run_train("--method.name=kind", "--method.stage=ancestry", "--schedule.steps=3", out="ancestry")
    assert first.returncode == 0, first.stderr
    export = first.run_dir / "export.safetensors"
    exported = load_export(export)
    assert exported.method == "kind" and "y_embedder.embedding_table.kind_gate" in exported.state
    layout = infer_layout(exported.state)
    assert (layout.n_learngenes, layout.n_tailors) == (17, 6)  # the paper preset at width 64
    second = run_train("--method.name=kind", "--method.stage=transfer", f"--run.ancestry={export}",
                       "--data.split=novel-a", "--schedule.steps=3", out="transfer")
    assert second.returncode == 0, second.stderr
    transferred = load_export(second.run_dir / "export.safetensors")
    for key, value in exported.state.items():  # learngenes frozen through training: bit-identical in the export
        if "kind_learngene" in key:
            assert torch.equal(transferred.state[key], value), key
    assert any(not torch.equal(transferred.state[k], exported.state[k]) for k in exported.state if "kind_tailor" in k)
    assert len(second.losses()) == 3


@pytest.mark.slow
def test_deepspeed_zero3_bf16_two_ranks_train_kind(run_train):
    """ZeRO-3 partitions every parameter; the gate table is a buffer and every KIND layer touches only its own
    parameters inside its own forward, so pre-training and transfer run unchanged on two ranks."""
    common = ["--method.name=kind", "--engine.backend=deepspeed", "--engine.zero_stage=3", "--engine.precision=bf16",
              "--schedule.steps=2"]
    first = run_train(*common, "--method.stage=ancestry", nproc=2, out="ancestry")
    assert first.returncode == 0, first.stderr
    export = load_export(first.run_dir / "export.safetensors")
    assert torch.equal(export.state["y_embedder.embedding_table.kind_gate"][:, :].sum(dim=1)[:-1],
                       torch.full((export.num_classes,), 3.0))  # K_act = N_T / 2 of the paper preset (N_T = 6)
    second = run_train(*common, "--method.stage=transfer", f"--run.ancestry={first.run_dir / 'export.safetensors'}",
                       "--data.split=novel-a", nproc=2, out="transfer")
    assert second.returncode == 0, second.stderr
    assert all(torch.isfinite(torch.tensor(v)) for v in second.losses())


# --------------------------------------------------------------------------------------------------------------
#                              The paper's rank preset and the two once-silent rules
# --------------------------------------------------------------------------------------------------------------


def test_the_paper_preset_meets_the_papers_trainable_count_and_flops_saving_on_dit_l():
    """KIND (ICML 2025): 45.4M trainable parameters on DiT-L/2 and a saving of at least 35.4 GFLOPs (DiT's
    convention: forward GMACs of one image), here against the dense DiT-L/2 of the same task (80.7 GMACs)."""
    from bench.models.accounting import forward_gmacs, forward_gmacs_for_arch
    from kind.config import paper_ranks
    from methods.budget import build_for_count

    arch = ArchSpec(name="DiT-L/2", input_size=32, in_channels=4)
    method = get_method("kind")  # the default is the paper preset
    assert method.config.ranks == "paper" and paper_ranks(1024) == (272, 96)
    model = build_for_count(method, arch, 461)  # transfer stage on the meta device, marked trainable
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(trainable - 45.4e6) <= 0.01 * 45.4e6, trainable
    dense = forward_gmacs_for_arch("DiT-L/2", input_size=32, in_channels=4, num_classes=461)
    assert dense == pytest.approx(80.7, abs=0.05)
    assert dense - forward_gmacs(model) >= 35.4
    # the downstream model samples factorised, so the saving is what sampling costs too
    assert method.count(model).gmacs_fwd_sampled == pytest.approx(forward_gmacs(model))


def test_the_presets_scale_with_the_width_and_explicit_counts_win():
    from kind.config import paper_ranks

    assert paper_ranks(768) == (204, 72)
    assert kind_ranks_of(get_method("kind").build_ancestry(TINY, CLASSES)) == paper_ranks(64) == (17, 6)
    assert kind_ranks_of(full_rank().build_ancestry(TINY, CLASSES)) == (32, 32)
    assert kind_ranks_of(get_method("kind", {"n_tailors": 8}).build_ancestry(TINY, CLASSES)) == (17, 8)
    with pytest.raises(MethodError, match="ranks must be one of"):
        get_method("kind", {"ranks": "half"})


def kind_ranks_of(model: nn.Module) -> tuple[int, int]:
    from kind.layers import kind_ranks

    return kind_ranks(model)


def test_fresh_domain_tailors_without_a_known_count_are_an_error_naming_the_option(ancestry, tmp_path):
    files = extract(ancestry, tmp_path)
    genes = load_export(files.learngenes)
    genes.meta.pop("kind")  # a learngenes file that does not record the N_T it was trained with
    with pytest.raises(MethodError, match="set method.options.n_tailors"):
        full_rank("kind").build(TINY, Task("mri", 2, "domain"), genes)
    model = full_rank("kind", {"n_tailors": 5}).build(TINY, Task("mri", 2, "domain"), genes)
    assert model.blocks[0].mlp.fc2.n_tailors == 5  # and never N_G (32) by a silent fallback


def test_decomposed_adaln_factors_reach_every_modulation_chunk_and_start_at_zero():
    """adaLN-Zero: the SVD of a zero matrix has no directions; LAPACK's coordinate vectors would put every U column
    on the first of the six chunks (shift_msa). The rule: random orthonormal directions, sigma = 0."""
    torch.manual_seed(4)
    model = full_rank("kind", {"decompose_adaln": True, "gate": "none"}).build_ancestry(TINY, CLASSES)
    width = model.hidden_size
    for block in model.blocks:
        layer = block.adaLN_modulation[1]
        u, sigma, v = layer.factors()
        assert torch.all(sigma == 0) and torch.all(layer.merged_weight() == 0)  # the block starts as the identity
        for chunk in range(6):
            rows = u[chunk * width:(chunk + 1) * width]
            assert rows.norm() > 0.5, chunk  # every chunk gets a share of the directions (about sqrt(r/6))
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.T @ v, torch.eye(v.shape[1]), atol=1e-5, rtol=0)
    # sigma learns at once, in every chunk's direction
    x, t = inputs()
    perturb_final = model.final_layer
    with torch.no_grad():
        for param in perturb_final.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    model(x, t, torch.tensor([0, 1, 2, 3])).square().mean().backward()
    grad = model.blocks[0].adaLN_modulation[1].kind_learngene_sigma.grad
    assert grad is not None and (grad != 0).float().mean() > 0.9


def test_full_rank_weights_keep_their_exact_svd_and_draw_no_random_numbers():
    from methods.decomposed import spread_null_directions, svd_factors

    weight = torch.randn(12, 8, dtype=torch.float64)
    factors = svd_factors(weight, 8)
    state = torch.get_rng_state()
    spread = spread_null_directions(*factors)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(factors, spread):
        assert torch.equal(a, b)
    low_rank = weight[:, :3] @ torch.randn(3, 8, dtype=torch.float64)  # rank 3: five null components
    u, sigma, v = spread_null_directions(*svd_factors(low_rank, 8))
    torch.testing.assert_close((u * sigma) @ v.T, low_rank)
    torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.float64))
