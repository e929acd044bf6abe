"""TLEG and SWS (baselines/tleg.py, baselines/sws.py): auxiliary models, distillation, descendants of other depths.

The contract table (tests/test_methods_contract.py) covers the same-depth build; here: the expansion rules hold
exactly, the auxiliary models merge into the dense DiT they compute, the distillation term behaves, and a
descendant of another depth builds from an exported ancestry and trains. Tiny DiT-T/2 at 8x8 on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from suitefixtures import DENSE, ancestry, method, suite_file, suite_toml, task

from baselines.size_transfer import DistillationTeacher, generated_blocks
from baselines.sws import even_split, spaced_stages, stage_of_layers
from baselines.tleg import expansion_coefficient
from bench.config.suite import load_suite
from bench.diffusion import GaussianDiffusion
from bench.models.dit import DiT
from bench.pipeline.plan import make_plan
from methods import ArchSpec, MethodError, Task, get_method
from methods.transfer import load_export, save_export

AUX = ArchSpec(name="DiT-T/2-d4", input_size=8, in_channels=4)
CLASSES = 10


def arch(depth: int) -> ArchSpec:
    return ArchSpec(name=f"DiT-T/2-d{depth}", input_size=8, in_channels=4)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random values wherever DiT starts at zero (adaLN, head), so no expansion is trivially right."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model


def exported(tmp_path, name: str, options: dict | None = None, arch_spec: ArchSpec = AUX):
    """An auxiliary model of ``name`` with random weights, written and read back as an ancestry file."""
    torch.manual_seed(0)
    model = perturbed(get_method(name, options).build_ancestry(arch_spec, CLASSES))
    path = tmp_path / f"{name}.safetensors"
    save_export(path, model.state_dict(), method=name, arch=arch_spec, num_classes=CLASSES)
    return model, load_export(path)


def inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    return x, torch.tensor([0, 250, 500, 999][:batch]), torch.tensor([1, 3, 5, 0][:batch])


def diffusion_batch(model, method, diffusion, x, t, y):
    """One loss evaluation as ``bench.run.train.micro_step_loss`` does it (diffusion loss + the method's term)."""
    kwargs = {"y": y, "force_drop_ids": torch.tensor([0, 1, 0, 0][:len(y)])}
    terms = diffusion.training_losses(model, x, t, kwargs, noise=torch.randn_like(x))
    batch = {"x": x, "y": y, "x_t": terms["x_t"], "t": t, "model_kwargs": kwargs,
             "model_output": terms["model_output"]}
    extra = method.extra_loss(model, batch)
    return terms["loss"].mean() + extra, extra


# --------------------------------------------------------------------------------------------------------------
#                                                    TLEG
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["l/L", "l/(L-1)"])
@pytest.mark.parametrize("depth", [1, 3, 4, 7])
def test_tleg_expansion_is_theta_a_plus_c_l_theta_b(tmp_path, rule, depth):
    auxiliary, ancestry = exported(tmp_path, "tleg", {"coefficient": rule})
    blocks = generated_blocks(auxiliary)
    base, step = dict(blocks.tleg_base.named_parameters()), dict(blocks.tleg_step.named_parameters())
    model = get_method("tleg").build(arch(depth), Task("t", 6, "descend"), ancestry)  # the rule comes from the file
    assert type(model) is DiT and model.depth == depth and len(model.blocks) == depth
    for layer, block in enumerate(model.blocks):
        c = layer / depth if rule == "l/L" else (layer / (depth - 1) if depth > 1 else 0.0)
        assert expansion_coefficient(layer, depth, rule) == c
        for name, param in block.named_parameters():
            assert torch.equal(param, base[name] + c * step[name]), (layer, name)
    # Everything outside the blocks is inherited as is, except the re-initialised class table.
    state = auxiliary.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith(("blocks.", "y_embedder.")):
            assert torch.equal(value, state[name]), name


def test_tleg_covers_every_block_linear_including_adaln():
    blocks = generated_blocks(get_method("tleg").build_ancestry(AUX, CLASSES))
    names = {n for n, _ in blocks.tleg_base.named_parameters()}
    assert names == {f"{m}.{p}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
                     for p in ("weight", "bias")}
    assert {n for n, _ in blocks.tleg_step.named_parameters()} == names


# --------------------------------------------------------------------------------------------------------------
#                                                     SWS
# --------------------------------------------------------------------------------------------------------------


def test_sws_splits_follow_the_readme_example():
    assert even_split(12, 5) == (3, 3, 2, 2, 2)
    assert stage_of_layers(even_split(12, 5)) == (0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4)
    with pytest.raises(MethodError, match="cannot split 3 layers into 5"):
        even_split(3, 5)
    assert spaced_stages(2, 5) == (1, 0, 0, 0, 1) and spaced_stages(3, 5) == (1, 0, 1, 0, 1)
    assert spaced_stages(1, 5) == (1, 0, 0, 0, 0) and stage_of_layers((1, 0, 2)) == (0, 2, 2)


def test_sws_auxiliary_model_has_fewer_stages_when_shallow():
    assert generated_blocks(get_method("sws").build_ancestry(AUX, CLASSES)).layers_per_stage == (1, 1, 1, 1)
    sws = generated_blocks(get_method("sws", {"stages": 3}).build_ancestry(arch(7), CLASSES))
    assert sws.layers_per_stage == (3, 2, 2) and len(sws.sws_stages) == 3


@pytest.mark.parametrize(("options", "depth", "expected"), [
    ({}, 5, (0, 0, 1, 2, 3)),
    ({"descend_layers": (1, 1, 1, 3)}, 6, (0, 1, 2, 3, 3, 3)),
    ({}, 4, (0, 1, 2, 3)),
    ({}, 2, (0, 3)),
    ({"descend_layers": (0, 2, 0, 1)}, 3, (1, 1, 3)),
])
def test_sws_descendant_repeats_each_stage(tmp_path, options, depth, expected):
    auxiliary, ancestry = exported(tmp_path, "sws", {"stages": 4})
    stages = generated_blocks(auxiliary).sws_stages
    stage = "transfer" if depth == 4 else "descend"
    model = get_method("sws", options).build(arch(depth), Task("t", 6, stage), ancestry)
    for block, s in zip(model.blocks, expected, strict=True):
        source = dict(stages[s].named_parameters())
        for name, param in block.named_parameters():
            assert torch.equal(param, source[name])


def test_sws_descendant_follows_the_ancestry_split_not_its_own_options(tmp_path):
    _, ancestry = exported(tmp_path, "sws", {"stage_layers": (3, 1)})
    model = get_method("sws", {"stages": 5}).build(arch(4), Task("t", 6, "transfer"), ancestry)
    first = dict(model.blocks[0].named_parameters())
    assert all(torch.equal(p, first[n]) for n, p in model.blocks[2].named_parameters())
    with pytest.raises(MethodError, match="one entry per stage of the ancestry"):
        get_method("sws", {"descend_layers": (2, 2, 2)}).build(arch(6), Task("t", 6, "descend"), ancestry)
    with pytest.raises(MethodError, match="sum to 6, not to the descendant's depth 5"):
        get_method("sws", {"descend_layers": (3, 3)}).build(arch(5), Task("t", 6, "descend"), ancestry)


# --------------------------------------------------------------------------------------------------------------
#                                               Both methods
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [("tleg", {}), ("sws", {"stages": 2})])
def test_auxiliary_model_merges_into_the_dense_dit_it_computes(name, options):
    torch.manual_seed(0)
    method = get_method(name, options)
    auxiliary = perturbed(method.build_ancestry(AUX, CLASSES))
    groups = method.mark_trainable(auxiliary)
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    loss, _ = diffusion_batch(auxiliary.train(), method, GaussianDiffusion(1000, "linear", True), *inputs())
    loss.backward()
    optimizer.step()
    x, t, y = inputs()
    with torch.no_grad():
        unmerged = auxiliary.eval()(x, t, y)
        merged_model = method.merge(copy.deepcopy(auxiliary)).eval()
        merged = merged_model(x, t, y)
    assert type(merged_model) is DiT and isinstance(merged_model.blocks, torch.nn.ModuleList)
    assert set(merged_model.state_dict()) == set(AUX.build(CLASSES, device="meta").state_dict())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    acc = method.count(auxiliary)
    assert acc.params_new == acc.params_total and acc.params_inherited == 0
    assert acc.params_total < sum(p.numel() for p in merged_model.parameters())  # fewer stored than expanded


@pytest.mark.parametrize("name", ["tleg", "sws"])
@pytest.mark.parametrize("depth", [2, 6])
def test_descendant_of_another_depth_builds_and_trains(tmp_path, name, depth):
    _, ancestry = exported(tmp_path, name)
    method = get_method(name)
    model = method.build(arch(depth), Task("t", 6, "descend"), ancestry)
    assert type(model) is DiT and model.depth == depth
    assert model.y_embedder.embedding_table.num_embeddings == 7
    groups = method.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()} - {"pos_embed"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-3)
    diffusion = GaussianDiffusion(1000, "linear", True)
    model.train()
    for _ in range(3):
        loss, extra = diffusion_batch(model, method, diffusion, *inputs())
        assert torch.isfinite(loss) and extra == 0  # descendants train without the constraint or the teacher
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "blocks." in n)
    assert torch.equal(before["pos_embed"], after["pos_embed"])
    acc = method.count(model)
    assert acc.params_new == model.y_embedder.embedding_table.weight.numel()
    assert acc.gmacs_fwd_trained == acc.gmacs_fwd_sampled


@pytest.mark.parametrize("name", ["tleg", "sws"])
def test_stage_and_geometry_errors(tmp_path, name):
    _, ancestry = exported(tmp_path, name)
    method = get_method(name)
    with pytest.raises(MethodError, match="'descend' stage, not 'transfer'"):
        method.build(arch(6), Task("t", 6, "transfer"), ancestry)
    with pytest.raises(MethodError, match="changes depth only"):
        method.build(ArchSpec(name="DiT-T/2-d4-w128", input_size=8, in_channels=4), Task("t", 6, "descend"),
                      ancestry)
    with pytest.raises(MethodError, match="cannot build from an ancestry of method 'scratch'"):
        method.build(AUX, Task("t", 6, "transfer"), exported(tmp_path, "scratch")[1])
    with pytest.raises(MethodError, match="add 'y_embedder'"):
        get_method(name, {"reinit": ()}).build(AUX, Task("t", 6, "transfer"), ancestry)
    with pytest.raises(MethodError, match="'targets' does not apply"):
        get_method(name, {"targets": ("attn.qkv",)})


# --------------------------------------------------------------------------------------------------------------
#                                          Distillation from a teacher
# --------------------------------------------------------------------------------------------------------------


def dense_teacher(tmp_path, depth: int = 4):
    torch.manual_seed(5)
    teacher = perturbed(arch(depth).build(CLASSES))
    path = tmp_path / "teacher.safetensors"
    save_export(path, teacher.state_dict(), method="scratch", arch=arch(depth), num_classes=CLASSES)
    return teacher, load_export(path)


@pytest.mark.parametrize("name", ["tleg", "sws"])
def test_distillation_is_zero_when_the_student_computes_the_teacher(tmp_path, name):
    teacher, _ = dense_teacher(tmp_path)
    with torch.no_grad():  # a teacher whose blocks all share block 0: both methods can represent it exactly
        for block in teacher.blocks[1:]:
            for target, source in zip(block.parameters(), teacher.blocks[0].parameters(), strict=True):
                target.copy_(source)
    path = tmp_path / "shared.safetensors"
    save_export(path, teacher.state_dict(), method="scratch", arch=AUX, num_classes=CLASSES)
    options = {"step_init": "zeros"} if name == "tleg" else {"stages": 1}
    method = get_method(name, options)
    student = method.build_ancestry(AUX, CLASSES, teacher=load_export(path))
    with torch.no_grad():
        non_block = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
        student.load_state_dict(non_block, strict=False)
        template = generated_blocks(student).tleg_base if name == "tleg" else generated_blocks(student).sws_stages[0]
        template.load_state_dict(teacher.blocks[0].state_dict())
    _, extra = diffusion_batch(student.train(), method, GaussianDiffusion(1000, "linear", True), *inputs())
    assert extra.item() == 0.0


@pytest.mark.parametrize("name", ["tleg", "sws"])
def test_distillation_trains_the_student_and_leaves_the_teacher_alone(tmp_path, name):
    teacher, teacher_ancestry = dense_teacher(tmp_path, depth=6)  # the teacher may be deeper than the student
    method = get_method(name, {"distill_weight": 2.0})
    student = method.build_ancestry(AUX, CLASSES, teacher=teacher_ancestry)
    method.mark_trainable(student)  # as the trainer does, once, after build_ancestry
    assert not any(p is q for p in student.parameters() for q in method.teacher.model.parameters())
    teacher_before = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    x, t, y = inputs()
    _, extra = diffusion_batch(student.train(), method, GaussianDiffusion(1000, "linear", True), x, t, y)
    assert extra.item() > 0 and extra.requires_grad
    with torch.no_grad():  # the term by hand: 2 x MSE of the eps channels on the same x_t, t and dropped labels
        student_eps = student(x, t, y, force_drop_ids=torch.tensor([0, 1, 0, 0]))[:, :4]
        teacher_eps = teacher.eval()(x, t, y, force_drop_ids=torch.tensor([0, 1, 0, 0]))[:, :4]
    kwargs = {"y": y, "force_drop_ids": torch.tensor([0, 1, 0, 0])}
    batch = {"x_t": x, "t": t, "model_kwargs": kwargs, "model_output": student(x, t, **kwargs)}
    by_hand = method.extra_loss(student, batch)
    torch.testing.assert_close(by_hand, 2.0 * (student_eps - teacher_eps).square().mean())
    extra.backward()
    assert all(p.grad is None for p in method.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in method.teacher.model.state_dict().items())
    # A fresh ancestry build without a teacher drops the old one: nothing distils by accident.
    method.build_ancestry(AUX, CLASSES)
    assert method.extra_loss(student, {}).item() == 0.0


def test_teacher_must_share_the_label_space_and_be_dense(tmp_path):
    _, teacher = dense_teacher(tmp_path)
    with pytest.raises(MethodError, match="same label space"):
        get_method("tleg").build_ancestry(AUX, CLASSES + 1, teacher=teacher)
    _, tleg_ancestry = exported(tmp_path, "tleg")
    with pytest.raises(MethodError, match="distils a dense DiT"):
        get_method("sws").build_ancestry(AUX, CLASSES, teacher=tleg_ancestry)
    assert isinstance(DistillationTeacher(teacher, AUX, CLASSES).model, DiT)


# --------------------------------------------------------------------------------------------------------------
#                                                     LiGO
# --------------------------------------------------------------------------------------------------------------

SMALL = ArchSpec(name="DiT-T/2-d2", input_size=8, in_channels=4)


def grown(tmp_path, target: ArchSpec, options: dict | None = None):
    """A LiGO operator-phase model grown from a random small dense DiT (passed as the ancestry-stage teacher)."""
    torch.manual_seed(2)
    source = perturbed(SMALL.build(CLASSES))
    path = tmp_path / "small.safetensors"
    save_export(path, source.state_dict(), method="scratch", arch=SMALL, num_classes=CLASSES)
    method = get_method("ligo", options)
    return method, source, method.build_ancestry(target, CLASSES, teacher=load_export(path))


def test_ligo_width_growth_preserves_the_function_at_init(tmp_path):
    _, source, model = grown(tmp_path, ArchSpec(name="DiT-T/2-d2-w128", input_size=8, in_channels=4))
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, y), source.eval()(x, t, y), rtol=0, atol=1e-5)
    operator = model.ligo_operator
    assert operator.embed_out.shape == (128, 64) and operator.mlp_out.shape == (512, 256)
    torch.testing.assert_close(operator.embed_in.T @ operator.embed_out, torch.eye(64))


@pytest.mark.parametrize(("rule", "expected"), [("stack", (0, 1, 0, 1, 0)), ("repeat", (0, 0, 0, 1, 1))])
def test_ligo_depth_growth_starts_from_the_chosen_source_layers(tmp_path, rule, expected):
    method, source, model = grown(tmp_path, arch(5), {"depth_init": rule})
    merged = method.merge(model)
    assert merged.depth == 5
    for layer, origin in enumerate(expected):
        source_block = dict(source.blocks[origin].named_parameters())
        for name, param in merged.blocks[layer].named_parameters():
            assert torch.equal(param, source_block[name]), (layer, name)


def test_ligo_operator_phase_trains_only_the_operator_and_merges(tmp_path):
    method, source, model = grown(tmp_path, ArchSpec(name="DiT-T/2-d3-w128", input_size=8, in_channels=4))
    groups = method.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("ligo_operator.") for n in trainable)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    loss, extra = diffusion_batch(model.train(), method, GaussianDiffusion(1000, "linear", True), *inputs())
    assert torch.isfinite(loss) and extra == 0
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert all(torch.equal(p, source.state_dict()[n]) for n, p in model.ligo_source.named_parameters())
    x, t, y = inputs()
    with torch.no_grad():
        unmerged = model.eval()(x, t, y)
        merged_model = method.merge(copy.deepcopy(model)).eval()
        torch.testing.assert_close(merged_model(x, t, y), unmerged, rtol=0, atol=1e-5)
    assert type(merged_model) is DiT and merged_model.depth == 3 and merged_model.hidden_size == 128
    acc = method.count(model)
    assert acc.params_new == sum(p.numel() for p in model.ligo_operator.parameters())
    assert acc.params_inherited == sum(p.numel() for p in model.ligo_source.parameters())


def test_ligo_grown_ancestry_becomes_a_plain_dit_that_trains(tmp_path):
    target = ArchSpec(name="DiT-T/2-d3-w128", input_size=8, in_channels=4)
    method, _, model = grown(tmp_path, target)
    with torch.no_grad():  # as if the operator phase had moved it
        for param in model.ligo_operator.parameters():
            param.add_(0.01 * torch.randn_like(param))
    path = tmp_path / "grown.safetensors"
    save_export(path, model.state_dict(), method="ligo", arch=target, num_classes=CLASSES)
    ancestry = load_export(path)
    descendant = get_method("ligo").build(target, Task("t", 6, "descend"), ancestry)
    expected = model.materialise().state_dict()
    for name, value in descendant.state_dict().items():
        if not name.startswith("y_embedder."):
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    groups = method.mark_trainable(descendant)
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-3)
    before = {n: p.detach().clone() for n, p in descendant.named_parameters()}
    for _ in range(2):
        loss, _ = diffusion_batch(descendant.train(), method, GaussianDiffusion(1000, "linear", True), *inputs())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(descendant.named_parameters())
    assert not torch.equal(before["blocks.2.mlp.fc1.weight"], after["blocks.2.mlp.fc1.weight"])
    assert torch.equal(before["pos_embed"], after["pos_embed"])
    with pytest.raises(MethodError, match="grow a ligo ancestry of the task's size"):
        get_method("ligo").build(arch(4), Task("t", 6, "descend"), ancestry)
    with pytest.raises(MethodError, match="grow it first in a ligo ancestry run"):
        get_method("ligo").build(SMALL, Task("t", 6, "descend"), load_export(tmp_path / "small.safetensors"))


def test_ligo_only_grows(tmp_path):
    with pytest.raises(MethodError, match="fewer than the source's"):
        grown(tmp_path, arch(1))
    with pytest.raises(MethodError, match="cannot grow 64 units to 32"):
        grown(tmp_path, ArchSpec(name="DiT-T/2-d2-w32", input_size=8, in_channels=4))
    with pytest.raises(MethodError, match="same head size"):
        grown(tmp_path, ArchSpec(name="DiT-M/2-d2", input_size=8, in_channels=4))


# --------------------------------------------------------------------------------------------------------------
#                                        How a suite expresses the three
# --------------------------------------------------------------------------------------------------------------

# teachers dense (6 layers) and small (2): tleg (a 4-layer auxiliary model) and sws learn from dense, ligo from small;
# the descend task trains 6-layer descendants of the three
SUITE = suite_toml("size-transfer", seeds=None, archs=["DiT-T/2-d6"], ancestries=[
    DENSE,
    ancestry("small", "scratch", arch="DiT-T/2-d2"),
    ancestry("tleg", "tleg", teacher="dense", arch="DiT-T/2-d4"),
    ancestry("sws", "sws", teacher="dense"),
    ancestry("ligo", "ligo", teacher="small", schedule={"steps": 2}),
], tasks=[task("deeper", stage="descend")], methods=[
    method("tleg", ancestry="tleg"), method("sws", ancestry="sws"), method("ligo", ancestry="ligo"),
])


def test_a_suite_chains_teacher_auxiliary_and_descendant(tmp_path):
    plan = make_plan(load_suite(suite_file(tmp_path, SUITE, "size-transfer.toml")))
    ancestry = {job.info["ancestry"]: job for job in plan.by_step("pretrain")}
    assert set(ancestry) == {"dense", "small", "tleg", "sws", "ligo"}
    for name, teacher in (("tleg", "dense"), ("sws", "dense"), ("ligo", "small")):
        job = ancestry[name]
        assert job.deps == (ancestry[teacher].job_id,)
        assert job.config["run"]["ancestry"] == f"{ancestry[teacher].run_id}/export.safetensors"
    assert ancestry["tleg"].config["model"]["arch"] == "DiT-T/2-d4"  # a 4-layer auxiliary model ...
    transfers = {job.info["method"]: job for job in plan.by_step("train")}
    assert transfers["tleg"].config["model"]["arch"] == "DiT-T/2-d6"  # ... expanded to a 6-layer descendant
    assert {transfers[m].info["family"] for m in ("tleg", "sws")} == {"learngene"}
    assert transfers["ligo"].info["family"] == "init"
    assert transfers["ligo"].deps == (ancestry["ligo"].job_id,)


@pytest.mark.parametrize("name", ["tleg", "sws", "ligo"])
def test_auxiliary_models_run_in_bf16(name):
    torch.manual_seed(0)
    model = perturbed(get_method(name).build_ancestry(AUX, CLASSES)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x, t, y).float()).all()
        low = copy.deepcopy(model).to(torch.bfloat16)
        out = low(x.to(torch.bfloat16), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert type(get_method(name).merge(low)) is DiT


@pytest.mark.parametrize("name", ["tleg", "ligo"])
def test_zero3_partitioned_parameters_are_a_one_line_error(name):
    model = get_method(name).build_ancestry(AUX, CLASSES)
    for param in model.parameters():  # what DeepSpeed ZeRO-3 marks its partitioned tensors with
        param.ds_status = "NOT_AVAILABLE"
    with pytest.raises(MethodError, match="engine.zero_stage = 2 or lower"):
        model(*inputs())
