"""The method contract, checked once for every registered method (docs/harness.md §9.11; peft's TEST_CASES matrix).

One table of rows ``(method name, options, arch)``; every test below runs on every row. Adding a method means
adding rows here (``test_every_registered_method_has_rows`` fails until then). Everything runs on CPU on the tiny
``DiT-T/2`` at 8x8 inputs; a method that needs an ancestry gets a random one, built by the first method in its
``ancestry_methods`` and passed through an ancestry file (``methods.transfer``), as a real run would.

The expected numbers are computed independently of the code under test: parameter counts by enumerating
``model.parameters()``, GMACs with a plain ``FlopCounterMode`` on a real one-image forward (math attention, so
the attention matmuls are visible as ``bmm``), not through ``bench.models.accounting``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.models.dit import DiT  # noqa: E402
from methods import ArchSpec, MethodError, Task, get_method, list_methods  # noqa: E402
from methods.base import STAGES  # noqa: E402
from methods.registry import plugin_methods  # noqa: E402
from methods.transfer import load_export, save_export  # noqa: E402

TINY = ArchSpec(name="DiT-T/2", input_size=8, in_channels=4)
ANCESTRY_CLASSES = 10
TASK_CLASSES = 6  # a new label space: a different number of classes from the ancestry's

# (method, options, arch). Options are what a config file's ``method.options`` would hold.
ROWS = [
    ("scratch", {}, TINY),
    ("full", {}, TINY),
    ("full", {"reinit": ("y_embedder", "final_layer")}, TINY),
    ("lora", {}, TINY),
    ("lora", {"rank": 2, "alpha": 4.0, "targets": ("attn.qkv", "adaLN_modulation.1")}, TINY),
    ("lora", {"rank": 3, "init": "pissa", "train_modules": ()}, TINY),
    ("dora", {"rank": 4}, TINY),
    ("dora", {"rank": 2, "targets": ("attn.proj", "adaLN_modulation.1")}, TINY),
    ("pissa", {"rank": 4}, TINY),
    ("vera", {"rank": 8}, TINY),
    ("oft", {"block_size": 8}, TINY),
    ("oft", {"block_size": 0, "blocks": 4, "coft": True, "targets": ("mlp.fc1", "adaLN_modulation.1")}, TINY),
    ("boft", {"block_size": 4, "butterfly_factor": 2}, TINY),
    ("loha", {"rank": 4}, TINY),
    ("lokr", {"rank": 4}, TINY),
    ("svdiff", {}, TINY),
    ("svdiff", {"targets": ("attn.qkv", "adaLN_modulation.1"), "reinit": ("y_embedder", "final_layer"),
                "train_modules": ()}, TINY),
    ("difffit", {}, TINY),
    ("difffit", {"gamma_blocks": "first_half", "gamma_shape": "scalar"}, TINY),
    ("bitfit", {}, TINY),
    ("kind", {}, TINY),
    ("kind", {"train_learngene_sigma": True, "train_dense": True, "train_modules": ()}, TINY),
    ("kind", {"reinit": ("y_embedder", "final_layer"), "descend_tailors": 0, "descend_select": "index"}, TINY),
    ("kind_nogate", {}, TINY),
    ("kind_fulltransfer", {"domain_dense": "fresh", "train_dense": True}, TINY),
    ("tleg", {}, TINY),
    ("tleg", {"coefficient": "l/(L-1)", "step_init": "zeros", "reinit": ("y_embedder", "final_layer")}, TINY),
    ("sws", {}, TINY),
    ("sws", {"stages": 1, "distill_weight": 0.5}, TINY),
    ("ligo", {}, TINY),
    ("ligo", {"depth_init": "repeat", "reinit": ("y_embedder", "final_layer")}, TINY),
    ("wave", {}, TINY),
    ("wave", {"train": "all", "reinit": ("y_embedder", "final_layer")}, TINY),
    ("heur_lg", {}, TINY),
    ("heur_lg", {"criterion": "last", "placement": "bottom", "reinit": ("y_embedder", "final_layer")}, TINY),
    ("auto_lg", {"finetune_steps": 2, "probe_batches": 2}, TINY),
    ("auto_lg", {"inherit_blocks": 2, "contiguous": False, "copy_outer": False, "finetune_steps": 1}, TINY),
    ("weight_selection", {}, TINY),
    ("weight_selection", {"element_selection": "leading", "reinit": ("y_embedder", "final_layer")}, TINY),
    ("fine", {}, TINY),
    ("fine", {"train": "all", "rank": 32, "class_table": "redraw", "reinit": ("final_layer",)}, TINY),
    ("fine", {"targets": ("attn.qkv", "adaLN_modulation.1"), "sigma_init": "interpolate"}, TINY),
    ("fine_nofactor", {}, TINY),
    ("fine_nofactor", {"rank": 16, "targets": ("mlp.fc1", "mlp.fc2")}, TINY),
]
ROW_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(ROWS)]


# --------------------------------------------------------------------------------------------------------------
#                                                  Helpers
# --------------------------------------------------------------------------------------------------------------


def downstream_stage(method) -> str:
    """The stage the contract builds in: ``transfer`` where supported, else another downstream stage."""
    if "transfer" in method.stages:
        return "transfer"
    return sorted(set(method.stages) - {"ancestry"})[0]


@pytest.fixture(scope="module")
def ancestry_files(tmp_path_factory):
    """Random ancestry files, one per (ancestry method, arch), written and read back through methods.transfer."""
    cache = {}

    def get(method_name: str, arch: ArchSpec):
        key = (method_name, arch)
        if key not in cache:
            torch.manual_seed(1234)
            model = get_method(method_name).build_ancestry(arch, ANCESTRY_CLASSES)
            with torch.no_grad():  # random weights everywhere DiT would start at zero, so nothing is trivially equal
                for param in model.parameters():
                    if param.requires_grad:
                        param.add_(0.1 * torch.randn_like(param))
            path = tmp_path_factory.mktemp("ancestry") / f"{method_name}.safetensors"
            save_export(path, model.state_dict(), method=method_name, arch=arch, num_classes=ANCESTRY_CLASSES,
                          meta={"test": "contract"})
            cache[key] = load_export(path)
        return cache[key]

    return get


def build_row(row, ancestry_files, seed: int = 0):
    name, options, arch = row
    method = get_method(name, options)
    ancestry = ancestry_files(method.ancestry_methods[0], arch) if method.ancestry_methods else None
    task = Task("contract", TASK_CLASSES, stage=downstream_stage(method))
    torch.manual_seed(seed)
    model = method.build(arch, task, ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    return method, model, task, ancestry


def inputs(arch: ArchSpec, batch: int = 2):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, arch.in_channels, arch.input_size, arch.input_size, generator=generator)
    t = torch.tensor([10, 500, 999, 0][:batch])
    y = torch.tensor([1, 3, 5, 0][:batch])
    return x, t, y


def one_step(method, model, arch):
    """One AdamW step on a squared-output loss over the method's own param groups; returns the groups."""
    groups = method.mark_trainable(model)
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2, weight_decay=0.0)
    model.train()
    x, t, y = inputs(arch)
    # A regression target, as in the diffusion loss: DiT's zero-initialised head gives zero output, and a loss
    # whose gradient vanishes at zero would leave every parameter in place.
    target = torch.randn(x.shape[0], model.out_channels, arch.input_size, arch.input_size)
    ((model(x, t, y) - target).square().mean() + method.extra_loss(model, {})).backward()
    optimizer.step()
    return groups


def measured_gmacs(model: nn.Module, arch: ArchSpec) -> float:
    """Forward GMACs of one real image, counted by a plain FlopCounterMode (2 FLOPs per MAC)."""
    model = copy.deepcopy(model).eval()
    x, t, y = inputs(arch, batch=1)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops() / 2 / 1e9


# --------------------------------------------------------------------------------------------------------------
#                                                   The table
# --------------------------------------------------------------------------------------------------------------


def test_every_registered_method_has_rows():
    missing = sorted(set(list_methods()) - set(plugin_methods()) - {name for name, _, _ in ROWS})  # ours, not plugins
    assert not missing, f"registered methods without contract-test rows: {missing}"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_build(row, ancestry_files):
    method, model, task, _ = build_row(row, ancestry_files)
    arch = row[2]
    x, t, y = inputs(arch)
    out = model.eval()(x, t, y)
    out_channels = arch.in_channels * (2 if arch.learn_sigma else 1)
    assert out.shape == (2, out_channels, arch.input_size, arch.input_size)
    assert model.y_embedder.embedding_table.num_embeddings == TASK_CLASSES + 1  # the task's label space + null
    if "ancestry" in method.stages:
        ancestor = method.build_ancestry(arch, ANCESTRY_CLASSES)
        assert torch.isfinite(ancestor.eval()(x, t, y)).all()
    else:
        with pytest.raises(MethodError, match="does not support stage 'ancestry'"):
            method.build_ancestry(arch, ANCESTRY_CLASSES)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_ancestry_required_or_refused(row, ancestry_files):
    name, options, arch = row
    method = get_method(name, options)
    task = Task("contract", TASK_CLASSES, stage=downstream_stage(method))
    if method.ancestry_methods:
        with pytest.raises(MethodError, match="needs an ancestry"):
            method.build(arch, task, None)
    else:
        with pytest.raises(MethodError, match="no ancestry"):
            method.build(arch, task, ancestry_files("scratch", arch))


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_unsupported_stages_are_errors(row, ancestry_files):
    name, options, arch = row
    method = get_method(name, options)
    assert method.stages <= set(STAGES) and method.stages
    ancestry = ancestry_files(method.ancestry_methods[0], arch) if method.ancestry_methods else None
    for stage in STAGES:
        if stage == "ancestry":
            continue  # covered by test_build through build_ancestry
        task = Task("contract", TASK_CLASSES, stage=stage)
        if stage in method.stages:
            assert isinstance(method.build(arch, task, ancestry), nn.Module)
        else:
            with pytest.raises(MethodError, match=f"does not support stage '{stage}'"):
                method.build(arch, task, ancestry)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_param_groups_cover_exactly_the_trainable_params(row, ancestry_files):
    method, model, _, _ = build_row(row, ancestry_files)
    groups = method.mark_trainable(model)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter appears in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable and trainable
    for group in groups:
        assert isinstance(group["name"], str) and group["params"] and group["lr_scale"] > 0


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_only_owned_params_change_after_a_step(row, ancestry_files):
    method, model, _, _ = build_row(row, ancestry_files)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    one_step(method, model, row[2])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the optimizer step changed nothing"
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} received a gradient"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_merge_equals_unmerged(row, ancestry_files):
    method, model, task, _ = build_row(row, ancestry_files)
    arch = row[2]
    one_step(method, model, arch)  # adapters start as no-ops; one step makes the merge non-trivial
    model.eval()
    x, t, y = inputs(arch)
    with torch.no_grad():
        unmerged = model(x, t, y)
        merged_model = method.merge(copy.deepcopy(model)).eval()
        merged = merged_model(x, t, y)
    assert type(merged_model) is DiT
    assert all(type(m) is nn.Linear for m in merged_model.modules() if isinstance(m, nn.Linear))
    stock_keys = set(arch.build(task.num_classes, device="meta").state_dict())
    assert set(merged_model.state_dict()) == stock_keys  # DiT's own names: loads anywhere a DiT does
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_state_to_save_round_trips(row, ancestry_files):
    method, model, _, _ = build_row(row, ancestry_files)
    one_step(method, model, row[2])
    state = method.state_to_save(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(state), f"trained tensors not saved: {sorted(trainable - set(state))[:5]}"
    reloaded = load_safetensors_bytes(save_safetensors_bytes(dict(state)))  # what the engine writes to disk
    _, fresh, _, _ = build_row(row, ancestry_files, seed=99)  # another seed: fresh adapters/embeddings differ
    method.load_state(fresh, reloaded)
    expected = model.state_dict()
    got = fresh.state_dict()
    assert set(got) == set(expected)
    unequal = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not unequal, f"not reproduced by state_to_save + load_state: {unequal[:5]}"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_forward_is_finite_in_fp32_and_bf16(row, ancestry_files):
    method, model, _, _ = build_row(row, ancestry_files)
    model.eval()
    x, t, y = inputs(row[2])
    with torch.no_grad():
        assert torch.isfinite(model(x, t, y)).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x, t, y).float()).all()
        low = copy.deepcopy(model).to(torch.bfloat16)
        out = low(x.to(torch.bfloat16), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_accounting_is_exact(row, ancestry_files):
    method, model, task, _ = build_row(row, ancestry_files)
    arch = row[2]
    acc = method.count(model)
    params = list(model.parameters())
    assert acc.params_total == sum(p.numel() for p in params)
    assert acc.params_trainable == sum(p.numel() for p in params if p.requires_grad)
    assert acc.params_inherited + acc.params_new == acc.params_total
    assert acc.params_new > 0
    if not method.ancestry_methods:
        assert acc.params_inherited == 0
    else:
        assert acc.params_inherited > 0
    state = method.state_to_save(model)
    assert acc.stored_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert acc.gmacs_fwd_trained == pytest.approx(measured_gmacs(model, arch), rel=1e-12)
    # sampling runs the merged DiT, or the method's own form where that is cheaper (KIND's paper preset)
    sampled = method.sampling_model(copy.deepcopy(model))
    assert acc.gmacs_fwd_sampled == pytest.approx(measured_gmacs(sampled, arch), rel=1e-12)
    dense = measured_gmacs(arch.build(task.num_classes), arch)
    assert acc.gmacs_fwd_sampled == pytest.approx(dense, rel=1e-12) or acc.gmacs_fwd_sampled < dense
    assert set(acc.to_dict()) >= {"params_total", "params_trainable", "gmacs_fwd_trained", "gmacs_fwd_sampled"}


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_unknown_option_is_an_error(row):
    name, options, _ = row
    with pytest.raises(MethodError, match="unknown option 'no_such_option'"):
        get_method(name, {**options, "no_such_option": 1})


def test_unknown_method_name_suggests_a_close_one():
    with pytest.raises(MethodError, match=r"unknown method 'lroa'.*did you mean.*lora"):
        get_method("lroa")


# --------------------------------------------------------------------------------------------------------------
#                                         Method-specific contract rows
# --------------------------------------------------------------------------------------------------------------

LORA_ROWS = [(row, rid) for row, rid in zip(ROWS, ROW_IDS) if row[0] == "lora"]


@pytest.mark.parametrize("row", [r for r, _ in LORA_ROWS], ids=[i for _, i in LORA_ROWS])
def test_lora_trainable_count_follows_the_formula(row, ancestry_files):
    """r * (in + out) per adapted matrix, plus the re-initialised and fully trained modules."""
    method, model, task, _ = build_row(row, ancestry_files)
    cfg = method.config
    stock = row[2].build(task.num_classes)
    trained_in_full = tuple(cfg.reinit) + tuple(cfg.train_modules)
    adapted = [m for n, m in stock.named_modules() if isinstance(m, nn.Linear)
               and any(n == t or n.endswith("." + t) for t in cfg.targets)
               and not any(n.startswith(f + ".") for f in trained_in_full)]  # no adapter inside a fully trained module
    assert adapted
    expected = sum(cfg.rank * (m.in_features + m.out_features) for m in adapted)
    for module_name in set(cfg.reinit) | set(cfg.train_modules):
        expected += sum(p.numel() for p in stock.get_submodule(module_name).parameters())
    assert method.count(model).params_trainable == expected


@pytest.mark.parametrize(("name", "options", "message"), [
    ("lora", {"rank": 0}, "rank must be a positive int"),
    ("lora", {"rank": True}, "rank must be a positive int"),
    ("lora", {"alpha": -1.0}, "alpha must be positive"),
    ("lora", {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ("lora", {"init": "loftq"}, "init must be one of"),
    ("lora", {"targets": ()}, "at least one target"),
    ("lora", {"reinit": ("blocks",)}, "cannot re-initialise 'blocks'"),
    ("full", {"targets": ("attn.qkv",)}, "'targets' does not apply"),
    ("scratch", {"reinit": ("y_embedder",)}, "do not apply"),
])
def test_config_validation(name, options, message):
    with pytest.raises(MethodError, match=message):
        get_method(name, options)


def test_lora_alpha_defaults_to_rank_and_is_recorded():
    config = get_method("lora", {"rank": 8}).config
    assert config.alpha == 8.0 and config.to_dict()["alpha"] == 8.0
    assert type(config).from_dict(config.to_dict()) == config  # the record's options rebuild the same config
