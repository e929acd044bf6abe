"""The real trainer, run as a subprocess: training, export, exact resume, preemption, bad input.

Multi-process runs (torchrun, gloo, DeepSpeed ZeRO-2/3) are marked slow; .ci/run runs them.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainrun import REPO, TINY_RUN, train_command

from bench.run.preemption import EXIT_REQUEUE
from methods.transfer import load_export


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _one_line_error(result, expected_code: int, needle: str) -> None:
    assert result.returncode == expected_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kindbench train:") and needle in last, last


def _preempted(result) -> None:
    """Stopped early with a checkpoint: exit 75 from a plain process; torchrun turns any worker failure into 1,
    so the PREEMPTED marker in the run directory is what launch scripts check."""
    assert result.returncode in (EXIT_REQUEUE, 1), result.stderr[-2000:]
    assert (result.run_dir / "PREEMPTED").is_file(), result.stderr[-2000:]


def _export(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.run_dir / "export.safetensors"))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------ single process


def test_trains_exports_and_summarises(run_train):
    result = run_train("--schedule.steps=3")
    _ok(result)
    losses = result.losses()
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    ancestry = load_export(result.run_dir / "export.safetensors")
    assert ancestry.method == "scratch" and ancestry.arch.name == "DiT-T/2"
    assert all(v.dtype == torch.float32 for v in ancestry.state.values())
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "success" and summary["steps"] == 3 and summary["images_seen"] == 24
    assert summary["accounting"]["params_trainable"] > 0
    # the EMA moved away from the initial weights but only slightly (decay 0.9999, 3 steps)
    assert (result.run_dir / "checkpoints" / "0000003" / "DONE").is_file()


def test_resume_in_a_new_process_is_exact(run_train):
    """4 steps in one go == 2 steps, exit, new process, 2 more: model, optimizer, EMA and step all identical."""
    straight = run_train("--schedule.steps=4", "--schedule.ckpt_every=2", out="straight")
    _ok(straight)
    first = run_train("--schedule.steps=4", "--schedule.ckpt_every=2", "--run.stop_after_steps=2", out="split")
    assert first.returncode == EXIT_REQUEUE, first.stderr[-2000:]
    _preempted(first)
    assert not (first.run_dir / "export.safetensors").exists()
    second = run_train("--schedule.steps=4", "--schedule.ckpt_every=2", out="split")
    _ok(second)
    assert not (second.run_dir / "PREEMPTED").exists()
    assert json.loads((second.run_dir / "summary.json").read_text())["resumed_from_step"] == 2

    a = torch.load(straight.run_dir / "checkpoints/0000004/engine.pt", weights_only=True)
    b = torch.load(second.run_dir / "checkpoints/0000004/engine.pt", weights_only=True)
    _assert_same_tensors(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_tensors(sa, sb)
    _assert_same_tensors(_export(straight), _export(second))
    assert straight.losses() == second.losses()  # the resumed log continues the same curve, no duplicates


def _signal_a_long_run(tmp_path, signum) -> tuple[list[str], Path, str]:
    """Start a (practically endless) run, send ``signum`` once it logs, and check it checkpointed for requeue."""
    out = tmp_path / "runs"
    cmd = train_command(1) + TINY_RUN + [f"--run.out_dir={out}", "--schedule.steps=100000",
                                         "--schedule.ckpt_every=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/train.jsonl")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, stderr[-2000:]
    (run_dir,) = out.iterdir()
    return cmd, run_dir, stderr


def test_sigusr1_checkpoints_and_next_start_resumes(tmp_path):
    cmd, run_dir, _ = _signal_a_long_run(tmp_path, signal.SIGUSR1)
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "DONE").exists())
    assert len(done) == 1
    stopped_at = int(done[0])
    assert 0 < stopped_at < 100000

    # The next start (same config, but fewer total steps would change the run id: keep it) resumes there.
    again = subprocess.run(cmd + ["--run.stop_after_steps=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == EXIT_REQUEUE, again.stderr[-2000:]
    latest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if (p / "DONE").exists())
    assert latest == stopped_at + 1


def test_ctrl_c_checkpoints_like_sigterm(tmp_path):
    """An interactive run interrupted with Ctrl-C keeps its progress: SIGINT checkpoints at the next step."""
    _, run_dir, stderr = _signal_a_long_run(tmp_path, signal.SIGINT)
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if (p / "DONE").exists()], "no checkpoint written"
    assert "Traceback" not in stderr


def test_run_id_must_be_a_plain_name(run_train):
    _one_line_error(run_train("--run.id=../escaped"), 2, "run.id '../escaped' must be a plain name")


# ------------------------------------------------------------------------------------------------ bad input


def test_unknown_config_key_is_a_one_line_error(run_train):
    _one_line_error(run_train("--optim.lrr=1e-4"), 2, "unknown config key 'optim.lrr'")


def test_wrong_type_is_a_one_line_error(run_train):
    _one_line_error(run_train("--schedule.steps=ten"), 2, "expects int")


def test_missing_data_path_is_a_one_line_error(run_train, tmp_path):
    missing = tmp_path / "no-such-imagenet"
    result = run_train("--data.source=imagefolder", f"--data.root={missing}", "--data.class_list=example")
    _one_line_error(result, 1, str(missing))


def test_corrupt_checkpoint_is_a_one_line_error(run_train):
    first = run_train("--schedule.steps=4", "--schedule.ckpt_every=2", "--run.stop_after_steps=2")
    assert first.returncode == EXIT_REQUEUE, first.stderr[-2000:]
    engine_file = first.run_dir / "checkpoints/0000002/engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:100])
    _one_line_error(run_train("--schedule.steps=4", "--schedule.ckpt_every=2"), 1, str(engine_file))


def test_diverging_loss_stops_with_a_clear_error_and_keeps_checkpoints(run_train):
    result = run_train("--schedule.steps=20", "--schedule.ckpt_every=1", "--optim.lr=1e30")
    _one_line_error(result, 1, "non-finite loss at step")
    done = [p for p in (result.run_dir / "checkpoints").iterdir() if (p / "DONE").exists()]
    assert done, "the checkpoints written before the divergence must survive"


# ------------------------------------------------------------------------------------------------ distributed

FP32_BACKENDS = [
    ("ddp-ws1", 1, ["--engine.backend=ddp"]),
    ("ddp-ws2", 2, ["--engine.backend=ddp"]),
    ("zero2-ws2", 2, ["--engine.backend=deepspeed", "--engine.zero_stage=2"]),
    ("zero3-ws2", 2, ["--engine.backend=deepspeed", "--engine.zero_stage=3"]),
]


@pytest.mark.slow
def test_world_sizes_and_backends_give_the_same_training(run_train):
    """At equal global batch every backend and world size follows the same loss curve and reaches the same EMA
    (fp32; only the order of float reductions differs). ZeRO-3's EMA gathers partitioned fp32 masters."""
    results = {}
    for name, nproc, extra in FP32_BACKENDS:
        result = run_train("--schedule.steps=3", "--schedule.ema_decay=0.5", *extra, nproc=nproc, out=name)
        _ok(result)
        results[name] = result
    reference = results["ddp-ws1"]
    for name, result in results.items():
        assert result.losses() == pytest.approx(reference.losses(), rel=1e-5, abs=1e-6), name
        _assert_same_tensors(_export(reference), _export(result), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_trains_and_resumes_exactly(run_train, stage):
    common = ["--engine.backend=deepspeed", f"--engine.zero_stage={stage}", "--engine.precision=bf16",
              "--schedule.steps=4", "--schedule.ckpt_every=2", "--schedule.ema_decay=0.5"]
    straight = run_train(*common, nproc=2, out="straight")
    _ok(straight)
    first = run_train(*common, "--run.stop_after_steps=2", nproc=2, out="split")
    _preempted(first)
    second = run_train(*common, nproc=2, out="split")
    _ok(second)
    assert all(math.isfinite(v) for v in straight.losses())
    _assert_same_tensors(_export(straight), _export(second))
    assert all(v.dtype == torch.float32 for v in _export(straight).values())


def test_trains_from_a_vae_latent_cache(run_train, tmp_path):
    """The ImageNet path in miniature: encode once with a (random, local) AutoencoderKL, then train on latents."""
    from diffusers import AutoencoderKL

    from bench.data.latents import build_latent_cache, finalize_latent_cache
    from bench.data.synthetic import SyntheticImages

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    images = SyntheticImages([0, 1, 2], image_size=16, per_class=4)
    build_latent_cache(images, tmp_path / "vae", tmp_path / "latents", batch_size=6, shard_size=8, rank=0,
                       world_size=1)
    finalize_latent_cache(tmp_path / "latents")
    result = run_train("--schedule.steps=2", "--data.source=latents", f"--data.latent_dir={tmp_path / 'latents'}",
                       "--model.in_channels=4", "--model.input_size=8")
    _ok(result)
    assert len(result.losses()) == 2 and all(math.isfinite(v) for v in result.losses())
    assert load_export(result.run_dir / "export.safetensors").num_classes == 3


def test_missing_latent_cache_is_a_one_line_error(run_train, tmp_path):
    missing = tmp_path / "no-latents"
    result = run_train("--data.source=latents", f"--data.latent_dir={missing}", "--model.in_channels=4",
                       "--model.input_size=8")
    _one_line_error(result, 1, str(missing))


@pytest.mark.slow
def test_srun_style_launch_from_slurm_variables(tmp_path):
    """Two plain processes with only SLURM's variables (what ``srun`` gives each task) form one 2-rank job."""
    import os

    out = tmp_path / "runs"
    cmd = train_command(1) + TINY_RUN + [f"--run.out_dir={out}", "--schedule.steps=2"]
    base = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT"}}
    procs = []
    for rank in range(2):
        env = {**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(4000 + os.getpid() % 1000),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2 and summary["micro_batch"] == 4


def test_kindbench_latents_encodes_an_imagefolder(tmp_path):
    """The command that builds the ImageNet suites' latent caches, on a tiny folder and a tiny random VAE."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from bench.data.encode import main as encode_main
    from bench.data.latents import LatentDataset

    for folder in ("n01", "n02"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "images" / folder / f"{i}.png")
    (tmp_path / "list.txt").write_text("cat n01\ndog n02\n")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(tmp_path / "vae")
    args = ["--root", str(tmp_path / "images"), "--class-list", str(tmp_path / "list.txt"), "--vae",
            str(tmp_path / "vae"), "--out", str(tmp_path / "latents"), "--image-size", "16"]
    assert encode_main(args) == 0
    cache = LatentDataset(tmp_path / "latents")
    assert len(cache) == 6 and cache.num_classes == 2 and cache.latent_shape == (4, 8, 8)
    assert encode_main(args[:-6] + ["--vae", str(tmp_path / "no-vae"), "--out", str(tmp_path / "x"),
                                    "--image-size", "16"]) == 1
