"""WAVE (baselines/wave.py): Kronecker templates, consolidation by distillation, descendants of other sizes.

The contract table (tests/test_methods_contract.py) covers same-size transfer; here: the weight composition itself,
the shared-template fit, descendants of another depth *and* width, the distillation term, and (slow) a 2-process
DeepSpeed ZeRO-3 run against a single-process one. Everything runs on CPU on tiny DiTs at 8x8 inputs.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from suitefixtures import DENSE, ancestry, method, suite_file, suite_toml, task

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from baselines.wave import WaveLinear, compose_weight, fit_templates, template_name, template_params, wave_layers  # noqa: E402
from bench.diffusion import GaussianDiffusion  # noqa: E402
from bench.models.dit import DiT  # noqa: E402
from bench.run.batching import derive_seed  # noqa: E402
from bench.run.train import INIT_STREAM  # noqa: E402
from methods import ArchSpec, Export, MethodError, Task, get_method  # noqa: E402
from methods.transfer import load_export  # noqa: E402

TINY = ArchSpec(name="DiT-T/2", input_size=8, in_channels=4)
TINY_DEPTH = 2
OTHER_SIZE = ArchSpec(name="DiT-T/2-d3-w96", input_size=8, in_channels=4)  # 3 blocks instead of 2, width 96 not 64
CLASSES = 5
SMALL = {"template_size": 32, "num_templates": 4}  # 32 divides both widths (64 and 96) and their 3d/4d


def wave_ancestry(options=SMALL, arch=TINY, seed=0) -> Export:
    """A consolidated WAVE ancestry with random (non-trivial) values everywhere, as an ancestry run exports it."""
    torch.manual_seed(seed)
    model = get_method("wave", options).build_ancestry(arch, CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return Export("wave", arch, CLASSES, {k: v.detach().clone() for k, v in model.state_dict().items()})


def dense_ancestry(arch=TINY, seed=1) -> Export:
    torch.manual_seed(seed)
    model = arch.build(CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return Export("scratch", arch, CLASSES, dict(model.state_dict()))


def batch(arch=TINY, n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, arch.in_channels, arch.input_size, arch.input_size, generator=g)
    return x, torch.randint(0, 1000, (n,), generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def train_steps(method, model, arch, steps=3):
    """A few AdamW steps on the real diffusion loss (+ the method's extra loss); returns the losses."""
    groups = method.mark_trainable(model)
    opt = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2, weight_decay=0.0)
    diffusion = GaussianDiffusion(1000, "linear", arch.learn_sigma)
    model.train()
    losses = []
    for step in range(steps):
        x, t, y = batch(arch, seed=step)
        kwargs = {"y": y}
        terms = diffusion.training_losses(model, x, t, kwargs)
        view = {"x": x, "y": y, "x_t": terms["x_t"], "t": t, "model_kwargs": kwargs,
                "model_output": terms["model_output"]}
        loss = terms["loss"].mean() + method.extra_loss(model, view)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------------------------------------------
#                                             Composition and fit
# --------------------------------------------------------------------------------------------------------------


def test_compose_weight_is_the_blockwise_weighted_sum_of_templates():
    scalers, templates = torch.randn(3, 2, 4), torch.randn(3, 5, 5)
    weight = compose_weight(scalers, templates)
    assert weight.shape == (10, 20)
    for a in range(2):
        for b in range(4):
            block = weight[a * 5:(a + 1) * 5, b * 5:(b + 1) * 5]
            expected = sum(scalers[k, a, b] * templates[k] for k in range(3))
            torch.testing.assert_close(block, expected, rtol=0, atol=1e-6)


def test_fit_recovers_weights_made_of_shared_templates():
    templates = torch.randn(3, 4, 4, dtype=torch.float64)
    weights = [compose_weight(torch.randn(3, 3, 2, dtype=torch.float64), templates) for _ in range(4)]
    weights.append(compose_weight(torch.randn(3, 1, 5, dtype=torch.float64), templates))  # another shape, same T
    fitted, scalers = fit_templates(weights, 3, 4)
    for weight, s in zip(weights, scalers):
        torch.testing.assert_close(compose_weight(s, fitted), weight, rtol=0, atol=1e-10)
    fitted, scalers = fit_templates(weights, 2, 4)  # fewer templates: an approximation, not exact
    assert (compose_weight(scalers[0], fitted) - weights[0]).abs().max() > 1e-3


def test_templates_are_stored_once_on_the_root_and_shared_by_every_block():
    model = get_method("wave", SMALL).build_ancestry(TINY, CLASSES)
    layers = wave_layers(model)
    assert len(layers) == 4 * TINY_DEPTH
    keys = set(model.state_dict())
    for target in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert template_name(target) in keys and template_name(target) in dict(model.named_parameters(recurse=False))
        users = [layer for layer in layers.values() if layer.target == target]
        assert len({id(layer.templates()) for layer in users}) == 1
    assert not [k for k in keys if "template" in k and "." in k]  # no copy inside a block


# --------------------------------------------------------------------------------------------------------------
#                                   Descendants of another depth and width
# --------------------------------------------------------------------------------------------------------------


def test_descendant_of_other_depth_and_width_builds_and_trains_with_frozen_templates():
    ancestry = wave_ancestry()
    method = get_method("wave", {})  # count and side of the templates come from the ancestry file
    model = method.build(OTHER_SIZE, Task("d3w96", 7, stage="descend"), ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    assert (model.depth, model.hidden_size) == (3, 96) and len(wave_layers(model)) == 4 * 3
    assert model.blocks[2].mlp.fc1.wave_scalers.shape == (4, 384 // 32, 96 // 32)
    templates = template_params(model)
    for name, tensor in templates.items():
        assert torch.equal(tensor, ancestry.state[name]) and not tensor.requires_grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_steps(method, model, OTHER_SIZE)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    for name in templates:
        assert torch.equal(before[name], after[name]), f"frozen template {name} changed"
    assert torch.equal(before["pos_embed"], after["pos_embed"])
    for name, layer in wave_layers(model).items():
        if "adaLN" not in name:
            assert not torch.equal(before[f"{name}.wave_scalers"], layer.wave_scalers), name
    assert not torch.equal(before["blocks.2.adaLN_modulation.1.weight"], after["blocks.2.adaLN_modulation.1.weight"])
    acc = method.count(model)
    assert acc.params_inherited == sum(t.numel() for t in templates.values())
    assert acc.params_trainable == acc.params_total - acc.params_inherited - model.pos_embed.numel()


def test_descendant_merges_to_a_plain_dit_with_the_same_outputs():
    method = get_method("wave", {})
    model = method.build(OTHER_SIZE, Task("d3w96", 7, stage="descend"), wave_ancestry())
    train_steps(method, model, OTHER_SIZE, steps=1)
    model.eval()
    x, t, y = batch(OTHER_SIZE)
    with torch.no_grad():
        unmerged = model(x, t, y)
        merged = method.merge(copy.deepcopy(model)).eval()
        assert type(merged) is DiT and set(merged.state_dict()) == set(OTHER_SIZE.build(7).state_dict())
        torch.testing.assert_close(merged(x, t, y), unmerged, rtol=0, atol=1e-5)


def test_train_all_folds_the_descendant_into_a_dense_dit_trained_in_full():
    ancestry = wave_ancestry()
    torch.manual_seed(5)
    reference = get_method("wave", {}).build(OTHER_SIZE, Task("d3w96", 7, stage="descend"), ancestry)
    torch.manual_seed(5)
    method = get_method("wave", {"train": "all"})
    model = method.build(OTHER_SIZE, Task("d3w96", 7, stage="descend"), ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    assert not wave_layers(model) and not template_params(model)
    assert set(model.state_dict()) == set(OTHER_SIZE.build(7).state_dict())
    x, t, y = batch(OTHER_SIZE)
    with torch.no_grad():  # the same seed gives the same fresh scalers: the folded model is the WAVE model
        torch.testing.assert_close(model.eval()(x, t, y), reference.eval()(x, t, y), rtol=0, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(dict(model.named_parameters())) - {"pos_embed"}
    assert all(torch.isfinite(torch.tensor(train_steps(method, model, OTHER_SIZE))))


def test_wave_teacher_gives_the_scaler_phase_as_an_ancestry_of_the_new_size():
    """How a suite chains WAVE's phases: an ancestry of method wave whose teacher is the consolidated ancestry."""
    ancestry = wave_ancestry()
    method = get_method("wave", {})
    phase1 = method.build_ancestry(OTHER_SIZE, CLASSES, teacher=ancestry)
    method.mark_trainable(phase1)  # as the trainer does, once, after build_ancestry
    assert method.teacher is None  # a wave teacher lends templates; nothing is distilled
    assert all(not p.requires_grad for p in template_params(phase1).values())
    train_steps(method, phase1, OTHER_SIZE, steps=1)
    export = Export("wave", OTHER_SIZE, CLASSES, dict(phase1.state_dict()))
    phase2 = get_method("wave", {"train": "all"}).build(OTHER_SIZE, Task("d3w96", CLASSES, stage="descend"), export)
    assert type(phase2) is DiT and not template_params(phase2)


def test_normal_training_keeps_the_class_table_its_initialisation_phase_trained_on_the_same_classes():
    """WAVE's second phase continues the first on the same task: redrawing the class table there threw away the
    class conditioning phase 1 had learned (WAVE at scratch level on the tiny suite's deeper task)."""
    phase1 = get_method("wave", {}).build_ancestry(OTHER_SIZE, CLASSES, teacher=wave_ancestry())
    with torch.no_grad():
        phase1.y_embedder.embedding_table.weight.add_(1.0)  # as phase 1's training moves it
    state = {k: v.detach().clone() for k, v in phase1.state_dict().items()}
    export = Export("wave", OTHER_SIZE, CLASSES, state, meta={"label_space": "novel-a-digest"})
    table = state["y_embedder.embedding_table.weight"]

    def phase2(label_space):
        task = Task("deeper", CLASSES, stage="descend", label_space=label_space)
        return get_method("wave", {"train": "all"}).build(OTHER_SIZE, task, export).y_embedder.embedding_table.weight

    assert torch.equal(phase2("novel-a-digest"), table)
    for other in ("another-digest", None):  # other classes, or unknown ones: a new table
        assert not torch.equal(phase2(other), table)


def test_template_side_must_divide_the_descendant_and_targets_must_exist_in_the_ancestry():
    ancestry = wave_ancestry(options={})  # side 64 on DiT-T: does not divide width 96
    assert ancestry.state[template_name("attn.qkv")].shape == (8, 64, 64)
    with pytest.raises(MethodError, match="side 64 must divide"):
        get_method("wave", {}).build(OTHER_SIZE, Task("d", 7, stage="descend"), ancestry)
    with pytest.raises(MethodError, match="no templates for 'adaLN_modulation.1'"):
        get_method("wave", {"targets": ("attn.qkv", "adaLN_modulation.1")}).build(
            OTHER_SIZE, Task("d", 7, stage="descend"), wave_ancestry())
    with pytest.raises(MethodError, match="'descend' stage"):
        get_method("wave", {}).build(OTHER_SIZE, Task("t", 7, stage="transfer"), wave_ancestry())


@pytest.mark.parametrize(("options", "message"), [
    ({"train": "templates"}, "train must be one of"),
    ({"teacher_init": "copy"}, "teacher_init must be one of"),
    ({"template_size": 0}, "template_size must be a positive int"),
    ({"num_templates": True}, "num_templates must be a positive int"),
    ({"distill_weight": -1.0}, "distill_weight must be >= 0"),
    ({"targets": ()}, "at least one target"),
])
def test_config_validation(options, message):
    with pytest.raises(MethodError, match=message):
        get_method("wave", options)


# --------------------------------------------------------------------------------------------------------------
#                                    Consolidation: distillation from a teacher
# --------------------------------------------------------------------------------------------------------------


def distill_view(method, model, student_output=None):
    x, t, y = batch()
    diffusion = GaussianDiffusion(1000, "linear", True)
    x_t = diffusion.q_sample(x, t, torch.randn_like(x))
    kwargs = {"y": y, "force_drop_ids": torch.tensor([0, 1, 0, 0])}
    out = model(x_t, t, **kwargs) if student_output is None else student_output(x_t, t, kwargs)
    return {"x": x, "y": y, "x_t": x_t, "t": t, "model_kwargs": kwargs, "model_output": out}


def test_distillation_loss_is_zero_for_the_teachers_output_and_positive_for_the_student():
    teacher = dense_ancestry()
    method = get_method("wave", {**SMALL, "teacher_init": "random"})
    model = method.build_ancestry(TINY, CLASSES, teacher=teacher)
    method.mark_trainable(model)  # as the trainer does, once, after build_ancestry
    assert method.teacher is not None and all(not p.requires_grad for p in method.teacher.parameters())
    teacher_ids = {id(p) for p in method.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}  # kept on the method, never in the model
    same = distill_view(method, model, lambda x_t, t, kw: method.teacher(x_t, t, **kw))
    assert method.extra_loss(model, same).item() == 0.0
    with torch.no_grad():  # leave adaLN-Zero's zero gates and head, which would stop every gradient at the output
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.train()
    view = distill_view(method, model)
    loss = method.extra_loss(model, view)
    assert loss.item() > 0
    loss.backward()
    assert model.blocks[0].attn.qkv.wave_scalers.grad.abs().sum() > 0
    assert template_params(model)[template_name("mlp.fc1")].grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())
    assert get_method("wave", {**SMALL, "distill_weight": 0.0}).extra_loss(model, view).item() == 0.0


def test_consolidation_starts_from_the_teachers_best_template_fit():
    source = get_method("wave", SMALL).build_ancestry(TINY, CLASSES)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.05 * torch.randn_like(param))
    dense = get_method("wave", SMALL).merge(copy.deepcopy(source))  # a dense teacher made of 4 shared templates
    teacher = Export("scratch", TINY, CLASSES, dict(dense.state_dict()))
    method = get_method("wave", SMALL)
    model = method.build_ancestry(TINY, CLASSES, teacher=teacher).eval()
    method.mark_trainable(model)  # as the trainer does, once, after build_ancestry
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "pos_embed")  # templates train too
    view = distill_view(method, model)
    assert method.extra_loss(model, view).item() < 1e-8  # the fit is exact: the student starts as the teacher
    random_start = get_method("wave", {**SMALL, "teacher_init": "random"})
    other = random_start.build_ancestry(TINY, CLASSES, teacher=teacher).eval()
    assert random_start.extra_loss(other, distill_view(random_start, other)) > 1e-4
    losses = train_steps(method, model.train(), TINY)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_teacher_must_be_dense_with_the_same_labels():
    method = get_method("wave", SMALL)
    with pytest.raises(MethodError, match="same labels"):
        method.build_ancestry(TINY, CLASSES + 1, teacher=dense_ancestry())
    bad = Export("lora", TINY, CLASSES, {})
    with pytest.raises(MethodError, match="dense teacher"):
        method.build_ancestry(TINY, CLASSES, teacher=bad)


def test_wave_linear_never_registers_the_root():
    model = get_method("wave", SMALL).build_ancestry(TINY, CLASSES)
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, WaveLinear)
    assert [n for n, _ in layer.named_parameters()] == ["wave_scalers", "bias"]
    assert not list(layer.children())


# --------------------------------------------------------------------------------------------------------------
#                                  DeepSpeed ZeRO-3: templates shared across blocks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_zero3_two_processes_consolidate_shared_templates_like_one_process(run_train):
    """Template consolidation through the real trainer, distilling a dense teacher: templates are used by every
    block but owned by the root module, so under ZeRO-3 (2 ranks, partitioned) the run must follow the
    single-process run: every block saw whole, identical templates and every block's gradient reached them."""
    # TINY_RUN: a scratch ancestry; EMA 0.5 so that its export is not DiT's (zero-output) initialisation.
    dense = run_train("--schedule.steps=3", "--optim.lr=1e-2", "--schedule.ema_decay=0.5", out="dense")
    assert dense.returncode == 0, dense.stderr[-3000:]
    teacher_path = dense.run_dir / "export.safetensors"
    options = {"template_size": 32, "num_templates": 4, "teacher_init": "random"}  # "fit" would start at the teacher
    common = ["--method.name=wave", *(f"--method.options.{k}={v}" for k, v in options.items()),
              f"--run.ancestry={teacher_path}", "--schedule.steps=3", "--schedule.ema_decay=0.5",
              "--optim.lr=1e-2"]  # a large lr: the templates must move enough for the comparison to mean something
    single = run_train(*common, "--engine.backend=ddp", out="ddp")
    assert single.returncode == 0, single.stderr[-3000:]
    zero3 = run_train(*common, "--engine.backend=deepspeed", "--engine.zero_stage=3", nproc=2, out="zero3")
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    assert zero3.losses() == pytest.approx(single.losses(), rel=1e-5, abs=1e-6)
    first = json.loads((single.run_dir / "train.jsonl").read_text().splitlines()[0])
    assert first["loss"] > first["mse"] + first["vb"] + 1e-5  # the distillation term is in the trained loss
    a, b = (load_file(str(r.run_dir / "export.safetensors")) for r in (single, zero3))
    assert a.keys() == b.keys() and template_name("attn.qkv") in a
    assert not [k for k in a if k.startswith("blocks.") and "template" in k]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    # The templates did train: the run's initial model is rebuilt from its seeded construction stream.
    torch.manual_seed(derive_seed(0, INIT_STREAM))
    teacher = load_export(teacher_path)
    initial = get_method("wave", options).build_ancestry(teacher.arch, teacher.num_classes, teacher=teacher)
    start = initial.state_dict()[template_name("mlp.fc1")]
    assert start.shape == b[template_name("mlp.fc1")].shape
    assert (b[template_name("mlp.fc1")] - start).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
#                                      How a suite expresses WAVE's phases
# --------------------------------------------------------------------------------------------------------------

# dense -> wave (consolidation) -> wave-d3w96 (the scaler phase, on novel-a) -> the descend task (all trained)
WAVE_SUITE = suite_toml("wave-chain", ancestries=[
    DENSE,
    ancestry("wave", "wave", teacher="dense", options={"template_size": 32}),
    ancestry("wave-d3w96", "wave", teacher="wave", arch="DiT-T/2-d3-w96", options={"train": "scalers"},
             split="novel-a", schedule={"steps": 2}),
], tasks=[task("novel-a-d3w96", stage="descend", model={"arch": "DiT-T/2-d3-w96"})], methods=[
    method("wave", ancestry="wave-d3w96", options={"train": "all"}),
    method("wave", variant="scalers-only", ancestry="wave", options={"train": "scalers"}),
])


def test_suite_chains_consolidation_scaler_phase_and_normal_training(tmp_path):
    from bench.config.suite import load_suite
    from bench.pipeline.plan import make_plan

    plan = make_plan(load_suite(suite_file(tmp_path, WAVE_SUITE, "wave.toml")))
    train = {j.config["run"]["name"]: j for j in plan.jobs.values() if j.step in ("pretrain", "train")}
    dense, wave, phase1 = train["ancestry-dense"], train["ancestry-wave"], train["ancestry-wave-d3w96"]
    assert wave.deps == (dense.job_id,) and phase1.deps == (wave.job_id,)
    assert phase1.config["model"]["arch"] == "DiT-T/2-d3-w96" and phase1.config["run"]["ancestry"].startswith(
        wave.run_id)
    final = train["novel-a-d3w96"]
    assert final.deps == (phase1.job_id,) and final.config["method"]["options"] == {"train": "all"}
    direct = train["novel-a-d3w96.scalers-only"]
    assert direct.deps == (wave.job_id,) and direct.config["method"]["stage"] == "descend"
