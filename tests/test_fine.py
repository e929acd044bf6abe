"""FINE and its "w/o factorize" ablation beyond the contract table: shared factors, descendants of other depths,
the two-phase recipe (σ only, then everything), and the shared tensors under a 2-process DeepSpeed ZeRO-3 run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainrun import REPO

from baselines.fine_depth import interpolate_layers, nearest_layer
from baselines.fine_layers import BLOCK_TYPES, SharedFactorLinear, factor_names, shared_bases
from bench.diffusion import GaussianDiffusion
from bench.models.dit import DiT
from methods import ArchSpec, MethodError, Task, get_method
from methods.transfer import load_export, save_export

ANCESTOR = ArchSpec(name="DiT-T/2-d4", input_size=8, in_channels=4)
CLASSES = 10


def _arch(depth: int) -> ArchSpec:
    return ArchSpec(name=f"DiT-T/2-d{depth}", input_size=8, in_channels=4)


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random values wherever DiT starts at zero, so nothing is trivially equal (as the contract test does)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _save(tmp_path, model, method: str, arch: ArchSpec, name: str, meta=None):
    path = tmp_path / f"{name}.safetensors"
    save_export(path, model.state_dict(), method=method, arch=arch, num_classes=CLASSES, meta=meta or {})
    return load_export(path)


@pytest.fixture(scope="module")
def fine_ancestry(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomised(get_method("fine").build_ancestry(ANCESTOR, CLASSES))
    return _save(tmp_path_factory.mktemp("fine"), model, "fine", ANCESTOR, "ancestry")


@pytest.fixture(scope="module")
def dense_ancestry(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomised(get_method("scratch").build_ancestry(ANCESTOR, CLASSES))
    return _save(tmp_path_factory.mktemp("dense"), model, "scratch", ANCESTOR, "dense")


def _batch(arch: ArchSpec, n: int = 4):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, arch.in_channels, arch.input_size, arch.input_size, generator=g),
            torch.randint(0, CLASSES, (n,), generator=g), torch.randint(0, 1000, (n,), generator=g))


def _train(method, model, arch: ArchSpec, steps: int = 3) -> list[float]:
    """A few AdamW steps on the real diffusion loss over the method's own groups; returns the losses."""
    groups = method.mark_trainable(model)
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2)
    diffusion = GaussianDiffusion(1000, "linear", arch.learn_sigma)
    x, y, t = _batch(arch)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _step_changes_only_trainables(method, model, arch):
    """Train; assert finite losses, frozen tensors bit-identical and every trainable tensor moved. Returns losses."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    losses = _train(method, model, arch)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    assert changed == trainable - {"pos_embed"}, f"trainable but unchanged: {sorted(trainable - changed)[:5]}"
    return losses


# --------------------------------------------------------------------------------------------------------------
#                                               Shared factors
# --------------------------------------------------------------------------------------------------------------


def test_shared_bases_recover_matrices_that_share_bases():
    torch.manual_seed(0)
    u0, _ = torch.linalg.qr(torch.randn(12, 4))
    v0, _ = torch.linalg.qr(torch.randn(8, 4))
    weights = [(u0 * torch.randn(4)) @ v0.T for _ in range(3)]
    u, v, sigmas = shared_bases(weights, 4)
    for weight, sigma in zip(weights, sigmas):
        torch.testing.assert_close((u * sigma) @ v.T, weight, atol=1e-5, rtol=0)
    zeros = [torch.zeros(12, 8) for _ in range(3)]  # adaLN-Zero: orthonormal bases, sigma zero
    u, v, sigmas = shared_bases(zeros, 4)
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)
    assert all(not s.any() for s in sigmas)


def test_ancestry_holds_each_factor_once_and_every_block_reads_it():
    torch.manual_seed(0)
    model = get_method("fine").build_ancestry(ANCESTOR, CLASSES)
    keys = model.state_dict().keys()
    for target in BLOCK_TYPES:
        u_name, v_name = factor_names(target)
        assert u_name in keys and v_name in keys
        layers = [block.get_submodule(target) for block in model.blocks]
        assert all(isinstance(layer, SharedFactorLinear) for layer in layers)
        assert all(layer.factors[0] is getattr(model, u_name) for layer in layers)
        assert not any(k.startswith("blocks.") and k.endswith(f"{target}.weight") for k in keys)
    # DiT's adaLN-Zero survives the factorisation: the untrained ancestry's blocks are the identity, output zero.
    x, y, t = _batch(ANCESTOR)
    assert not model.eval()(x, t, y).any()
    # After a step the factors changed once, and every block still computes with the same (new) U.
    before = model.fine_U_attn_qkv.detach().clone()
    _train(get_method("fine"), model, ANCESTOR, steps=2)
    assert not torch.equal(before, model.fine_U_attn_qkv)
    for block in model.blocks:
        layer = block.attn.qkv
        expected = (model.fine_U_attn_qkv * layer.sigma) @ model.fine_V_attn_qkv.T
        torch.testing.assert_close(layer.weight_matrix(), expected)


def _factor_layer(out_dim: int, in_dim: int, rank: int, train_factors: bool):
    torch.manual_seed(0)
    owner = torch.nn.Module()
    u, v = torch.linalg.qr(torch.randn(out_dim, rank))[0], torch.linalg.qr(torch.randn(in_dim, rank))[0]
    owner.register_parameter("fine_U_mlp_fc1", torch.nn.Parameter(u, requires_grad=train_factors))
    owner.register_parameter("fine_V_mlp_fc1", torch.nn.Parameter(v, requires_grad=train_factors))
    layer = SharedFactorLinear(owner, "mlp.fc1", torch.rand(rank) + 0.5, torch.randn(out_dim))
    return owner, layer


def test_sigma_phase_at_a_small_batch_runs_in_rank_space():
    # DiT-B/2's qkv at full rank, batch 2 (512 tokens): re-forming W costs more than the whole rank-space pass.
    _, frozen = _factor_layer(2304, 768, 768, train_factors=False)
    assert frozen.forward_macs(512, "factored") < frozen.forward_macs(512, "formed")
    # The factorised ancestry (U, V trained) at 32 images per rank: forming W once per step is the cheaper one.
    _, trained = _factor_layer(2304, 768, 768, train_factors=True)
    assert trained.forward_macs(32 * 256, "formed") < trained.forward_macs(32 * 256, "factored")


@pytest.mark.parametrize("train_factors", [False, True])
@pytest.mark.parametrize("tokens, cheaper", [(1, "factored"), (4096, "formed")])
def test_shared_factor_layer_takes_the_cheaper_path_and_both_compute_the_same(train_factors, tokens, cheaper):
    owner, layer = _factor_layer(48, 32, 32, train_factors)
    macs = {path: layer.forward_macs(tokens, path) for path in ("formed", "factored")}
    assert min(macs, key=macs.get) == cheaper
    for p in (*owner.parameters(), *layer.parameters()):
        p.data = p.data.double()
    x = torch.randn(tokens, 32, dtype=torch.float64)
    outputs, grads = {}, {}
    for path in ("formed", "factored"):
        for p in (*owner.parameters(), *layer.parameters()):
            p.grad = None
        u, v = layer.factors
        if path == "formed":
            outputs[path] = torch.nn.functional.linear(x, layer.weight_matrix(), layer.bias)
        else:
            outputs[path] = (x @ v * layer.sigma) @ u.T + layer.bias
        outputs[path].square().sum().backward()
        grads[path] = [p.grad.clone() for p in (*owner.parameters(), *layer.parameters()) if p.requires_grad]
    assert torch.equal(layer(x), outputs[cheaper])  # the forward runs exactly the cheaper path
    torch.testing.assert_close(outputs["formed"], outputs["factored"], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads["formed"], grads["factored"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
#                                          Descendants of other depths
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [2, 6])
def test_phase_one_descendant_trains_sigma_only(fine_ancestry, depth):
    method = get_method("fine", {"train": "sigma"})
    arch = _arch(depth)
    torch.manual_seed(1)
    model = method.build(arch, Task("descend", CLASSES, "descend"), fine_ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build
    assert len(model.blocks) == depth
    for target in BLOCK_TYPES:  # the learngene itself is inherited unchanged
        for name in factor_names(target):
            assert torch.equal(getattr(model, name), fine_ancestry.state[name])
    # Biases follow relative depth: the first and last blocks are the ancestry's first and last.
    assert torch.equal(model.blocks[0].mlp.fc1.bias, fine_ancestry.state["blocks.0.mlp.fc1.bias"])
    assert torch.equal(model.blocks[-1].mlp.fc1.bias, fine_ancestry.state["blocks.3.mlp.fc1.bias"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.endswith(".sigma") or n.startswith("y_embedder.")}
    assert len([n for n in trainable if n.endswith(".sigma")]) == depth * len(BLOCK_TYPES)
    _step_changes_only_trainables(method, model, arch)
    x, y, t = _batch(arch)
    model.eval()
    with torch.no_grad():
        unmerged = model(x, t, y)
        merged = method.merge(copy.deepcopy(model)).eval()
        assert type(merged) is DiT and set(merged.state_dict()) == set(arch.build(CLASSES).state_dict())
        torch.testing.assert_close(merged(x, t, y), unmerged, rtol=0, atol=1e-5)
    acc = method.count(model)
    assert acc.params_new == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_sigma_init_rules(fine_ancestry):
    ancestry_sigmas = [fine_ancestry.state[f"blocks.{i}.attn.proj.sigma"] for i in range(4)]
    task = Task("descend", CLASSES, "descend")
    identical = get_method("fine", {"sigma_init": "identical"}).build(_arch(3), task, fine_ancestry)
    mean = torch.stack(ancestry_sigmas).mean(0)
    assert all(torch.allclose(b.attn.proj.sigma, mean) for b in identical.blocks)
    linear = get_method("fine", {"sigma_init": "interpolate"}).build(_arch(7), task, fine_ancestry)
    # 7 blocks over 4: block 1 sits half-way between ancestry blocks 0 and 1, block 2 on ancestry block 1.
    torch.testing.assert_close(linear.blocks[1].attn.proj.sigma, (ancestry_sigmas[0] + ancestry_sigmas[1]) / 2)
    assert torch.equal(linear.blocks[2].attn.proj.sigma, ancestry_sigmas[1])
    torch.manual_seed(5)
    random = get_method("fine").build(_arch(3), task, fine_ancestry)
    drawn = torch.stack([b.attn.proj.sigma for b in random.blocks])
    assert torch.isfinite(drawn).all() and not torch.equal(drawn[0], drawn[1])
    # the rules apply at equal depth too (the paper re-draws σ for every target); "copy" keeps the ancestry's
    same_depth = get_method("fine").build(ANCESTOR, task, fine_ancestry)
    assert not all(torch.equal(b.attn.proj.sigma, s) for b, s in zip(same_depth.blocks, ancestry_sigmas))
    copied = get_method("fine", {"sigma_init": "copy"}).build(ANCESTOR, task, fine_ancestry)
    assert all(torch.equal(b.attn.proj.sigma, s) for b, s in zip(copied.blocks, ancestry_sigmas))


def test_phase_two_continues_phase_one_as_a_dense_dit(fine_ancestry, tmp_path):
    arch, task = _arch(2), Task("descend", CLASSES, "descend")
    torch.manual_seed(2)
    phase_one = get_method("fine", {"train": "sigma"})
    model = phase_one.build(arch, task, fine_ancestry)
    _train(phase_one, model, arch)
    export = _save(tmp_path, model, "fine", arch, "phase1",
                   meta={"stage": "descend", "method_options": phase_one.config.to_dict()})
    phase_two = get_method("fine", {"train": "all"})  # default reinit: ignored when continuing phase 1
    torch.manual_seed(3)
    dense = phase_two.build(arch, task, export)
    phase_two.mark_trainable(dense)  # as the trainer does, once, after build
    assert type(dense) is DiT and not any(isinstance(m, SharedFactorLinear) for m in dense.modules())
    assert torch.equal(dense.y_embedder.embedding_table.weight, model.y_embedder.embedding_table.weight)
    x, y, t = _batch(arch)
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(x, t, y), model.eval()(x, t, y), rtol=0, atol=1e-5)
    assert all(p.requires_grad for n, p in dense.named_parameters() if n != "pos_embed")
    _step_changes_only_trainables(phase_two, dense, arch)
    with pytest.raises(MethodError, match="phase-1"):
        phase_two.build(_arch(3), task, export)


def test_phase_one_as_an_ancestry_job_with_a_teacher(fine_ancestry, tmp_path):
    """The plan's way to chain runs: phase 1 is an ancestry of method fine whose teacher is the FINE ancestry."""
    method = get_method("fine", {"class_table": "inherit"})
    torch.manual_seed(4)
    model = method.build_ancestry(_arch(2), CLASSES, teacher=fine_ancestry)
    method.mark_trainable(model)  # as the trainer does, once, after build_ancestry
    assert model.fine_phase == "sigma" and len(model.blocks) == 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"blocks.{i}.{t}.sigma" for i in range(2) for t in BLOCK_TYPES}
    export = _save(tmp_path, model, "fine", _arch(2), "phase1",
                   meta={"stage": "ancestry", "ancestry": {"path": fine_ancestry.path},
                         "method_options": method.config.to_dict()})
    dense = get_method("fine", {"train": "all"}).build(_arch(2), Task("descend", CLASSES, "descend"), export)
    assert torch.equal(dense.y_embedder.embedding_table.weight, model.y_embedder.embedding_table.weight)
    with pytest.raises(MethodError, match="needs train"):
        get_method("fine", {"train": "all"}).build_ancestry(_arch(2), CLASSES, teacher=fine_ancestry)
    # A pre-trained FINE ancestry (no teacher) is not mistaken for phase 1: phase 2 straight from it re-initialises.
    assert not get_method("fine").build(_arch(2), Task("descend", CLASSES, "descend"), fine_ancestry) \
        .y_embedder.embedding_table.weight.equal(fine_ancestry.state["y_embedder.embedding_table.weight"])


def test_build_errors(fine_ancestry, dense_ancestry):
    task = Task("descend", CLASSES, "descend")
    with pytest.raises(MethodError, match="cannot build from an ancestry of method 'scratch'"):
        get_method("fine").build(_arch(2), task, dense_ancestry)
    with pytest.raises(MethodError, match="hidden_size"):
        get_method("fine").build(ArchSpec(name="DiT-T/2-d2-w128", input_size=8, in_channels=4), task, fine_ancestry)
    with pytest.raises(MethodError, match="a new label space needs class_table"):
        get_method("fine", {"class_table": "inherit"}).build(_arch(2), Task("new", 3, "transfer"), fine_ancestry)
    with pytest.raises(MethodError, match="through class_table"):
        get_method("fine", {"reinit": ("y_embedder",)})
    with pytest.raises(MethodError, match="class_table must be one of"):
        get_method("fine", {"class_table": "keep"})
    with pytest.raises(MethodError, match="train must be one of"):
        get_method("fine", {"train": "both"})
    with pytest.raises(MethodError, match="sigma_init must be one of"):
        get_method("fine", {"sigma_init": "zeros"})
    with pytest.raises(MethodError, match="block matrix types"):
        get_method("fine", {"targets": ("final_layer.linear",)})


def test_subset_of_types_factorises_only_those(tmp_path):
    method = get_method("fine", {"targets": ("attn.qkv", "mlp.fc2"), "rank": 16})
    model = _randomised(method.build_ancestry(ANCESTOR, CLASSES))
    assert model.fine_U_attn_qkv.shape == (3 * 64, 16) and not hasattr(model, "fine_U_mlp_fc1")
    ancestry = _save(tmp_path, model, "fine", ANCESTOR, "subset")
    descendant = get_method("fine")
    child = descendant.build(_arch(2), Task("descend", CLASSES, "descend"), ancestry)  # follows the ancestry
    descendant.mark_trainable(child)  # as the trainer does, once, after build
    assert isinstance(child.blocks[1].mlp.fc2, SharedFactorLinear)
    assert type(child.blocks[1].mlp.fc1) is torch.nn.Linear and not child.blocks[1].mlp.fc1.weight.requires_grad
    # Unfactorised block matrices follow relative depth like the biases.
    assert torch.equal(child.blocks[1].mlp.fc1.weight, ancestry.state["blocks.3.mlp.fc1.weight"])


# --------------------------------------------------------------------------------------------------------------
#                                      "w/o factorize": per-layer SVD init
# --------------------------------------------------------------------------------------------------------------


def test_depth_mapping_helpers():
    assert [nearest_layer(i, 2, 4) for i in range(2)] == [0, 3]
    assert [nearest_layer(i, 6, 4) for i in range(6)] == [0, 1, 1, 2, 2, 3]
    layers = [torch.full((2,), float(i)) for i in range(3)]
    assert [v[0].item() for v in interpolate_layers(layers, 5)] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_nofactor_descendant_takes_per_layer_top_r_svd(dense_ancestry):
    arch, task = _arch(2), Task("descend", CLASSES, "descend")
    full = get_method("fine_nofactor", {"reinit": (), "rank": 64}).build(arch, task, dense_ancestry)  # r = d: a copy
    for layer, source in enumerate([0, 3]):
        for target in BLOCK_TYPES:
            torch.testing.assert_close(full.blocks[layer].get_submodule(target).weight,
                                       dense_ancestry.state[f"blocks.{source}.{target}.weight"], atol=1e-5, rtol=0)
    method = get_method("fine_nofactor", {"rank": 8})
    low = method.build(arch, task, dense_ancestry)
    method.mark_trainable(low)  # as the trainer does, once, after build
    source = dense_ancestry.state["blocks.3.mlp.fc1.weight"].double()
    u, s, vh = torch.linalg.svd(source, full_matrices=False)
    expected = (u[:, :8] * s[:8]) @ vh[:8]
    torch.testing.assert_close(low.blocks[1].mlp.fc1.weight.double(), expected, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(low.blocks[1].mlp.fc1.weight, rtol=1e-4).item() == 8
    assert torch.equal(low.blocks[1].mlp.fc1.bias, dense_ancestry.state["blocks.3.mlp.fc1.bias"])
    _step_changes_only_trainables(method, low, arch)


# --------------------------------------------------------------------------------------------------------------
#                                      Shared tensors under DeepSpeed ZeRO-3
# --------------------------------------------------------------------------------------------------------------

ZERO3_WORKER = r'''
"""2 CPU ranks, ZeRO-3 with every parameter partitioned (persistence threshold 0): FINE's ancestry trains."""
import copy, importlib, json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, deepspeed
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip the 30 s JIT build
deepspeed.init_distributed(dist_backend="gloo")
from methods import ArchSpec, get_method
from baselines.fine_layers import SharedFactorLinear

torch.manual_seed(0)
arch = ArchSpec(name="DiT-T/2-d3", input_size=8, in_channels=4, class_dropout_prob=0.0)  # no random label drop
method = get_method("fine")
model = method.build_ancestry(arch, 10)
reference = copy.deepcopy(model)  # trained by plain torch on both ranks' data: what ZeRO-3 must reproduce
groups = method.mark_trainable(model)
optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2)
config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "gradient_clipping": 0.0, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
shared = engine.module.fine_U_attn_qkv
seen = []  # per forward: the U every qkv layer computed with
for block in engine.module.blocks:
    block.attn.qkv.register_forward_hook(lambda mod, inp, out: seen[-1].append(mod.factors[0].detach().clone()))
rank = torch.distributed.get_rank()
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 4, 8, 8, generator=g); t = torch.randint(0, 1000, (4,), generator=g)
y = torch.randint(0, 10, (4,), generator=g); target = torch.randn(4, 8, 8, 8, generator=g)
ref_optimizer = torch.optim.AdamW([p for g in method.mark_trainable(reference) for p in g["params"]], lr=1e-2)
for step in range(4):
    ref_optimizer.zero_grad()
    (reference(x, t, y) - target).square().mean().backward()
    ref_optimizer.step()
mine = slice(2 * rank, 2 * rank + 2)
x, t, y, target = x[mine], t[mine], y[mine], target[mine]
losses = []
for step in range(4):
    seen.append([])
    loss = (engine(x, t, y) - target).square().mean()
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
same_in_blocks = all(all(torch.equal(u, views[0]) for u in views) for views in seen)
full_shape = all(v[0].shape == (3 * 64, 64) for v in seen)
changed = all(not torch.equal(seen[i][0], seen[i + 1][0]) for i in range(len(seen) - 1))
digest = torch.tensor([float(v[0].double().sum()) for v in seen])
gathered = [torch.zeros_like(digest) for _ in range(2)]
torch.distributed.all_gather(gathered, digest)
with deepspeed.zero.GatheredParameters([shared, engine.module.fine_V_mlp_fc2]):
    matches = [torch.allclose(shared, reference.fine_U_attn_qkv, atol=1e-5),
               torch.allclose(engine.module.fine_V_mlp_fc2, reference.fine_V_mlp_fc2, atol=1e-5)]
if rank == 0:
    json.dump({"partitioned": shared.numel() == 0 and shared.ds_numel == 3 * 64 * 64,
               "one_tensor": all(b.attn.qkv.factors[0] is shared for b in engine.module.blocks),
               "layers": sum(isinstance(m, SharedFactorLinear) for m in engine.module.modules()),
               "same_in_blocks": same_in_blocks, "full_shape": full_shape, "changed": changed,
               "ranks_agree": torch.equal(gathered[0], gathered[1]), "matches_reference": all(matches),
               "losses": losses}, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_shared_factors_under_zero3_stay_one_tensor_and_train(tmp_path):
    worker = tmp_path / "zero3_fine.py"
    worker.write_text(ZERO3_WORKER)
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["partitioned"], "ZeRO-3 did not partition the shared factor: the test would prove nothing"
    assert result["one_tensor"] and result["layers"] == 3 * len(BLOCK_TYPES)
    assert result["same_in_blocks"] and result["full_shape"] and result["ranks_agree"]
    assert result["changed"], "the shared factor did not train"
    assert result["matches_reference"], "ZeRO-3 trained the shared factors differently from one plain process"
    losses = result["losses"]
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses)) and losses[-1] < losses[0]


@pytest.mark.slow
def test_two_phase_recipe_through_the_trainer(run_train, tmp_path):
    """bench.run.train end to end: ZeRO-3 ancestry on 2 ranks, phase 1 at another depth, phase 2 from phase 1."""
    common = ["--method.name=fine", "--schedule.steps=3"]
    ancestry = run_train(*common, "--engine.backend=deepspeed", "--engine.zero_stage=3", nproc=2, out="anc")
    assert ancestry.returncode == 0, ancestry.stderr[-3000:]
    exported = load_file(str(ancestry.run_dir / "export.safetensors"))
    assert "fine_U_attn_qkv" in exported and not any(k.endswith("attn.qkv.weight") for k in exported)
    phase1 = run_train(*common, "--method.stage=descend", "--model.arch=DiT-T/2-d1",
                       f"--run.ancestry={ancestry.run_dir / 'export.safetensors'}", out="p1")
    assert phase1.returncode == 0, phase1.stderr[-3000:]
    # the same data, so the same label space: class_table = "auto" keeps the ancestry's class table (frozen in phase 1)
    table = "y_embedder.embedding_table.weight"
    assert torch.equal(load_file(str(phase1.run_dir / "export.safetensors"))[table], exported[table])
    phase2 = run_train(*common, "--method.stage=descend", "--model.arch=DiT-T/2-d1",
                       "--method.options.train=\"all\"", f"--run.ancestry={phase1.run_dir / 'export.safetensors'}",
                       out="p2")
    assert phase2.returncode == 0, phase2.stderr[-3000:]
    assert all(v == v for v in phase1.losses() + phase2.losses())
    summary = json.loads((phase1.run_dir / "summary.json").read_text())
    assert summary["accounting"]["params_trainable"] < summary["accounting"]["params_total"] / 5
    final = load_file(str(phase2.run_dir / "export.safetensors"))
    assert "blocks.0.attn.qkv.weight" in final and "fine_U_attn_qkv" not in final


def test_the_class_table_is_kept_exactly_when_the_label_space_is_the_ancestrys(fine_ancestry, tmp_path):
    """FINE's depth protocol trains every size on ImageNet-1K: phase 1 must not re-draw the class table."""
    recorded = _save(tmp_path, _randomised(get_method("fine").build_ancestry(ANCESTOR, CLASSES)), "fine", ANCESTOR,
                     "labelled", meta={"label_space": "imagenet-1k-digest"})
    table = recorded.state["y_embedder.embedding_table.weight"]

    def phase_one(options, label_space, via_ancestry=False):
        method = get_method("fine", options)
        if via_ancestry:  # the suite's way: an ancestry job with the FINE ancestry as its teacher
            model = method.build_ancestry(_arch(2), CLASSES, teacher=recorded, label_space=label_space)
        else:
            model = method.build(_arch(2), Task("descend", CLASSES, "descend", label_space), recorded)
        method.mark_trainable(model)
        return model

    for via_ancestry in (False, True):
        same = phase_one({}, "imagenet-1k-digest", via_ancestry)
        assert torch.equal(same.y_embedder.embedding_table.weight, table)
        assert not same.y_embedder.embedding_table.weight.requires_grad  # inherited: frozen in phase 1, as U, V
        for other in ("another-digest", None):  # another or an unknown label space: a new table, trained
            drawn = phase_one({}, other, via_ancestry)
            assert not torch.equal(drawn.y_embedder.embedding_table.weight, table)
            assert drawn.y_embedder.embedding_table.weight.requires_grad
    redrawn = phase_one({"class_table": "redraw"}, "imagenet-1k-digest")
    assert not torch.equal(redrawn.y_embedder.embedding_table.weight, table)
    assert torch.equal(phase_one({"class_table": "inherit"}, None).y_embedder.embedding_table.weight, table)


def test_the_nofactor_ablation_keeps_fines_budget_not_a_copy(dense_ancestry):
    """At r = d the "w/o factorize" ablation would be a plain weight copy; by default each of the L target blocks
    keeps round(d / L) triplets, FINE's number of transferred values at its default rank d."""
    for depth in (2, 3):
        model = get_method("fine_nofactor").build(_arch(depth), Task("descend", CLASSES, "descend"), dense_ancestry)
        weight = model.blocks[0].mlp.fc1.weight
        assert torch.linalg.matrix_rank(weight, rtol=1e-4).item() == round(64 / depth)


def test_the_factorised_ancestry_starts_with_the_weight_norms_of_dits_init():
    """Random matrices share no bases: diag(Uᵀ W V) alone kept about 1 % of each weight's energy at width 64, so
    FINE's ancestry started nearly zero (FINE at scratch level on the tiny suite's deeper task); now each block
    matrix starts with the Frobenius norm of DiT's own initial weight."""
    from methods import get_method_class

    torch.manual_seed(5)
    stock = get_method_class("scratch")().build_ancestry(ANCESTOR, CLASSES)
    torch.manual_seed(5)
    model = get_method("fine").build_ancestry(ANCESTOR, CLASSES)  # same seed: the same DiT weights before the SVD
    for target in BLOCK_TYPES:
        for index, block in enumerate(model.blocks):
            dense = stock.blocks[index].get_submodule(target).weight
            factorised = block.get_submodule(target).weight_matrix()
            if not dense.any():  # adaLN-Zero stays zero
                assert not factorised.any()
                continue
            assert factorised.norm().item() == pytest.approx(dense.norm().item(), rel=1e-5), (target, index)
