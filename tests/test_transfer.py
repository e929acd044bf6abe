"""Run exports and loading (methods.transfer): round trip, clear errors, shape checks, released DiT files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from methods import ArchSpec, MethodError, Task, get_method  # noqa: E402
from methods.base import Export  # noqa: E402
from methods.transfer import (  # noqa: E402
    EXPORT_FORMAT,
    infer_dit_arch,
    load_export,
    load_into,
    load_released_dit,
    save_export,
)

TINY = ArchSpec(name="DiT-T/2", input_size=8)


def random_dit(arch: ArchSpec = TINY, num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = arch.build(num_classes)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture()
def ancestry_file(tmp_path):
    model = random_dit()
    path = tmp_path / "runs" / "anc.safetensors"
    sha = save_export(path, model.state_dict(), method="scratch", arch=TINY, num_classes=10, meta={"step": 7})
    return path, sha, model


# --------------------------------------------------------------------------------------------------------------
#                                                ancestry files
# --------------------------------------------------------------------------------------------------------------


def test_round_trip(ancestry_file):
    path, sha, model = ancestry_file
    ancestry = load_export(path)
    assert (ancestry.method, ancestry.arch, ancestry.num_classes) == ("scratch", TINY, 10)
    assert ancestry.meta == {"step": 7} and ancestry.path == str(path)
    assert sha == ancestry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    expected = model.state_dict()
    assert set(ancestry.state) == set(expected)
    assert all(torch.equal(ancestry.state[k], expected[k]) for k in expected)
    assert [p.name for p in path.parent.iterdir()] == ["anc.safetensors"]  # the temp file was renamed away


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "anc.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_export(missing)


def test_truncated_file_is_a_one_line_error(ancestry_file):
    path, _, _ = ancestry_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MethodError, match="corrupt or truncated") as err:
        load_export(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no safetensors traceback attached


def test_garbage_file_is_an_error(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(MethodError, match="corrupt or truncated"):
        load_export(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(MethodError, match="not a kindbench export"):
        load_export(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": EXPORT_FORMAT, "format_version": "99"})
    with pytest.raises(MethodError, match="format version '99'"):
        load_export(path)


def test_shared_storage_is_saved(tmp_path):
    weight = torch.randn(4, 4)
    state = {"a": weight, "b": weight, "c": weight[0]}  # tied and viewed tensors, which safetensors refuses as is
    path = tmp_path / "tied.safetensors"
    save_export(path, state, method="scratch", arch=TINY, num_classes=3)
    loaded = load_export(path).state
    assert torch.equal(loaded["a"], weight) and torch.equal(loaded["b"], weight)
    assert torch.equal(loaded["c"], weight[0])


# --------------------------------------------------------------------------------------------------------------
#                                             loading into a model
# --------------------------------------------------------------------------------------------------------------


def test_load_into_copies_and_casts():
    source = random_dit(seed=1)
    target = TINY.build(10)
    state = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    report = load_into(target, state)
    assert not report.skipped and len(report.loaded) == len(state)
    for key, value in target.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].float())


def test_wrong_depth_and_width_are_listed():
    bigger = random_dit(ArchSpec(name="DiT-M/2", input_size=8))
    target = TINY.build(10)
    with pytest.raises(MethodError) as err:
        load_into(target, bigger.state_dict())
    message = str(err.value)
    # All of the tiny model's 32 tensors but final_layer.linear.bias (patch pixels, not width) differ in width;
    # DiT-M/2's blocks 2-5 (10 tensors each) are extra.
    assert len(target.state_dict()) == 32
    assert "31 shape mismatches (pos_embed: file (1, 16, 192) vs model (1, 16, 64)" in message
    assert "40 unexpected keys (blocks.2.attn.qkv.weight" in message
    assert "\n" not in message


def test_missing_keys_are_listed_and_nothing_is_loaded():
    source = random_dit(seed=1).state_dict()
    del source["blocks.1.mlp.fc2.bias"]
    target = TINY.build(10)
    before = target.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(MethodError, match=r"1 missing keys \(blocks\.1\.mlp\.fc2\.bias\)"):
        load_into(target, source)
    assert torch.equal(target.blocks[0].attn.qkv.weight, before)


def test_skip_allows_a_new_label_space():
    source = random_dit(num_classes=10).state_dict()
    target = TINY.build(4)
    report = load_into(target, source, skip=("y_embedder",))
    assert report.skipped == ["y_embedder.embedding_table.weight"] == report.ignored
    assert torch.equal(target.blocks[1].mlp.fc1.weight, source["blocks.1.mlp.fc1.weight"])


# --------------------------------------------------------------------------------------------------------------
#                                     ancestry checks in the dense methods
# --------------------------------------------------------------------------------------------------------------


def test_full_loads_every_inherited_tensor(ancestry_file):
    path, _, model = ancestry_file
    built = get_method("full").build(TINY, Task("t", 4), load_export(path))
    source = model.state_dict()
    for key, value in built.state_dict().items():
        if key.startswith("y_embedder."):
            assert value.shape == (5, 64)  # the task's 4 classes + null, freshly drawn
        else:
            assert torch.equal(value, source[key]), key


def test_full_same_classes_without_reinit_keeps_the_table(ancestry_file):
    path, _, model = ancestry_file
    built = get_method("full", {"reinit": ()}).build(TINY, Task("t", 10), load_export(path))
    assert torch.equal(built.y_embedder.embedding_table.weight, model.y_embedder.embedding_table.weight)
    with pytest.raises(MethodError, match="add 'y_embedder'"):
        get_method("full", {"reinit": ()}).build(TINY, Task("t", 4), load_export(path))


def test_ancestry_of_another_arch_is_refused(tmp_path):
    other = ArchSpec(name="DiT-T/4", input_size=8)
    path = tmp_path / "t4.safetensors"
    save_export(path, random_dit(other).state_dict(), method="scratch", arch=other, num_classes=10)
    with pytest.raises(MethodError, match=r"same architecture.*name: ancestry 'DiT-T/4' vs requested 'DiT-T/2'"):
        get_method("lora").build(TINY, Task("t", 4), load_export(path))


def test_the_mlp_gelu_travels_with_the_export_and_a_mismatch_is_refused(tmp_path):
    """The embedded suites train with the exact GELU (bench.models.dit.GELU_FORMS); a transfer that rebuilt their
    ancestries with DiT's tanh form would run other functions than were trained, silently."""
    exact = ArchSpec(name="DiT-T/2", input_size=8, gelu="exact")
    model = random_dit(exact)
    assert model.gelu == "exact" and model.blocks[0].mlp.act.approximate == "none"
    assert TINY.build(10).blocks[0].mlp.act.approximate == "tanh"  # DiT's own
    path = tmp_path / "exact.safetensors"
    save_export(path, model.state_dict(), method="scratch", arch=exact, num_classes=10)
    ancestry = load_export(path)
    assert ancestry.arch == exact
    built = get_method("full").build(exact, Task("t", 4), ancestry)
    assert all(block.mlp.act.approximate == "none" for block in built.blocks)
    with pytest.raises(MethodError, match=r"same architecture.*gelu: ancestry 'exact' vs requested 'tanh'"):
        get_method("lora").build(TINY, Task("t", 4), ancestry)
    with pytest.raises(ValueError, match="gelu must be one of tanh, exact"):
        ArchSpec(name="DiT-T/2", input_size=8, gelu="fast").build(10)


def test_ancestry_of_a_non_dense_method_is_refused(ancestry_file):
    path, _, _ = ancestry_file
    ancestry = load_export(path)
    ancestry.method = "kind"
    with pytest.raises(MethodError, match="cannot build from an ancestry of method 'kind'"):
        get_method("full").build(TINY, Task("t", 4), ancestry)


def test_mislabelled_ancestry_with_wrong_shapes_is_refused():
    # The metadata claims DiT-T/2 but the tensors are DiT-M/2's: the key/shape check still catches it.
    state = random_dit(ArchSpec(name="DiT-M/2", input_size=8)).state_dict()
    ancestry = Export(method="scratch", arch=TINY, num_classes=10, state=state)
    with pytest.raises(MethodError, match="cannot load the ancestry"):
        get_method("full").build(TINY, Task("t", 4), ancestry)


# --------------------------------------------------------------------------------------------------------------
#                                            released DiT checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_released_checkpoint_prefers_ema(tmp_path):
    ema, raw = random_dit(seed=1).state_dict(), random_dit(seed=2).state_dict()
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}}}, path)
    ancestry = load_export(path)  # .pt goes to load_released_dit
    assert (ancestry.method, ancestry.num_classes, ancestry.arch) == ("scratch", 10, TINY)
    assert ancestry.meta == {"source": "released-dit"} and len(ancestry.sha256) == 64
    assert all(torch.equal(ancestry.state[k], ema[k]) for k in ema)
    built = get_method("lora").build(TINY, Task("t", 3), ancestry)
    assert torch.equal(built.blocks[0].attn.qkv.base_layer.weight, ema["blocks.0.attn.qkv.weight"])


def test_released_plain_state_dict_and_arch_inference(tmp_path):
    arch = ArchSpec(name="DiT-T/4", input_size=16, in_channels=3, learn_sigma=False)
    path = tmp_path / "plain.pth"
    torch.save(random_dit(arch, num_classes=7).state_dict(), path)
    ancestry = load_released_dit(path)
    assert ancestry.arch == arch and ancestry.num_classes == 7


def test_released_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="DiT-XL-2-256x256.pt"):
        load_released_dit(tmp_path / "DiT-XL-2-256x256.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(MethodError, match="cannot be read by torch.load"):
        load_released_dit(junk)
    wrong = tmp_path / "wrong.pt"
    torch.save({"args": "hello", "step": 3}, wrong)
    with pytest.raises(MethodError, match="is not a DiT checkpoint"):
        load_released_dit(wrong)
    pickled = tmp_path / "pickled.pt"
    # DiT's own checkpoints pickle an argparse Namespace; weights_only refuses such objects.
    torch.save({"ema": random_dit().state_dict(), "args": Path("/x")}, pickled)
    with pytest.raises(MethodError, match="cannot be read by torch.load"):
        load_released_dit(pickled)


def test_infer_arch_needs_dit_keys():
    with pytest.raises(MethodError, match="not a dense DiT state dict: no x_embedder.proj.weight"):
        infer_dit_arch({"pos_embed": torch.zeros(1, 16, 64)})


def test_a_bit_rotted_export_is_an_error(tmp_path):
    """One value of an export changed after it was written (a bad disk, an edit): loading it fails in one line."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "export.safetensors"
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    save_export(path, state, method="scratch", arch=ArchSpec("DiT-T/2"), num_classes=4)
    assert torch.equal(load_export(path).state["w"], state["w"])
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["w"][0, 1] = 4.3e9
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(MethodError, match="is corrupt: its tensors do not match the checksum"):
        load_export(path)
