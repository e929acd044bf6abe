"""Draw class-conditional samples from a trained run into an ADM-style ``.npz`` (``arr_0``, uint8 NHWC).

    python -m bench.run.sample --run-dir runs/<run_id> [--sample.num_samples=50000 --sample.cfg_scale=1.5 ...]
    torchrun --nproc_per_node 8 -m bench.run.sample --run-dir runs/<run_id>

The model is rebuilt from the run's ``config.json`` and ``export.safetensors`` (fp32 EMA) and put in the form its
method samples with (``Method.sampling_model``: merged into a plain DiT for most methods). The sampling settings are
this command's own (``SampleConfig`` defaults, then ``--sample.*``; a suite's sample job passes its protocol): a
training run's config holds none. Sample ``i`` takes its
label, initial noise and every step's noise from its own generator
seeded by ``(sample.seed, i)``: the samples do not depend on the world size or on restarts. Work is cut into
chunks of ``per_proc_batch`` consecutive samples (chunk k goes to rank k mod world), each written atomically to
``parts/``; a restart skips finished chunks. Rank 0 then writes the ``.npz`` in index order, a grid PNG and
``labels.npy``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.config.schema import ConfigError, RunConfig, SampleConfig, from_dict, section_from_overrides
from bench.data.grid import save_grid
from bench.diffusion import GaussianDiffusion
from bench.diffusion.sampling import sample
from bench.metrics.sample_io import to_uint8_dit, write_samples_npz
from bench.progress import progress_bar
from bench.records.atomic import atomic_path
from bench.run.batching import derive_seed
from bench.run.engine import DistContext, barrier, init_distributed, shutdown
from bench.run.rundir import RunDir, RunDirBusy
from bench.run.train import ancestry_path
from methods import Task, get_method
from methods.transfer import load_export

#: Seed streams (distinct from training's): labels and diffusion noise of sample i.
LABEL_STREAM, NOISE_STREAM = 0x1AB, 0x5A3


def sample_tag(cfg: SampleConfig, steps_trained: int, clip_denoised: bool = False) -> str:
    """Every sampling knob in the name (DiT's folder names omitted steps and count)."""
    return (f"step{steps_trained:07d}--cfg{cfg.cfg_scale:g}--{cfg.scheduler}{cfg.num_steps}--n{cfg.num_samples}"
            f"--{cfg.label_mode}--seed{cfg.seed}" + ("--clip" if clip_denoised else ""))


def load_run_model(run_dir: Path) -> tuple[torch.nn.Module, RunConfig, dict[str, Any]]:
    """The run's EMA model, rebuilt by its method in the form it samples with (``Method.sampling_model``: a merged
    plain DiT unless the method keeps a cheaper or gate-aware form), plus its config and export meta."""
    run = RunDir(run_dir)
    config_path, export_path = run.config, run.export
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: is {run_dir} a kindbench run directory?")
    if not export_path.is_file():
        raise FileNotFoundError(f"{export_path} is missing: the run has not finished training")
    cfg = from_dict(json.loads(config_path.read_text()))
    cfg.run.out_dir = str(run_dir.parent)  # the runs root may have moved since training
    export = load_export(export_path)
    method = get_method(cfg.method.name, cfg.method.options)
    if cfg.method.stage == "ancestry":
        model = method.build_ancestry(export.arch, export.num_classes)
    else:
        parent = load_export(ancestry_path(cfg)) if cfg.run.ancestry else None
        task = Task(cfg.run.name or cfg.data.split, export.num_classes, cfg.method.stage,
                    export.meta.get("label_space"))
        model = method.build(export.arch, task, parent)
    missing, unexpected = model.load_state_dict(export.state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{export_path} does not match the model its method builds "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    sampled = method.sampling_model(model)
    sampled.eval()
    return sampled, cfg, export.meta


def sample_labels(cfg: SampleConfig, indices: range, num_classes: int) -> torch.Tensor:
    if cfg.label_mode == "balanced":
        return torch.tensor([i % num_classes for i in indices])
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        derive_seed(cfg.seed, LABEL_STREAM, i)))) for i in indices])


def _decoder(cfg: RunConfig, s: SampleConfig, device: torch.device):
    """Latents -> images in [-1, 1]: the VAE for latent models, identity in pixel space."""
    if cfg.model.in_channels == 3:
        return lambda x: x
    from bench.models.vae import decode, load_vae

    vae = load_vae(s.vae_dir or None, device=device)
    return lambda x: decode(vae, x)


def clips_denoised(cfg: RunConfig, s: SampleConfig) -> bool:
    """``sample.clip_denoised`` resolved: ``auto`` clips in pixel space (3 channels) and never for latents."""
    return s.clip_denoised == "true" or (s.clip_denoised == "auto" and cfg.model.in_channels == 3)


def draw_chunk(model: torch.nn.Module, cfg: RunConfig, s: SampleConfig, indices: range, device: torch.device,
               decoder) -> tuple[np.ndarray, np.ndarray]:
    labels = sample_labels(s, indices, model.num_classes)
    generators = [torch.Generator(device).manual_seed(derive_seed(s.seed, NOISE_STREAM, i)) for i in indices]
    shape = (model.in_channels, model.input_size, model.input_size)
    diffusion = GaussianDiffusion(cfg.diffusion.num_timesteps, cfg.diffusion.beta_schedule, model.learn_sigma)
    x = sample(model, labels.to(device), shape=shape, scheduler=s.scheduler, num_steps=s.num_steps,
               cfg_scale=s.cfg_scale, guide_channels=s.guide_channels or None, generators=generators,
               diffusion=diffusion, clip_denoised=clips_denoised(cfg, s))
    with torch.no_grad():
        images = decoder(x)
    if not torch.isfinite(images).all():  # uint8 conversion would turn NaN into black images that score as real
        raise ValueError(f"samples {indices.start}..{indices.stop - 1} are not finite (NaN or inf): the run's "
                         "weights or the sampler diverged; no images were written")
    return to_uint8_dit(images.permute(0, 2, 3, 1)), labels.numpy()


def _readable_part(part: Path) -> bool:
    """A finished chunk of an earlier call: it exists and reads back whole (zip CRCs checked), else it is redrawn."""
    if not part.exists():
        return False
    try:
        with np.load(part) as data:
            data["images"], data["labels"]  # noqa: B018 - reading them checks the CRC of each member
        return True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        part.unlink(missing_ok=True)
        return False


def sample_config(overrides: list[str]) -> SampleConfig:
    """``SampleConfig`` defaults with ``--sample.key=value`` overrides (typed and checked like ``kindbench train``)."""
    return section_from_overrides(SampleConfig, "sample", overrides)


def sample_run(run_dir: Path, s: SampleConfig, ctx: DistContext) -> dict[str, Any]:
    """Sample the run in ``run_dir`` with the settings ``s`` (every rank calls it); returns the sample record on
    every rank. Finished chunks of an interrupted call with the same settings are reused."""
    model, cfg, meta = load_run_model(run_dir)
    clip = clips_denoised(cfg, s)
    tag = sample_tag(s, int(meta.get("steps", 0)), clip)
    with RunDir(run_dir).exclusive(f"sampler-{tag}", ctx.rank):  # a second sampler of these settings refuses
        npz = _draw_all(RunDir(run_dir), model, cfg, s, ctx, tag)
    out_dir = npz.parent
    return {"npz": str(npz), "labels": str(out_dir / "labels.npy"), "grid_png": str(out_dir / "grid.png"),
            "num_samples": s.num_samples, "scheduler": s.scheduler, "num_steps": s.num_steps,
            "cfg_scale": s.cfg_scale, "guide_channels": s.guide_channels, "label_mode": s.label_mode,
            "seed": s.seed, "tag": tag, "per_sample_seeding": True, "world_size": ctx.world_size,
            "clip_denoised": clip, "config": dataclasses.asdict(s)}


def _draw_all(run: RunDir, model: torch.nn.Module, cfg: RunConfig, s: SampleConfig, ctx: DistContext,
              tag: str) -> Path:
    """Every rank draws its chunks (reusing readable ones of an earlier call); rank 0 joins them into the .npz."""
    out_dir = run.samples(tag)
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    model.to(ctx.device)
    decoder = _decoder(cfg, s, ctx.device)
    chunks = range(0, s.num_samples, s.per_proc_batch)
    mine = [k for k in range(len(chunks)) if k % ctx.world_size == ctx.rank]
    with progress_bar(len(mine) if ctx.is_main else 0, f"sampling {run.path.name}") as advance:
        for k in mine:
            part = parts / f"chunk_{k:06d}.npz"
            if not _readable_part(part):
                start = chunks[k]
                images, labels = draw_chunk(model, cfg, s, range(start, min(start + s.per_proc_batch, s.num_samples)),
                                            ctx.device, decoder)
                with atomic_path(part, suffix=".tmp.npz") as tmp:  # .npz suffix: np.savez would append one
                    np.savez(tmp, images=images, labels=labels)
            advance(1)
    barrier(ctx)
    npz = out_dir / "samples.npz"
    if ctx.is_main:
        files = [parts / f"chunk_{k:06d}.npz" for k in range(len(chunks))]
        write_samples_npz(npz, (np.load(f)["images"] for f in files), s.num_samples)
        labels = np.concatenate([np.load(f)["labels"] for f in files])
        np.save(out_dir / "labels.npy", labels)
        first = np.concatenate([np.load(f)["images"] for f in files[: max(1, 64 // s.per_proc_batch + 1)]])[:64]
        save_grid(first, out_dir / "grid.png", nrow=8)
    barrier(ctx)
    return npz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kindbench sample", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments: --sample.key=value overrides.")
    parser.add_argument("--run-dir", required=True, type=Path, help="a trained run directory (runs/<run_id>)")
    args, overrides = parser.parse_known_args(argv)
    try:
        settings = sample_config(overrides)
    except ConfigError as err:
        print(f"kindbench sample: error: {err}", file=sys.stderr)
        return 2
    ctx = init_distributed(RunConfig().engine)
    try:
        record = sample_run(args.run_dir, settings, ctx)
    except (ConfigError, FileNotFoundError, ValueError, RunDirBusy) as err:
        print(f"kindbench sample: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
