"""PEFT baselines (peft wrappers, SVDiff, DiffFit, BitFit) and the KIND-matched budget, beyond the contract table.

Expected trainable counts are closed-form formulas evaluated on a stock DiT's own Linears (enumerated here, not
through the code under test); the LoKr factorisation is re-implemented independently. Everything runs on CPU on
the tiny ``DiT-T/2`` (width 64, depth 2) at 8x8 inputs.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.models.dit import DiT  # noqa: E402
from methods import ArchSpec, MethodError, Task, get_method  # noqa: E402
from methods.base import Export  # noqa: E402

TINY = ArchSpec(name="DiT-T/2", input_size=8, in_channels=4)
CLASSES = 6
BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ADALN = "adaLN_modulation.1"

# Every new registry name with cheap options.
METHODS = [
    ("dora", {"rank": 4}), ("pissa", {"rank": 4}), ("vera", {"rank": 8}), ("oft", {"block_size": 8}),
    ("boft", {"block_size": 4, "butterfly_factor": 2}), ("loha", {"rank": 4}), ("lokr", {"rank": 4}),
    ("svdiff", {}), ("difffit", {}), ("bitfit", {}),
]
METHOD_IDS = [name for name, _ in METHODS]


@pytest.fixture(scope="module")
def ancestry() -> Export:
    """A dense random ancestry with every weight non-trivial (DiT zero-initialises adaLN and the head)."""
    torch.manual_seed(1234)
    model = TINY.build(10)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return Export(method="scratch", arch=TINY, num_classes=10, state=model.state_dict())


def build(name: str, options: dict, ancestry: Export, seed: int = 0) -> tuple:
    method = get_method(name, options)
    torch.manual_seed(seed)
    model = method.build(TINY, Task("peft", CLASSES), ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    return method, model


def inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    return x, torch.tensor([10, 700][:batch]), torch.tensor([1, 4][:batch])


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stock_linears(targets: tuple[str, ...], skip: tuple[str, ...] = ("y_embedder", "final_layer")) -> list:
    """(out, in) of the stock DiT Linears matched by ``targets``, outside the fully trained modules."""
    stock = TINY.build(CLASSES)
    return [(m.out_features, m.in_features) for n, m in stock.named_modules() if isinstance(m, nn.Linear)
            and any(n == t or n.endswith("." + t) for t in targets) and not n.startswith(skip)]


def full_module_params(names=("y_embedder", "final_layer")) -> int:
    stock = TINY.build(CLASSES)
    return sum(p.numel() for n in names for p in stock.get_submodule(n).parameters())


def stock_biases(skip=("y_embedder", "final_layer")) -> int:
    stock = TINY.build(CLASSES)
    return sum(m.bias.numel() for n, m in stock.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None and not n.startswith(skip))


def lokr_factors(dim: int) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dim, m the largest divisor not above sqrt(dim) (LyCORIS' default factorisation)."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


# --------------------------------------------------------------------------------------------------------------
#                                   Trainable counts against closed forms
# --------------------------------------------------------------------------------------------------------------


def lokr_count(out: int, inp: int, r: int) -> int:
    (a, b), (c, d) = lokr_factors(out), lokr_factors(inp)
    w2 = b * d if r >= max(b, d) / 2 else r * (b + d)
    return a * c + w2


FORMULAS = {
    "lora": lambda out, inp, o: o["rank"] * (inp + out),
    "dora": lambda out, inp, o: o["rank"] * (inp + out) + out,
    "vera": lambda out, inp, o: o["rank"] + out,
    "loha": lambda out, inp, o: 2 * o["rank"] * (inp + out),
    "lokr": lambda out, inp, o: lokr_count(out, inp, o["rank"]),
    "oft": lambda out, inp, o: inp * (o["block_size"] - 1) // 2,
    # full b x b blocks per butterfly factor (as peft stores them) + one scale per output
    "boft": lambda out, inp, o: o["butterfly_factor"] * inp * o["block_size"] + out,
    "svdiff": lambda out, inp, o: min(out, inp),
}


@pytest.mark.parametrize("adaln", [False, True], ids=["blocks", "with-adaln"])
@pytest.mark.parametrize(("name", "options"), [
    ("lora", {"rank": 3}), ("dora", {"rank": 3}), ("vera", {"rank": 8}), ("loha", {"rank": 3}),
    ("lokr", {"rank": 2}), ("lokr", {"rank": 16}), ("oft", {"block_size": 8}),
    ("boft", {"block_size": 4, "butterfly_factor": 1}), ("boft", {"block_size": 4, "butterfly_factor": 3}),
    ("svdiff", {}),
])
def test_trainable_count_follows_the_formula(name, options, adaln, ancestry):
    targets = BLOCK_TARGETS + ((ADALN,) if adaln else ())
    method, model = build(name, {**options, "targets": targets}, ancestry)
    layers = stock_linears(targets)
    assert len(layers) == 2 * len(targets)  # two blocks; the final layer's adaLN is trained in full, not adapted
    expected = sum(FORMULAS[name](out, inp, options) for out, inp in layers) + full_module_params()
    assert trainable(model) == expected
    assert method.count(model).params_trainable == expected


@pytest.mark.parametrize(("gamma_shape", "gamma_blocks", "gammas"), [
    ("channel", "all", 2 * 2 * 64), ("scalar", "all", 2 * 2), ("channel", "first_half", 2 * 64),
    ("scalar", (1,), 2),
])
def test_difffit_count_is_biases_plus_scales(gamma_shape, gamma_blocks, gammas, ancestry):
    _, model = build("difffit", {"gamma_shape": gamma_shape, "gamma_blocks": gamma_blocks}, ancestry)
    assert trainable(model) == stock_biases() + gammas + full_module_params()


def test_bitfit_trains_exactly_the_biases_class_table_and_head(ancestry):
    _, model = build("bitfit", {}, ancestry)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.endswith(".bias") or n.startswith(("y_embedder.", "final_layer."))}
    assert names == expected
    assert not any(n.endswith(".weight") and n.startswith("blocks.") for n in names)
    assert trainable(model) == stock_biases() + full_module_params()


# --------------------------------------------------------------------------------------------------------------
#                                   Training leaves frozen tensors untouched
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), METHODS, ids=METHOD_IDS)
def test_frozen_tensors_are_bit_identical_after_adamw_steps(name, options, ancestry):
    method, model = build(name, options, ancestry)
    groups = method.mark_trainable(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    owned = {n for n, p in model.named_parameters() if p.requires_grad}
    # A careless trainer: every parameter in the optimizer, with weight decay; frozen tensors must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, t, y = inputs()
    target = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    model.train()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        (model(x, t, y) - target).square().mean().backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= owned, f"frozen tensors moved: {sorted(changed - owned)[:5]}"
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------------------
#                                     Merge: a plain DiT with the same outputs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), METHODS + [("dora", {"rank": 2, "targets": BLOCK_TARGETS + (ADALN,)}),
                                                        ("svdiff", {"targets": ("attn.qkv", ADALN)})],
                         ids=METHOD_IDS + ["dora-adaln", "svdiff-adaln"])
def test_merge_equals_unmerged_far_from_init(name, options, ancestry):
    method, model = build(name, options, ancestry)
    with torch.no_grad():  # move every trained tensor well away from its (often no-op) initial value
        generator = torch.Generator().manual_seed(11)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    x, t, y = inputs()
    with torch.no_grad():
        unmerged = model(x, t, y)
        merged = method.merge(copy.deepcopy(model)).eval()
        stock = TINY.build(CLASSES)
        stock.load_state_dict(merged.state_dict(), strict=True)  # DiT's own keys, nothing else
        stock.eval()
        assert type(merged) is DiT and not (merged(x, t, y) - unmerged).abs().max() > 1e-5
        torch.testing.assert_close(stock(x, t, y), unmerged, rtol=0, atol=1e-5)
    assert (unmerged - TINY.build(CLASSES).eval()(x, t, y)).abs().max() > 1e-3  # the adaptation is not a no-op


# --------------------------------------------------------------------------------------------------------------
#                                          Method-specific behaviour
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "dora", "pissa", "vera", "oft", "boft", "loha", "lokr", "svdiff"])
def test_unmatched_target_is_our_error_not_a_library_warning(name, ancestry):
    with pytest.raises(MethodError, match=r"target 'attn\.qvk' matches no nn.Linear.*did you mean 'attn\.qkv'"):
        build(name, {"targets": ("attn.qvk",)}, ancestry)


@pytest.mark.parametrize("name", ["difffit", "bitfit"])
def test_bias_methods_take_no_targets(name, ancestry):
    with pytest.raises(MethodError, match="'targets' does not apply"):
        build(name, {"targets": ("attn.qkv",)}, ancestry)


def test_oft_block_size_must_divide_every_layer(ancestry):
    # peft would silently move 24 to a divisor of 64; we refuse instead.
    with pytest.raises(MethodError, match=r"block_size = 24 does not divide in_features = 64 of blocks\.0\.attn\.qkv"):
        build("oft", {"block_size": 24}, ancestry)
    _, model = build("oft", {"block_size": 16}, ancestry)
    assert {tuple(p.shape) for n, p in model.named_parameters() if "oft_R" in n} == {(4, 120), (16, 120)}


def test_vera_projections_are_shared_frozen_and_saved_once(ancestry):
    method, model = build("vera", {"rank": 8}, ancestry)
    projections = [b for n, b in model.named_buffers(remove_duplicate=False) if "vera_A" in n]
    assert len(projections) == 8 and len({b.data_ptr() for b in projections}) == 1
    state = method.state_to_save(model)
    assert sorted(k for k in state if "vera_A" in k or "vera_B" in k) == \
        ["blocks.0.attn.qkv.vera_A.default", "blocks.0.attn.qkv.vera_B.default"]
    assert state["blocks.0.attn.qkv.vera_A.default"].shape == (8, 256)  # r x the widest input (fc2)


def test_pissa_starts_at_the_ancestry_and_saves_its_residual_base(ancestry):
    method, model = build("pissa", {"rank": 4}, ancestry)
    x, t, y = inputs()
    dense = TINY.build(CLASSES)
    dense.load_state_dict({**ancestry.state, **{k: v for k, v in model.state_dict().items()
                                                if k.startswith(("y_embedder", "final_layer"))}})
    with torch.no_grad():  # residual + principal components reproduce the ancestry weights at init
        torch.testing.assert_close(model.eval()(x, t, y), dense.eval()(x, t, y), rtol=0, atol=1e-5)
    state = method.state_to_save(model)
    residual = state["blocks.0.attn.qkv.base_layer.weight"]
    assert not torch.allclose(residual, ancestry.state["blocks.0.attn.qkv.weight"], atol=1e-3)


def test_dora_trains_a_magnitude_vector_per_output(ancestry):
    _, model = build("dora", {"rank": 2}, ancestry)
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 8 and all(p.requires_grad for p in magnitudes.values())
    assert magnitudes["blocks.0.mlp.fc1.lora_magnitude_vector.default.weight"].shape == (256,)


@pytest.mark.parametrize(("tokens", "path"), [(2, "factored"), (4096, "formed")])
def test_svdiff_takes_the_cheaper_exact_path(tokens, path):
    from baselines.svdiff import SpectralShiftLinear
    from methods.decomposed import low_rank_step_macs

    torch.manual_seed(0)
    layer = SpectralShiftLinear.from_linear(nn.Linear(24, 40, dtype=torch.float64))
    with torch.no_grad():
        layer.svdiff_delta.normal_(0, 0.5)  # some spectra clamp at zero through relu
    macs = {p: low_rank_step_macs(p, tokens, 40, 24, 24, grad_spectrum=True, grad_factors=False)
            for p in ("formed", "factored")}
    assert min(macs, key=macs.get) == path
    x = torch.randn(tokens, 24, dtype=torch.float64)
    out = layer(x)
    formed = nn.functional.linear(x, layer.weight(), layer.bias)
    torch.testing.assert_close(out, formed, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(out.square().sum(), layer.svdiff_delta)
    (expected,) = torch.autograd.grad(formed.square().sum(), layer.svdiff_delta)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("tokens", "rank", "path"), [(2, 8, "projections"), (512, 512, "formed")])
def test_vera_takes_the_cheaper_exact_path(tokens, rank, path, ancestry):
    from peft.tuners.vera.layer import Linear as PeftVeraLinear

    from methods.decomposed import low_rank_step_macs

    _, model = build("vera", {"rank": rank}, ancestry)
    layer = model.blocks[0].mlp.fc1.double()  # 64 -> 256
    assert type(layer).__name__ == "CheaperPathVeraLinear" and isinstance(layer, PeftVeraLinear)
    with torch.no_grad():  # b starts at zero: move d and b away from their initial values
        generator = torch.Generator().manual_seed(5)
        for param in (layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    macs = {p: low_rank_step_macs(p, tokens, 256, 64, rank, grad_spectrum=True, grad_factors=False)
            for p in ("formed", "factored")}
    assert (min(macs, key=macs.get) == "formed") == (path == "formed")
    x = torch.randn(tokens, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    calls = []
    original = torch.nn.functional.linear
    try:  # count the dense matmuls: the formed path runs one, peft's three (base, x A^T, then B^T)
        torch.nn.functional.linear = lambda *a, **k: calls.append(1) or original(*a, **k)
        out = layer(x)
    finally:
        torch.nn.functional.linear = original
    assert len(calls) == (1 if path == "formed" else 3)
    reference = PeftVeraLinear.forward(layer, x)  # peft's own projection path
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    params = [layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]]
    grads = torch.autograd.grad(out.square().sum(), params)
    expected = torch.autograd.grad(reference.square().sum(), params)
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-9)
    copied = copy.deepcopy(layer)  # the EMA copy and checkpoints keep the class
    assert type(copied) is type(layer) and set(copied.state_dict()) == set(layer.state_dict())


def test_svdiff_reproduces_the_ancestry_and_clamps_negative_spectra(ancestry):
    method, model = build("svdiff", {}, ancestry)
    layer = model.blocks[0].mlp.fc1
    torch.testing.assert_close(layer.weight(), ancestry.state["blocks.0.mlp.fc1.weight"], rtol=0, atol=1e-5)
    assert layer.bias is model.blocks[0].mlp.fc1.bias and "blocks.0.mlp.fc1.bias" in dict(model.named_parameters())
    with torch.no_grad():
        layer.svdiff_delta.copy_(-layer.svdiff_sigma - 1.0)  # relu(sigma + delta) = 0: only the bias is left
    h = torch.randn(3, 64)
    torch.testing.assert_close(layer(h), layer.bias.expand(3, -1), rtol=0, atol=0)
    assert method.merge(model).blocks[0].mlp.fc1.weight.abs().max() == 0


def test_difffit_starts_exactly_at_the_ancestry(ancestry):
    _, model = build("difffit", {}, ancestry)
    _, plain = build("bitfit", {}, ancestry)  # same class table seed: only the scales differ
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), plain.eval()(x, t, y))  # gamma = 1 multiplies exactly
    assert "blocks.1.attn.proj.weight" in dict(model.named_parameters())  # DiT's names kept around the scale


def test_difffit_rejects_blocks_outside_the_model(ancestry):
    with pytest.raises(MethodError, match=r"gamma_blocks \[5\] out of range for a DiT with 2 blocks"):
        build("difffit", {"gamma_blocks": (0, 5)}, ancestry)


@pytest.mark.parametrize(("name", "expected"), [
    ("svdiff", {"adapter": 10.0, "reinit": 1.0, "trained": 1.0}),
    ("difffit", {"adapter": 10.0, "tuned": 10.0, "reinit": 1.0, "trained": 1.0}),
    ("bitfit", {"tuned": 10.0, "reinit": 1.0, "trained": 1.0}),
    ("dora", {"adapter": 1.0, "reinit": 1.0, "trained": 1.0}),
])
def test_learning_rate_scales_per_group(name, expected, ancestry):
    method, model = build(name, {}, ancestry)
    assert {g["name"]: g["lr_scale"] for g in method.mark_trainable(model)} == expected


@pytest.mark.parametrize(("name", "options", "message"), [
    ("dora", {"rank": -2}, "dora rank must be a positive int"),
    ("pissa", {"init": True}, "pissa init must be 'pissa'"),
    ("vera", {"dropout": 1.5}, r"vera dropout must be in \[0, 1\)"),
    ("oft", {"block_size": 8, "blocks": 4}, "exactly one of block_size and blocks"),
    ("boft", {"block_size": 3, "butterfly_factor": 2}, "block_size must be even"),
    ("loha", {"alpha": 0}, "loha alpha must be positive"),
    ("lokr", {"decompose_factor": 0}, "decompose_factor must be -1 or a positive int"),
    ("svdiff", {"delta_lr_scale": 0}, "delta_lr_scale must be a positive number"),
    ("difffit", {"gamma_shape": "row"}, "gamma_shape must be one of"),
    ("difffit", {"gamma_blocks": "last"}, "gamma_blocks must be one of"),
    ("bitfit", {"reinit": ("y_embedder",), "train_modules": ("y_embedder",)}, "listed in both"),
])
def test_config_validation(name, options, message):
    with pytest.raises(MethodError, match=message):
        get_method(name, options)


# --------------------------------------------------------------------------------------------------------------
#                                       Budget: ranks matched to KIND's count
# --------------------------------------------------------------------------------------------------------------

from methods.budget import kind_trainable_count, matched_rank, trainable_count  # noqa: E402


@pytest.mark.parametrize(("name", "options", "target"), [
    ("lora", {}, 60_000), ("dora", {"targets": BLOCK_TARGETS + (ADALN,)}, 60_000), ("loha", {}, 50_001),
    ("oft", {}, 30_000), ("lokr", {"rank": 1}, 12_000), ("pissa", {}, 36_000),
    ("vera", {}, 30_000),  # a rank above the 64-wide layers' width: VeRA's d grows by one entry per layer per rank
])
def test_matched_rank_is_the_largest_within_budget(name, options, target, ancestry):
    method = get_method(name, options)
    rank = matched_rank(name, TINY, CLASSES, target, options)
    shapes = stock_linears(tuple(method.config.targets))
    candidates = method.rank_candidates(shapes)
    following = candidates[candidates.index(rank) + 1]
    with_rank = {**options, **method.budget_options(rank)}
    assert trainable_count(name, TINY, CLASSES, with_rank) <= target
    assert trainable_count(name, TINY, CLASSES, {**options, **method.budget_options(following)}) > target
    # The meta-device count is the count of the real model a run builds.
    _, real = build(name, with_rank, ancestry)
    assert trainable(real) == trainable_count(name, TINY, CLASSES, with_rank)


def test_lora_matched_rank_follows_the_closed_form():
    target = kind_trainable_count(TINY, CLASSES)
    per_rank = sum(inp + out for out, inp in stock_linears(BLOCK_TARGETS))
    expected = (target - full_module_params()) // per_rank
    assert matched_rank("lora", TINY, CLASSES, target) == expected


@pytest.mark.parametrize("options", [{}, {"decompose_adaln": True}], ids=["default", "adaln"])
def test_kind_count_is_the_trainable_count_of_a_real_kind_model(options):
    kind = get_method("kind", options)
    torch.manual_seed(0)
    source = kind.build_ancestry(TINY, CLASSES)
    ancestry = Export(method="kind", arch=TINY, num_classes=CLASSES, state=source.state_dict())
    model = kind.build(TINY, Task("kind", CLASSES), ancestry)
    kind.mark_trainable(model)  # as the trainer does, once, after build
    assert kind_trainable_count(TINY, CLASSES, options) == trainable(model) > 0
    if options:  # decomposing adaLN adds tailors: a larger budget than the default's
        assert trainable(model) > kind_trainable_count(TINY, CLASSES)


def test_budget_errors():
    with pytest.raises(MethodError, match="'svdiff' has no rank option"):
        matched_rank("svdiff", TINY, CLASSES, 50_000)
    with pytest.raises(MethodError, match="already trains .* more than the budget 100"):
        matched_rank("lora", TINY, CLASSES, 100)
    with pytest.raises(MethodError, match="vera cannot reach the budget"):
        matched_rank("vera", TINY, CLASSES, 10_000_000)
    largest = min(out * inp for out, inp in stock_linears(tuple(get_method("vera").config.targets)))
    assert matched_rank("vera", TINY, CLASSES, 10_000_000, strict=False) == largest  # out x in of the smallest
    with pytest.raises(MethodError, match="target_trainable must be a positive int"):
        matched_rank("lora", TINY, CLASSES, 0)
