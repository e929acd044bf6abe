"""Train a DiT with any registered method, on any backend: one loop.

    python -m bench.run.train --config run.toml --optim.lr=2e-4
    torchrun --nproc_per_node 2 -m bench.run.train --config run.toml --engine.backend=deepspeed --engine.zero_stage=2
    srun python -m bench.run.train --config run.toml          # one task per device; ranks from SLURM variables

The run lives in ``<run.out_dir>/<run_id>/``: ``config.json``, ``train.jsonl``, ``checkpoints/``, and at the end
``export.safetensors`` (fp32 EMA weights + metadata, what sampling and downstream stages load) and
``summary.json``. A second start with the same config resumes from the newest complete checkpoint. SIGUSR1/SIGTERM
make the trainer checkpoint and exit with ``EXIT_REQUEUE`` so a SLURM requeue resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.config.schema import ConfigError, RunConfig, load_config, save_resolved
from bench.data.factory import build_dataset
from bench.data.identity import data_identity, label_space
from bench.diffusion import GaussianDiffusion
from bench.records.atomic import atomic_path, write_json_atomic
from bench.records.environment import environment
from bench.run.batching import GlobalBatchPlan, MicroBatch, derive_seed, flip_flags, sample_draws
from bench.run.checkpoint import CheckpointError, Checkpoints
from bench.run.ema import EMA
from bench.run.engine import (
    DistContext,
    EngineError,
    TrainEngine,
    any_rank,
    barrier,
    batch_geometry,
    build_engine,
    init_distributed,
    shutdown,
)
from bench.run.preemption import EXIT_REQUEUE, PreemptionWatch
from bench.run.rundir import RunDir, RunDirBusy
from bench.run.trainlog import TrainLog
from methods import Export, Method, MethodError, Task, get_method
from methods.transfer import load_export, save_export

#: File in the run directory saying the last attempt stopped early with a checkpoint (see ``mark_preempted``).

#: Seed stream of model construction (distinct from the data and noise streams of bench.run.batching).
INIT_STREAM = 0x1417


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; no checkpoint is written from the diverged state."""


class Preempted(Exception):
    """A stop was requested; a checkpoint was written."""


# --------------------------------------------------------------------------------------------------------------
#                                                   Setup
# --------------------------------------------------------------------------------------------------------------


def build_model(cfg: RunConfig, num_classes: int) -> tuple[Method, torch.nn.Module, Export | None]:
    """The method's model for this run's stage, built on the CPU (the engine moves it).

    Construction is seeded from ``engine.seed``: every rank and every restart builds the same initial weights.
    """
    method = get_method(cfg.method.name, cfg.method.options)
    torch.manual_seed(derive_seed(cfg.engine.seed, INIT_STREAM))
    arch = cfg.model.arch_spec()
    if cfg.method.stage == "ancestry":
        method.require_stage("ancestry")
        # An ancestry run may learn from a teacher ancestry (TLEG, SWS, WAVE distil a pre-trained dense DiT).
        teacher = load_export(ancestry_path(cfg)) if cfg.run.ancestry else None
        if teacher is not None and not method.teacher_methods:
            raise ConfigError(f"run.ancestry is set, but method {method.name!r} pre-trains its ancestry from scratch "
                              "and takes no teacher")
        model = method.build_ancestry(arch, num_classes, teacher=teacher, label_space=label_space(cfg.data) or None)
        return method, model, teacher
    method.require_stage(cfg.method.stage)
    ancestry = load_export(ancestry_path(cfg)) if cfg.run.ancestry else None
    task = Task(cfg.run.name or cfg.data.split, num_classes, cfg.method.stage, label_space(cfg.data) or None)
    return method, method.build(arch, task, ancestry), ancestry


def ancestry_path(cfg: RunConfig) -> Path:
    """``run.ancestry`` as given, or relative to ``run.out_dir`` (how plans write it, so that run ids do not depend
    on where the runs root is mounted)."""
    path = Path(os.path.expandvars(cfg.run.ancestry)).expanduser()
    if not path.is_absolute() and not path.exists() and (Path(cfg.run.out_dir) / path).exists():
        return Path(cfg.run.out_dir) / path
    return path


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Frozen parameters and buffers as built: they never change, so the export takes them from here, exactly,
    rather than from a backend that may hold them in bf16 or partitioned."""
    # state_dict's keys, not named_parameters/named_buffers: a tensor shared by several layers (VeRA's projections)
    # is listed under every owner there (as the rebuilt model expects), and non-persistent buffers (OFT's index
    # tables) are left out, as load_state_dict expects.
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: (value.detach().float() if name in params else value.detach()).cpu().clone()
            for name, value in model.state_dict(keep_vars=True).items()
            if not (name in params and params[name].requires_grad)}


class TrainView(Dataset):
    """Items keyed by ``(index, flip)``: the flip is decided by the batch plan, applied here (in loader workers).

    Pixel datasets give ``(image, label)`` and flip the image. Latent caches give ``(mean, std, label)`` of the
    posterior of the image or of its mirror image (flipping a latent is not encoding the flipped image); the
    trainer draws the posterior sample itself from the per-sample stream.
    """

    def __init__(self, dataset: Dataset, latents: bool):
        self.dataset, self.latents = dataset, latents

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]):
        index, flip = key
        if self.latents:
            mean, std = self.dataset.moments(index, flipped=flip)
            return mean, std, int(self.dataset.labels[index])
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label


class RankMicroBatches(Sampler[list[tuple[int, bool]]]):
    """This rank's micro-batches from ``start_step`` on as ``(index, flip)`` keys, for a DataLoader's batch_sampler."""

    def __init__(self, plan: GlobalBatchPlan, ctx: DistContext, accum: int, start_step: int, steps: int,
                 seed: int, flip: bool):
        self.plan, self.ctx, self.accum, self.start, self.steps = plan, ctx, accum, start_step, steps
        self.seed, self.flip = seed, flip

    def __iter__(self):
        for step in range(self.start, self.steps):
            for mb in self.plan.micro_batches(step, self.ctx.rank, self.ctx.world_size, self.accum):
                flips = flip_flags(self.seed, step, mb.positions) if self.flip else [False] * len(mb.indices)
                yield list(zip(mb.indices, flips))

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum


def make_loader(dataset: Dataset, sampler: RankMicroBatches, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


# --------------------------------------------------------------------------------------------------------------
#                                                 One step
# --------------------------------------------------------------------------------------------------------------


def micro_step_loss(cfg: RunConfig, engine: TrainEngine, method: Method, diffusion: GaussianDiffusion,
                    batch: list[torch.Tensor], mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Diffusion loss (+ the method's regulariser) of one micro-batch, with per-sample reproducible draws."""
    latents = len(batch) == 3
    x0, y = batch[0], batch[-1]
    draws = sample_draws(cfg.engine.seed, mb.step, mb.positions, tuple(x0.shape[1:]), diffusion.num_timesteps,
                         cfg.model.class_dropout_prob, posterior=latents)
    if latents:  # a posterior sample of the VAE latent (LightningDiT: moments stored, sample drawn per step)
        x0 = x0 + batch[1] * draws.posterior_eps
    device = engine.ctx.device
    x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True)
    kwargs = {"y": y}
    if cfg.model.class_dropout_prob > 0:
        kwargs["force_drop_ids"] = draws.drop_label.to(device)
    with engine.autocast():
        terms = diffusion.training_losses(engine.forward_module, x0, draws.timesteps.to(device), kwargs,
                                          noise=draws.noise.to(device))
        batch_view = {"x": x0, "y": y, "x_t": terms["x_t"], "t": draws.timesteps.to(device), "model_kwargs": kwargs,
                      "model_output": terms["model_output"]}
        loss = terms["loss"].mean() + method.extra_loss(engine.module, batch_view).float()
    return {"loss": loss, "mse": terms["mse"].mean(), "vb": terms["vb"].mean()}


# --------------------------------------------------------------------------------------------------------------
#                                                  The loop
# --------------------------------------------------------------------------------------------------------------


def train(cfg: RunConfig, ctx: DistContext) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; returns the summary written to ``summary.json``."""
    run_id = cfg.run_id()
    run = RunDir.of(cfg.run.out_dir, run_id)
    watch = PreemptionWatch(cfg.run.max_wall_minutes)  # first: a signal during setup must not kill the job
    try:
        with run.exclusive("trainer", ctx.rank):
            return _train(cfg, ctx, run_id, run, watch)
    finally:
        watch.close()


class DataMismatch(ValueError):
    """The run directory holds a run of other data than this config names (its id leaves data paths out)."""


def claim_data(run: RunDir, identity: dict[str, Any], ctx: DistContext) -> None:
    """Refuse to continue (or call finished) a run on other data than it started on; record the data of a new run."""
    path = run.data_identity
    if path.is_file():
        before = json.loads(path.read_text())
        if before.get("sha256") != identity["sha256"]:
            where = lambda ident: ident.get("resolved") or ident.get("section")  # noqa: E731
            raise DataMismatch(f"run directory {run.path} holds a run of other data ({where(before)}, sha256 "
                               f"{str(before.get('sha256'))[:12]}) than this config names ({where(identity)}, sha256 "
                               f"{identity['sha256'][:12]}): give this run another run.name, or move {run.path} away")
    elif ctx.is_main:
        write_json_atomic(path, identity)


def _train(cfg: RunConfig, ctx: DistContext, run_id: str, run: RunDir, watch: PreemptionWatch) -> dict[str, Any]:
    identity = data_identity(cfg.data)  # first: nothing of another dataset's run may be resumed or overwritten
    claim_data(run, identity, ctx)
    if ctx.is_main:
        save_resolved(cfg, run.config)
    memory = PeakMemory(ctx)
    dataset = build_dataset(cfg.data, cfg.model)
    method, model, ancestry = build_model(cfg, dataset.num_classes)
    groups = method.mark_trainable(model)
    accounting = method.count(model).to_dict() if ctx.is_main else None
    frozen = frozen_snapshot(model)
    micro, accum = batch_geometry(cfg.schedule.global_batch, cfg.schedule.micro_batch, ctx.world_size)
    model.train()  # label dropout must be live for classifier-free guidance
    engine = build_engine(ctx, model, groups, cfg, micro, accum)
    ema = EMA(trainable_params(engine.module), engine)
    checkpoints = Checkpoints(run, ctx, cfg.schedule.keep_checkpoints)

    start_step = 0
    latest = checkpoints.latest() if cfg.run.resume else None
    if latest is not None:
        checkpoints.load(latest[1], engine, ema, cfg.config_hash())
        start_step = latest[0]

    diffusion = GaussianDiffusion(cfg.diffusion.num_timesteps, cfg.diffusion.beta_schedule, cfg.model.learn_sigma)
    plan = GlobalBatchPlan(len(dataset), cfg.schedule.global_batch, cfg.engine.seed)
    steps = cfg.schedule.steps
    sampler = RankMicroBatches(plan, ctx, accum, start_step, steps, cfg.engine.seed, cfg.data.random_flip)
    view = TrainView(dataset, latents=cfg.data.source == "latents")
    batches = iter(make_loader(view, sampler, cfg.data.num_workers))
    log = TrainLog(run, ctx, steps, start_step, cfg.schedule.global_batch)
    meta = {"config_hash": cfg.config_hash(), "run_id": run_id}
    t_start = time.perf_counter()
    last_record: dict[str, Any] | None = None
    try:
        for step in range(start_step, steps):
            for mb in plan.micro_batches(step, ctx.rank, ctx.world_size, accum):
                with engine.no_sync():
                    terms = micro_step_loss(cfg, engine, method, diffusion, next(batches), mb)
                    if any_rank(ctx, not torch.isfinite(terms["loss"]).item()):
                        done = checkpoints.latest()
                        raise NonFiniteLoss(f"non-finite loss at step {step} of run {run_id}; nothing was saved from "
                                            f"this state; the last good checkpoint is "
                                            f"{done[1] if done else 'none (no checkpoint yet)'}")
                    engine.backward(terms["loss"])
                engine.step()
                log.add(terms["loss"], terms["mse"], terms["vb"])
            ema.update(engine, cfg.schedule.ema_decay)
            done_steps = step + 1
            if done_steps % cfg.schedule.log_every == 0 or done_steps == steps:
                last_record = log.flush(done_steps, engine.lr(), {"epoch": plan.epoch_of(done_steps)})
            if cfg.run.stop_after_steps and done_steps - start_step >= cfg.run.stop_after_steps:
                watch.request("run.stop_after_steps")
            stop = any_rank(ctx, watch.requested)
            if stop or done_steps % cfg.schedule.ckpt_every == 0 or done_steps == steps:
                checkpoints.save(done_steps, engine, ema, meta)
            if stop and done_steps < steps:
                reason = watch.requested_by or "a peer rank"
                if ctx.is_main:
                    mark_preempted(run, done_steps, reason)
                raise Preempted(reason)
    finally:
        log.close()

    summary = {"run_id": run_id, "status": "success", "method": cfg.method.name, "stage": cfg.method.stage,
               "data": identity,
               "steps": steps, "resumed_from_step": start_step, "wall_s": time.perf_counter() - t_start,
               "images_seen": steps * cfg.schedule.global_batch, "micro_batch": micro, "grad_accum": accum,
               "final": last_record, "accounting": accounting, "peak_mem_gb": memory.peak_gb(),
               "peak_mem_kind": memory.kind,
               "ancestry": {"path": ancestry.path, "sha256": ancestry.sha256} if ancestry else None,
               "deepspeed_config": getattr(engine, "ds_config", None), "environment": environment(ctx.world_size)}
    if ctx.is_main:
        export(run, cfg, method, dataset.num_classes, {**frozen, **ema.state_dict()}, summary)
        run.preempted.unlink(missing_ok=True)
    barrier(ctx)
    return summary


def mark_preempted(run: RunDir, step: int, reason: str) -> None:
    """Leave ``PREEMPTED`` in the run directory: torchrun reports every non-zero worker exit as 1, so launch
    scripts learn "checkpointed, requeue me" from this file rather than from the exit code alone."""
    run.preempted.write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}))


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """The run's own peak memory, not the process's lifetime peak (a worker process runs many jobs).

    On CUDA: peak allocated bytes since the run started (``reset_peak_memory_stats``). On CPU: growth of the
    resident set over the run: Linux's high-water mark ``VmHWM`` is reset at the start (``/proc/self/clear_refs``)
    and read at the end, minus the resident set at the start. Where the reset is not allowed, the process's
    lifetime peak minus the start is reported instead and ``kind`` says so."""

    def __init__(self, ctx: DistContext):
        self.device = ctx.device
        self.kind = "cuda_max_allocated"
        self.base_kib = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
            self.kind = "cpu_rss_growth"
        except OSError:
            self.kind = "cpu_rss_growth_upper_bound"
        self.base_kib = _proc_status_kib("VmRSS") or 0

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        peak = _proc_status_kib("VmHWM") if self.kind == "cpu_rss_growth" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
        return max(peak - self.base_kib, 0) / 2**20


def export(run: RunDir, cfg: RunConfig, method: Method, num_classes: int, state: dict[str, torch.Tensor],
           summary: dict[str, Any]) -> None:
    """``export.safetensors`` (EMA weights as the method built the model) and ``summary.json``, atomically."""
    save_export(run.export, state, method=method.name, arch=cfg.model.arch_spec(),
                  num_classes=num_classes,
                  meta={"run_id": summary["run_id"], "stage": cfg.method.stage, "steps": summary["steps"],
                        "config_hash": cfg.config_hash(), "method_options": method.config.to_dict(),
                        "ancestry": summary["ancestry"], "label_space": label_space(cfg.data) or None})
    with atomic_path(run.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------------------------
#                                                 Entry point
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    import dataclasses
    import textwrap

    def literal(value: Any) -> str:  # as typed on the command line (a TOML literal; bare words are strings)
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (tuple, list)):
            return "[" + ",".join(literal(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}={literal(v)}" for k, v in value.items()) + "}"
        return '""' if value == "" else str(value)

    # Read from RunConfig at run time, so the help never drifts from the config tree.
    defaults, lines = RunConfig(), []
    for section in dataclasses.fields(RunConfig):
        keys = [f"--{section.name}.{f.name}={literal(getattr(getattr(defaults, section.name), f.name))}"
                for f in dataclasses.fields(getattr(defaults, section.name))]
        lines += [f"  [{section.name}]"] + textwrap.wrap("  ".join(keys), width=116, initial_indent="    ",
                                                         subsequent_indent="    ", break_on_hyphens=False)
    epilog = ("Any other --section.key=value overrides the config (type-checked). Sections, keys and defaults\n"
              "(every field is documented in bench/config/schema.py):\n" + "\n".join(lines))
    parser = argparse.ArgumentParser(prog="kindbench train", description=__doc__.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file (overrides the defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher adds it
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        parser.error(f"overrides must look like --section.key=value, got {bad}")
    return args.config, overrides


def one_line_error(err: BaseException) -> str:
    """The message of ``err`` on one line. An error raised in a DataLoader worker arrives re-raised as "Caught X in
    DataLoader worker process N" followed by the worker's traceback: its last line is the original message."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    return lines[-1].strip() if lines[0].startswith("Caught ") and len(lines) > 1 else lines[0]


def main(argv: list[str] | None = None) -> int:
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"kindbench train: config error: {err}", file=sys.stderr)
        return 2
    ctx = init_distributed(cfg.engine)
    try:
        summary = train(cfg, ctx)
    except Preempted as why:
        if ctx.is_main:
            print(f"kindbench train: stop requested ({why}); checkpoint written, exiting {EXIT_REQUEUE} for requeue",
                  file=sys.stderr)
        return EXIT_REQUEUE
    except (ConfigError, MethodError, CheckpointError, EngineError, NonFiniteLoss, OSError, ValueError,
            RunDirBusy) as err:  # OSError: an unreadable image, a full disk (its message names the file)
        print(f"kindbench train: error: {one_line_error(err)}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print(f"kindbench train: done, run {summary['run_id']} in {summary['wall_s']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
