"""The config tree (docs/harness.md §5.1): precedence CLI > file > defaults, strict keys and types, hashing,
run ids."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from bench.config.schema import (
    ConfigError,
    EvalConfig,
    RunConfig,
    SampleConfig,
    from_dict,
    load_config,
    parse_override,
    save_resolved,
    section_from_overrides,
)


def write_toml(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message


# ---- defaults and precedence ---------------------------------------------------------------------------------


def test_defaults_match_dit_recipe():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.optim.lr == 1e-4 and cfg.optim.grad_clip == 0.0 and cfg.optim.weight_decay == 0.0
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.schedule.global_batch == 256 and cfg.schedule.ema_decay == 0.9999
    assert cfg.engine.backend == "ddp" and cfg.engine.zero_stage == 0 and cfg.engine.precision == "fp32"
    assert cfg.method.name == "scratch" and cfg.method.options == {}
    assert cfg.diffusion.num_timesteps == 1000


def test_file_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = write_toml(tmp_path, '[optim]\nlr = 3e-4\n[model]\narch = "DiT-S/2"\n')
    cfg = load_config(path)
    assert cfg.optim.lr == 3e-4
    assert cfg.model.arch == "DiT-S/2"
    assert cfg.optim.betas == RunConfig().optim.betas  # untouched keys keep their defaults
    assert cfg.schedule == RunConfig().schedule


def test_cli_overrides_file(tmp_path):
    path = write_toml(tmp_path, "[optim]\nlr = 3e-4\nweight_decay = 0.1\n")
    cfg = load_config(path, ["--optim.lr=2e-4"])
    assert cfg.optim.lr == 2e-4  # CLI beats the file
    assert cfg.optim.weight_decay == 0.1  # the file beats the default
    assert cfg.optim.eps == 1e-8  # the default stays where neither says anything


def test_cli_overrides_without_file_and_later_cli_wins():
    cfg = load_config(None, ["--schedule.steps=7", "schedule.steps=9"])
    assert cfg.schedule.steps == 9


# ---- override parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("item, key, value", [
    ("--optim.lr=2e-4", "optim.lr", 2e-4),
    ("optim.lr=2e-4", "optim.lr", 2e-4),
    ("--schedule.steps=12", "schedule.steps", 12),
    ("--model.learn_sigma=false", "model.learn_sigma", False),
    ("--engine.tf32=true", "engine.tf32", True),
    ("--optim.betas=[0.9,0.95]", "optim.betas", [0.9, 0.95]),
    ("--model.arch=DiT-B/2", "model.arch", "DiT-B/2"),
    ("--data.root=/data/imagenet/train", "data.root", "/data/imagenet/train"),
    ('--run.name="quoted"', "run.name", "quoted"),
    ("--data.root=a=b", "data.root", "a=b"),  # only the first '=' separates key and value
])
def test_parse_override(item, key, value):
    parsed_key, parsed_value = parse_override(item)
    assert parsed_key == key
    assert parsed_value == value
    assert type(parsed_value) is type(value)


def test_parse_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="optim.lr") as err:
        parse_override("--optim.lr")
    one_line(err)


def test_overrides_reach_typed_fields():
    cfg = load_config(None, ["--optim.betas=[0.9,0.95]", "--model.arch=DiT-B/2", "--model.learn_sigma=false",
                             "--schedule.global_batch=64"])
    assert cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert cfg.model.arch == "DiT-B/2"
    assert cfg.model.learn_sigma is False
    assert cfg.schedule.global_batch == 64


# ---- unknown keys and wrong types ----------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, suggestion", [
    ("--optim.lrr=1e-4", "optim.lrr", "optim.lr"),
    ("--optm.lr=1e-4", "optm", "optim"),
    ("--schedule.global_bach=8", "schedule.global_bach", "schedule.global_batch"),
])
def test_unknown_key_names_key_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = one_line(err)
    assert repr(key) in message
    assert suggestion in message and "did you mean" in message


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = write_toml(tmp_path, "[engine]\nzero_stag = 2\n")
    with pytest.raises(ConfigError, match=r"engine\.zero_stag.*engine\.zero_stage"):
        load_config(path)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--optim.zzzzzzzz=1"])
    message = one_line(err)
    assert "optim.zzzzzzzz" in message and "lr" in message and "betas" in message


@pytest.mark.parametrize("override, key, expected, got", [
    ("--optim.lr=abc", "optim.lr", "float", "str"),
    ("--schedule.steps=1.5", "schedule.steps", "int", "float"),
    ("--schedule.steps=true", "schedule.steps", "int", "bool"),
    ("--engine.tf32=1", "engine.tf32", "bool", "int"),
])
def test_wrong_type_names_key_and_types(override, key, expected, got):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = one_line(err)
    assert repr(key) in message
    assert f"expects {expected}" in message and f"got {got}" in message


def test_cli_text_for_string_fields_stays_text():
    """A string field takes the override as typed, even when it reads as a number, bool or date."""
    cfg = load_config(None, ["--run.name=123", "--data.root=true", "--run.name=2024-05-01"])
    assert cfg.run.name == "2024-05-01" and cfg.data.root == "true"
    assert section_from_overrides(SampleConfig, "sample", ["--sample.vae_dir=3"]).vae_dir == "3"


def test_training_configs_hold_no_sampling_or_metric_settings():
    """Sampling and scoring are the sample and evaluate jobs' own settings, never a training config's."""
    with pytest.raises(ConfigError, match="unknown config key 'sample'"):
        load_config(None, ["--sample.num_steps=10"])
    assert "sample" not in RunConfig().to_dict() and "eval" not in RunConfig().to_dict()


@pytest.mark.parametrize("section,cls,override,message", [
    ("sample", SampleConfig, "--sample.num_step=10", "did you mean 'sample.num_steps'"),
    ("sample", SampleConfig, "--sample.num_steps=ten", "expects int"),
    ("eval", EvalConfig, "--eval.extractr=inception", "did you mean 'eval.extractor'"),
    ("eval", EvalConfig, "--eval.ref_per_class=1.5", "expects int"),
    ("eval", EvalConfig, "--eval.extractor=clip", "eval.extractor must be"),
])
def test_protocol_sections_are_typed_with_did_you_mean(section, cls, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        section_from_overrides(cls, section, [override])


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch.*DiT-Q/2"):
        load_config(None, ["--model.arch=DiT-Q/2"])
    assert load_config(None, ["--model.arch=DiT-T/2-d3"]).model.arch == "DiT-T/2-d3"


def test_run_name_never_becomes_a_path():
    assert "/" not in load_config(None, ["--run.name=a/b"]).run_id()


def test_wrong_type_in_file_is_an_error(tmp_path):
    path = write_toml(tmp_path, '[optim]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"optim\.lr.*float.*str"):
        load_config(path)


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["--optim.lr=1", "--optim.betas=[0,0.5]"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.0, 0.5) and all(type(b) is float for b in cfg.optim.betas)


def test_tuple_of_wrong_length_is_an_error():
    with pytest.raises(ConfigError, match=r"optim\.betas.*2 values"):
        load_config(None, ["--optim.betas=[0.9]"])


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'optim'.*table"):
        load_config(None, ["--optim=3"])


# ---- files -----------------------------------------------------------------------------------------------------


def test_malformed_toml_names_the_file(tmp_path):
    path = write_toml(tmp_path, "[optim\nlr = = 1\n", name="broken.toml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "TOML" in str(err.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in one_line(err)


# ---- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, fragment", [
    ("--engine.zero_stage=5", "engine.zero_stage"),
    ("--engine.precision=fp16", "engine.precision"),
    ("--schedule.ema_decay=1.0", "schedule.ema_decay"),
    ("--engine.backend=horovod", "engine.backend"),
    ("--method.stage=finetune", "method.stage"),
    ("--optim.lr=0", "optim.lr"),
    ("--optim.betas=[0.9,1.0]", "optim.betas"),
])
def test_validation_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in one_line(err)


def test_validation_accepts_the_edges():
    cfg = load_config(None, ["--engine.zero_stage=3", "--engine.precision=bf16", "--schedule.ema_decay=0.0"])
    assert (cfg.engine.zero_stage, cfg.engine.precision, cfg.schedule.ema_decay) == (3, "bf16", 0.0)


def test_method_options_pass_through(tmp_path):
    path = write_toml(tmp_path, '[method]\nname = "lora"\n[method.options]\nrank = 8\n'
                                'targets = ["attn.qkv", "mlp.fc1"]\nnested = { a = 1 }\n')
    cfg = load_config(path, ["--method.options.alpha=16"])
    assert cfg.method.name == "lora"
    assert cfg.method.options == {"rank": 8, "targets": ["attn.qkv", "mlp.fc1"], "nested": {"a": 1}, "alpha": 16}


# ---- hashing and run ids ---------------------------------------------------------------------------------------


def test_config_hash_is_stable_for_equal_configs(tmp_path):
    path = write_toml(tmp_path, "[optim]\nlr = 3e-4\n")
    a, b = load_config(path), load_config(None, ["--optim.lr=3e-4"])
    assert a == b
    assert a.config_hash() == b.config_hash()
    assert re.fullmatch(r"[0-9a-f]{8}", a.config_hash())
    assert RunConfig().config_hash() == RunConfig().config_hash()


@pytest.mark.parametrize("override", [
    "--model.arch=DiT-S/2", "--model.input_size=16", "--method.name=lora", "--method.stage=ancestry",
    "--method.options.rank=4", "--data.split=novel", "--data.seed=1", "--diffusion.num_timesteps=500",
    "--optim.lr=2e-4", "--optim.betas=[0.9,0.95]", "--optim.grad_clip=1.0", "--schedule.global_batch=128",
    "--schedule.micro_batch=8", "--schedule.ema_decay=0.999", "--engine.backend=deepspeed", "--engine.zero_stage=2",
    "--engine.precision=bf16", "--engine.seed=1", "--run.name=novel-a",
    "--run.ancestry=runs/a/export.safetensors",
])
def test_config_hash_changes_with_any_hashed_field(override):
    base = RunConfig()
    changed = load_config(None, [override])
    assert changed != base, f"{override} equals the default; pick another value"
    assert changed.config_hash() != base.config_hash(), override


@pytest.mark.parametrize("override", [
    "--schedule.log_every=7", "--schedule.ckpt_every=7", "--schedule.keep_checkpoints=5", "--data.num_workers=3",
    "--data.root=/other/mount/imagenet", "--data.latent_dir=/other/latents", "--run.out_dir=elsewhere",
    "--run.resume=false", "--run.stop_after_steps=3",
])
def test_bookkeeping_and_paths_do_not_change_the_hash(override):
    """Cadence, workers and machine paths do not change the trained model, so not its id."""
    assert load_config(None, [override]).config_hash() == RunConfig().config_hash()


def test_every_field_that_changes_the_model_is_hashed():
    """Walk the whole tree: changing any leaf outside ``run``, ``sample`` and the listed bookkeeping/path fields
    must change the hash."""
    from bench.config.schema import UNHASHED

    base = RunConfig()
    base_hash = base.config_hash()
    checked = 0
    for section in dataclasses.fields(base):
        if section.name in ("run", "sample"):
            continue
        sub = getattr(base, section.name)
        for leaf in dataclasses.fields(sub):
            if (section.name, leaf.name) in UNHASHED:
                continue
            value = getattr(sub, leaf.name)
            data = base.to_dict()
            data[section.name][leaf.name] = _different(value)
            try:
                changed = from_dict(data)
            except ConfigError:
                continue  # the changed value is invalid for this field (enumerations); covered above
            assert changed.config_hash() != base_hash, f"{section.name}.{leaf.name} is not hashed"
            checked += 1
    assert checked > 25


def _different(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return [v / 2 for v in value]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise AssertionError(f"unhandled field type {type(value)}")


@pytest.mark.parametrize("override", ["--run.out_dir=/elsewhere", "--run.resume=false"])
def test_bookkeeping_fields_do_not_change_the_hash(override):
    assert load_config(None, [override]).config_hash() == RunConfig().config_hash()


def test_ancestry_changes_the_hash():
    a = load_config(None, ["--run.ancestry=runs/a/export.safetensors"])
    b = load_config(None, ["--run.ancestry=runs/b/export.safetensors"])
    assert len({a.config_hash(), b.config_hash(), RunConfig().config_hash()}) == 3


def test_run_id_format():
    cfg = load_config(None, ["--method.name=lora", "--run.name=novel-a", "--model.arch=DiT-B/2", "--engine.seed=3"])
    run_id = cfg.run_id()
    assert re.fullmatch(r"lora--novel-a--DiT-B-2--s3--[0-9a-f]{8}", run_id), run_id
    assert run_id.endswith(cfg.config_hash())
    assert "/" not in run_id


def test_run_id_defaults_name_to_split_and_honours_explicit_id():
    cfg = load_config(None, ["--data.split=novel"])
    assert cfg.run_id().startswith("scratch--novel--DiT-T-2--s0--")
    assert load_config(None, ["--run.id=my-run"]).run_id() == "my-run"


def test_run_id_ignores_out_dir():
    assert load_config(None, ["--run.out_dir=/a"]).run_id() == load_config(None, ["--run.out_dir=/b"]).run_id()


# ---- saving the resolved config --------------------------------------------------------------------------------


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(None, ["--optim.betas=[0.9,0.95]", "--method.name=lora", "--method.options.rank=4",
                             "--method.options.targets=['attn.qkv']", "--run.ancestry=a/export.safetensors",
                             "--engine.precision=bf16"])
    path = tmp_path / "deep" / "config.json"
    save_resolved(cfg, path)
    data = json.loads(path.read_text())
    assert data["optim"]["betas"] == [0.9, 0.95]
    assert data["method"]["options"] == {"rank": 4, "targets": ["attn.qkv"]}
    restored = from_dict(data)
    assert restored == cfg
    assert restored.config_hash() == cfg.config_hash()
    assert not list(path.parent.glob("*.tmp"))  # the temp file was renamed, not left behind
