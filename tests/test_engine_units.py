"""Single-process units of the engine seam: launch env, batch geometry, DeepSpeed JSON, optimizer groups,
preemption, checkpoints and the EMA. No process group of size > 1 is started here (tests/test_train.py does that)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bench.config.schema import EngineConfig, OptimConfig, ScheduleConfig, load_config
from bench.models.dit import build_dit
from bench.run.checkpoint import CheckpointError, Checkpoints
from bench.run.ema import EMA
from bench.run.engine import (
    DDPEngine,
    DistContext,
    EngineError,
    _export_launch_env,
    batch_geometry,
    build_engine,
    build_optimizer,
    deepspeed_config,
    expand_hostlist,
    init_distributed,
)
from bench.run.preemption import EXIT_REQUEUE, PreemptionWatch
from bench.run.rundir import RunDir

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST",
               "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever the code under test exports is removed again after the test.

    ``setenv`` first so monkeypatch records every variable (``delenv`` of an absent one records nothing, and the
    values the engine exports would leak into later tests)."""
    for name in LAUNCH_VARS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    return monkeypatch


# ---- SLURM host lists ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu-a[01-02,07]", ["gpu-a01", "gpu-a02", "gpu-a07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
    ("a[1,3],b5", ["a1", "a3", "b5"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_expand_hostlist_suffix_after_range():
    assert expand_hostlist("n[1-2]-ib") == ["n1-ib", "n2-ib"]
    assert expand_hostlist("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]


# ---- launch environment ----------------------------------------------------------------------------------------


def test_single_process_env(clean_env):
    assert _export_launch_env() == "single"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536


def _set_slurm(env, procid: int, localid: int, ntasks: int, nodelist: str = "gpu-a[01-02]", job: str = "123456"):
    env.setenv("SLURM_PROCID", str(procid))
    env.setenv("SLURM_LOCALID", str(localid))
    env.setenv("SLURM_NTASKS", str(ntasks))
    env.setenv("SLURM_JOB_NODELIST", nodelist)
    env.setenv("SLURM_JOB_ID", job)


def test_slurm_env_is_mapped_to_torch_env(clean_env):
    _set_slurm(clean_env, procid=3, localid=1, ntasks=4)
    assert _export_launch_env() == "slurm"
    assert os.environ["RANK"] == "3"
    assert os.environ["WORLD_SIZE"] == "4"
    assert os.environ["LOCAL_RANK"] == "1"
    assert os.environ["MASTER_ADDR"] == "gpu-a01"  # the first node of the job hosts rank 0
    assert os.environ["MASTER_PORT"] == str(15000 + 123456 % 20000)


def test_slurm_port_is_shared_by_tasks_and_differs_between_jobs(clean_env):
    ports = []
    for procid, job in ((0, "500"), (3, "500"), (0, "501")):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            clean_env.delenv(name, raising=False)
        _set_slurm(clean_env, procid=procid, localid=0, ntasks=4, job=job)
        _export_launch_env()
        ports.append(int(os.environ["MASTER_PORT"]))
    assert ports[0] == ports[1] != ports[2]
    assert all(1024 < p < 65536 for p in ports)


def test_slurm_step_nodelist_wins_over_job_nodelist(clean_env):
    _set_slurm(clean_env, procid=0, localid=0, ntasks=2, nodelist="n[1-4]")
    clean_env.setenv("SLURM_STEP_NODELIST", "n[3-4]")
    _export_launch_env()
    assert os.environ["MASTER_ADDR"] == "n3"


def test_slurm_single_task_is_a_single_process(clean_env):
    _set_slurm(clean_env, procid=0, localid=0, ntasks=1)
    assert _export_launch_env() == "single"
    assert os.environ["WORLD_SIZE"] == "1"


def test_slurm_without_nodelist_is_an_error(clean_env):
    _set_slurm(clean_env, procid=0, localid=0, ntasks=2)
    clean_env.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(EngineError, match="SLURM_JOB_NODELIST"):
        _export_launch_env()


def test_torchrun_env_wins_over_slurm(clean_env):
    _set_slurm(clean_env, procid=3, localid=1, ntasks=4)
    for name, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="2", MASTER_ADDR="10.0.0.9",
                            MASTER_PORT="29500").items():
        clean_env.setenv(name, value)
    assert _export_launch_env() == "torchrun"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "2")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.9", "29500")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_init_distributed_single_ddp_creates_no_group(clean_env):
    ctx = init_distributed(EngineConfig(backend="ddp"))
    assert (ctx.rank, ctx.local_rank, ctx.world_size) == (0, 0, 1)
    assert ctx.device == torch.device("cpu")
    assert ctx.backend == "none" and not ctx.distributed and ctx.is_main
    assert ctx.launcher == "single"
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_init_distributed_nccl_on_cpu_is_an_error(clean_env):
    with pytest.raises(EngineError, match="nccl"):
        init_distributed(EngineConfig(dist_backend="nccl"))
    assert not dist.is_initialized()


# ---- batch geometry and the generated DeepSpeed JSON -----------------------------------------------------------


@pytest.mark.parametrize("global_batch, micro, world, expected", [
    (256, 0, 1, (256, 1)),
    (256, 0, 2, (128, 1)),
    (256, 0, 8, (32, 1)),
    (256, 16, 8, (16, 2)),
    (256, 32, 2, (32, 4)),
    (256, 32, 1, (32, 8)),
])
def test_batch_geometry(global_batch, micro, world, expected):
    got = batch_geometry(global_batch, micro, world)
    assert got == expected
    assert got[0] * got[1] * world == global_batch


def test_batch_geometry_world_size_not_dividing():
    with pytest.raises(EngineError) as err:
        batch_geometry(256, 0, 3)
    assert "256" in str(err.value) and "3" in str(err.value)


def test_batch_geometry_micro_not_dividing():
    with pytest.raises(EngineError) as err:
        batch_geometry(256, 48, 2)
    assert "48" in str(err.value) and "128" in str(err.value)


@pytest.mark.parametrize("grad_clip", [0.0, 1.5])
def test_deepspeed_config_writes_clipping_explicitly(grad_clip):
    cfg = deepspeed_config(EngineConfig(backend="deepspeed"), OptimConfig(grad_clip=grad_clip), ScheduleConfig(),
                           micro=4, accum=2, world_size=2)
    assert "gradient_clipping" in cfg  # absent would mean DeepSpeed's default 1.0 (>= 0.19.3)
    assert cfg["gradient_clipping"] == grad_clip and isinstance(cfg["gradient_clipping"], float)


@pytest.mark.parametrize("zero_stage, precision, micro, accum, world", [
    (0, "fp32", 32, 1, 8), (1, "bf16", 16, 2, 8), (2, "fp32", 8, 4, 1), (3, "bf16", 4, 8, 2),
])
def test_deepspeed_config_batch_triple_precision_and_stage(zero_stage, precision, micro, accum, world):
    engine = EngineConfig(backend="deepspeed", zero_stage=zero_stage, precision=precision)
    cfg = deepspeed_config(engine, OptimConfig(), ScheduleConfig(), micro=micro, accum=accum, world_size=world)
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accum
    assert cfg["train_batch_size"] == micro * accum * world
    assert cfg["bf16"] == {"enabled": precision == "bf16"}
    assert cfg["zero_optimization"]["stage"] == zero_stage
    assert "fp16" not in cfg or not cfg["fp16"].get("enabled")
    json.dumps(cfg)  # DeepSpeed takes it as JSON


def test_deepspeed_config_from_resolved_global_batch():
    run = load_config(None, ["--engine.backend=deepspeed", "--schedule.global_batch=256", "--schedule.micro_batch=16"])
    micro, accum = batch_geometry(run.schedule.global_batch, run.schedule.micro_batch, 4)
    cfg = deepspeed_config(run.engine, run.optim, run.schedule, micro, accum, 4)
    assert cfg["train_batch_size"] == run.schedule.global_batch
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (16, 4)


# ---- optimizer groups -------------------------------------------------------------------------------------------


def _two_groups():
    torch.manual_seed(0)
    body, head, frozen = nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2)
    frozen.requires_grad_(False)
    groups = [{"name": "body", "params": list(body.parameters()) + list(frozen.parameters())},
              {"name": "head", "params": list(head.parameters()), "lr_scale": 0.1}]
    return body, head, frozen, groups


def test_build_optimizer_groups_decay_and_lr_scale():
    body, head, frozen, groups = _two_groups()
    opt = build_optimizer(groups, OptimConfig(lr=1e-3, weight_decay=0.05))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"body.decay", "body.no_decay", "head.decay", "head.no_decay"}
    assert by_name["body.decay"]["params"] == [body.weight] and by_name["body.decay"]["weight_decay"] == 0.05
    assert by_name["body.no_decay"]["params"] == [body.bias] and by_name["body.no_decay"]["weight_decay"] == 0.0
    assert by_name["head.decay"]["params"] == [head.weight] and by_name["head.no_decay"]["params"] == [head.bias]
    assert by_name["body.decay"]["lr"] == pytest.approx(1e-3)
    assert by_name["head.decay"]["lr"] == pytest.approx(1e-4) and by_name["head.no_decay"]["lr"] == pytest.approx(1e-4)
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is frozen.weight or p is frozen.bias for p in all_params)


def test_weight_decay_moves_only_matrices():
    """With zero gradients AdamW's update is pure decay: matrices shrink by (1 - lr*wd), vectors stay."""
    body, head, _, groups = _two_groups()
    opt = build_optimizer(groups, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in [("bw", body.weight), ("bb", body.bias), ("hw", head.weight),
                                                   ("hb", head.bias)]}
    for p in [body.weight, body.bias, head.weight, head.bias]:
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(body.weight.detach(), before["bw"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(head.weight.detach(), before["hw"] * (1 - 0.01 * 0.5))  # lr_scale 0.1
    torch.testing.assert_close(body.bias.detach(), before["bb"], rtol=0, atol=0)
    torch.testing.assert_close(head.bias.detach(), before["hb"], rtol=0, atol=0)


def test_build_optimizer_with_nothing_trainable_is_an_error():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(EngineError, match="trainable"):
        build_optimizer([{"name": "x", "params": list(frozen.parameters())}], OptimConfig())


# ---- preemption ---------------------------------------------------------------------------------------------------


def _wait_until(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_sigusr1_requests_a_stop():
    watch = PreemptionWatch()
    try:
        assert not watch.requested and watch.requested_by is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_until(lambda: watch.requested)
        assert watch.requested_by == "SIGUSR1"
    finally:
        watch.close()


def test_sigterm_requests_a_stop():
    watch = PreemptionWatch()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_until(lambda: watch.requested)
        assert watch.requested_by == "SIGTERM"
    finally:
        watch.close()


def test_wall_clock_budget_requests_a_stop():
    watch = PreemptionWatch(max_wall_minutes=0.1 / 60)  # 0.1 s
    try:
        assert not watch.requested
        time.sleep(0.3)
        assert watch.requested and watch.requested_by == "max_wall_minutes"
    finally:
        watch.close()


def test_no_budget_never_requests():
    watch = PreemptionWatch(max_wall_minutes=0.0)
    try:
        time.sleep(0.05)
        assert not watch.requested
    finally:
        watch.close()


def test_close_restores_previous_handlers():
    seen = []
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        mine = signal.getsignal(signal.SIGUSR1)
        watch = PreemptionWatch()
        assert signal.getsignal(signal.SIGUSR1) != mine
        watch.close()
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) == previous_term
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_until(lambda: seen == [signal.SIGUSR1])
        assert watch.requested_by is None  # the closed watch no longer listens
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)


def test_exit_requeue_is_distinct():
    assert EXIT_REQUEUE not in (0, 1, 2)
    assert 0 < EXIT_REQUEUE < 126  # not a shell-reserved or signal-derived code


# ---- checkpoints and EMA on a real tiny DiT --------------------------------------------------------------------

CPU_CTX = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="none",
                      launcher="single")


def _setup(seed: int = 0, lr: float = 1e-3, dtype: torch.dtype = torch.float32, accum: int = 1):
    torch.manual_seed(seed)
    model = build_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=4).to(dtype)
    cfg = load_config(None, [f"--optim.lr={lr}", "--model.input_size=8"])
    groups = [{"name": "all", "params": list(model.parameters())}]
    engine = build_engine(CPU_CTX, model, groups, cfg, micro=2, accum=accum)
    ema = EMA(dict(model.named_parameters()), engine)
    return cfg, engine, ema


def _train_step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(engine.module.parameters()).dtype
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    t = torch.randint(0, 1000, (2,), generator=g)
    y = torch.randint(0, 4, (2,), generator=g)
    target = torch.randn(2, 8, 8, 8, generator=g)  # DiT zero-inits its output layer: a zero target gives no gradient
    keep_labels = torch.zeros(2, dtype=torch.long)  # the trainer's draws decide label drops, not the global RNG
    out = engine.forward_module(x, t, y, force_drop_ids=keep_labels)
    engine.backward((out.float() - target).pow(2).mean())
    engine.step()


def test_build_engine_at_world_size_one_is_a_plain_module():
    _, engine, _ = _setup()
    assert isinstance(engine, DDPEngine)
    assert engine.forward_module is engine.module  # no DDP wrapper without a process group


def test_build_engine_rejects_zero_stage_on_ddp():
    model = nn.Linear(2, 2)
    cfg = load_config(None, ["--engine.zero_stage=2"])
    with pytest.raises(EngineError, match="zero_stage"):
        build_engine(CPU_CTX, model, [{"name": "all", "params": list(model.parameters())}], cfg, 1, 1)


def test_ddp_engine_steps_only_at_accumulation_boundaries():
    _, engine, _ = _setup(accum=2)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    _train_step(engine, 1)
    assert all(torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    _train_step(engine, 2)
    assert any(not torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    assert engine.micro_step == 2


def test_checkpoint_save_and_latest(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX, keep=2)
    assert ckpts.latest() is None
    _train_step(engine, 1)
    folder = ckpts.save(3, engine, ema, {"config_hash": cfg.config_hash()})
    assert folder == tmp_path / "checkpoints" / "0000003"
    assert {p.name for p in folder.iterdir()} >= {"engine.pt", "ema.safetensors", "state.json", "DONE"}
    assert ckpts.latest() == (3, folder)


def test_checkpoint_round_trip_restores_model_optimizer_and_ema(tmp_path):
    cfg, engine, ema = _setup(seed=0)
    for i in range(2):
        _train_step(engine, i)
        ema.update(engine, 0.5)
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX)
    folder = ckpts.save(2, engine, ema, {"config_hash": cfg.config_hash(), "run_id": "x"})

    _, fresh, fresh_ema = _setup(seed=1)  # other initial weights: everything must come from the files
    state = ckpts.load(folder, fresh, fresh_ema, cfg.config_hash())
    assert state["step"] == 2 and state["run_id"] == "x"
    for (name, a), b in zip(engine.module.state_dict().items(), fresh.module.state_dict().values()):
        assert torch.equal(a, b), name
    for name in ema.shadow:
        assert torch.equal(ema.shadow[name], fresh_ema.shadow[name]), name
    assert fresh.micro_step == engine.micro_step
    # The optimizer moments came back too: the next step is identical on both.
    _train_step(engine, 7)
    _train_step(fresh, 7)
    for (name, a), b in zip(engine.module.state_dict().items(), fresh.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_folder_without_done_is_ignored(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX, keep=5)
    ckpts.save(3, engine, ema, {"config_hash": cfg.config_hash()})
    half = ckpts.save(6, engine, ema, {"config_hash": cfg.config_hash()})
    (half / "DONE").unlink()  # as if killed before the marker was written
    (tmp_path / "checkpoints" / "0000009").mkdir()  # an empty folder from a crash during mkdir/save
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert ckpts.latest()[0] == 3
    assert [s for s, _ in ckpts.complete()] == [3]


def test_save_over_a_half_written_folder_replaces_it(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX)
    stale = tmp_path / "checkpoints" / "0000004"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a killed attempt")
    ckpts.save(4, engine, ema, {"config_hash": cfg.config_hash()})
    assert not (stale / "junk").exists() and (stale / "DONE").is_file()


@pytest.mark.parametrize("damage", [
    "truncate", "empty",
    "garbage",
])
def test_corrupt_engine_file_names_the_file(tmp_path, damage):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX)
    folder = ckpts.save(3, engine, ema, {"config_hash": cfg.config_hash()})
    path = folder / "engine.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint" * 64}[damage])
    _, fresh, fresh_ema = _setup(seed=1)
    with pytest.raises(CheckpointError) as err:
        ckpts.load(folder, fresh, fresh_ema, cfg.config_hash())
    assert str(path) in str(err.value)


def test_missing_engine_file_is_a_checkpoint_error(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX)
    folder = ckpts.save(3, engine, ema, {"config_hash": cfg.config_hash()})
    (folder / "engine.pt").unlink()
    with pytest.raises(CheckpointError, match="engine.pt"):
        ckpts.load(folder, engine, ema, cfg.config_hash())


def test_corrupt_ema_file_names_the_file(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX)
    folder = ckpts.save(3, engine, ema, {"config_hash": cfg.config_hash()})
    path = folder / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        ckpts.load(folder, engine, ema, cfg.config_hash())
    assert str(path) in str(err.value)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX)
    folder = ckpts.save(3, engine, ema, {"config_hash": cfg.config_hash()})
    other = load_config(None, ["--optim.lr=5e-4"]).config_hash()
    with pytest.raises(CheckpointError) as err:
        ckpts.load(folder, engine, ema, other)
    assert str(folder) in str(err.value) and other in str(err.value) and cfg.config_hash() in str(err.value)


def test_unreadable_state_names_the_file(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX)
    folder = ckpts.save(3, engine, ema, {"config_hash": cfg.config_hash()})
    (folder / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json"):
        ckpts.load(folder, engine, ema, cfg.config_hash())


def test_pruning_keeps_the_newest(tmp_path):
    cfg, engine, ema = _setup()
    ckpts = Checkpoints(RunDir(tmp_path), CPU_CTX, keep=2)
    for step in (1, 2, 10, 3):  # saved out of order: pruning goes by step, not by write time
        ckpts.save(step, engine, ema, {"config_hash": cfg.config_hash()})
    assert [s for s, _ in ckpts.complete()] == [3, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000003", "0000010"]


def test_ema_matches_hand_computed_average():
    _, engine, ema = _setup(lr=1e-2)
    decay = 0.7
    expected = {n: p.detach().clone().double() for n, p in engine.module.named_parameters()}
    for k in range(3):
        _train_step(engine, 10 + k)
        ema.update(engine, decay)
        for n, p in engine.module.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach().double()
    moved = 0
    for n, p in engine.module.named_parameters():
        torch.testing.assert_close(ema.shadow[n].double(), expected[n], rtol=1e-6, atol=1e-7)
        moved += not torch.equal(ema.shadow[n], p.detach())
    assert moved > 0  # the EMA lags the weights, so the test compares something that moved


def test_ema_starts_as_exact_copy_and_decay_zero_tracks_weights():
    _, engine, ema = _setup()
    for n, p in engine.module.named_parameters():
        assert torch.equal(ema.shadow[n], p.detach())
        assert ema.shadow[n].data_ptr() != p.data_ptr()  # a copy, not an alias
    _train_step(engine, 3)
    ema.update(engine, 0.0)
    for n, p in engine.module.named_parameters():
        assert torch.equal(ema.shadow[n], p.detach())


def test_ema_stays_fp32_for_a_bf16_model():
    _, engine, ema = _setup(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    # A decay of 0.9999 moves an fp32 shadow by tiny amounts a bf16 tensor could not hold.
    before = {n: v.clone() for n, v in ema.shadow.items()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    ema.update(engine, 0.9999)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    params = dict(engine.module.named_parameters())
    for n, v in ema.shadow.items():
        expected = 0.9999 * before[n].double() + 1e-4 * params[n].detach().double()
        torch.testing.assert_close(v.double(), expected, rtol=0, atol=1e-6)
        assert (v - before[n]).abs().min() > 5e-5, n  # every element moved by ~1e-4
    state = ema.state_dict()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())


def test_ema_load_rejects_mismatched_state():
    _, engine, ema = _setup()
    state = ema.state_dict()
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match=name):
        ema.load_state_dict({**state, name: torch.zeros(1)})


def test_cosine_decay_follows_the_warm_up_and_ends_at_zero_while_constant_keeps_dits_schedule():
    from bench.run.engine import lr_factor

    assert [lr_factor(s, 0) for s in (0, 50, 10_000)] == [1.0, 1.0, 1.0]  # DiT: constant
    assert lr_factor(4, 10) == pytest.approx(0.5)  # linear warm-up, as before
    cosine = [lr_factor(s, 10, "cosine", 110) for s in (4, 10, 60, 110, 500)]
    assert cosine[0] == pytest.approx(0.5) and cosine[1] == pytest.approx(1.0)
    assert cosine[2] == pytest.approx(0.5) and cosine[3] == pytest.approx(0.0) and cosine[4] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="optim.decay must be constant or cosine"):
        OptimConfig(decay="linear")
