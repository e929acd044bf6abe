"""The only place that knows torch.distributed, DDP and DeepSpeed.

``init_distributed`` reads torchrun's variables, else SLURM's (``srun`` with one task per device), else runs a
single process. ``build_engine`` wraps a model and its trainable parameter groups for the configured backend behind
one interface (forward, ``backward``, ``step``, checkpoint save/load, exact fp32 parameter gathering for the EMA),
so ``bench.run.train`` has one loop for every backend (docs/harness.md §9.6: no per-backend training scripts).

The DeepSpeed JSON is generated from the config tree here, never hand-kept, and ``gradient_clipping`` is always
written explicitly: DeepSpeed >= 0.19.3 clips at 1.0 when the key is absent (docs/harness.md §5.2), DiT never clipped.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import math
import os
import pickle
import re
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bench.config.schema import EngineConfig, OptimConfig, ScheduleConfig
from bench.records.atomic import atomic_path


class EngineError(RuntimeError):
    """The distributed setup or a backend operation failed; the message says what to fix."""


# --------------------------------------------------------------------------------------------------------------
#                                        Process group from torchrun / SLURM
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    """torch.distributed backend in use (``gloo``/``nccl``), or ``none`` for a single process without a group."""
    launcher: str
    """``torchrun``, ``slurm`` or ``single``."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend != "none"


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in parts + [current] if p]


def _expand_one(name: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if not match:
        return [name]
    prefix, ranges, rest = match.groups()
    out = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_one(f"{prefix}{str(i).zfill(len(lo))}{rest}"))  # rest may hold more brackets
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``n[1-3,7],gpu-a[01-02]-ib`` into host names (no scontrol needed)."""
    return [host for item in _split_top_level(nodelist) for host in _expand_one(item)]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        raise EngineError("SLURM launch without SLURM_JOB_NODELIST: cannot find the master node")
    try:
        return expand_hostlist(nodelist)[0]
    except (ValueError, IndexError):
        # An exotic node-list syntax: ask SLURM itself.
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_launch_env() -> str:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* present (what env:// and DeepSpeed need); return the launcher."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        # Same port on every task of the job, distinct between jobs sharing a node.
        os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def init_distributed(cfg: EngineConfig) -> DistContext:
    """Join (or create) the process group: gloo on CPU, nccl on GPU, unless ``cfg.dist_backend`` says otherwise."""
    launcher = _export_launch_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # LOCAL_RANK, never RANK: on node 2 the global rank exceeds the local device count (DiT issue #79).
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise EngineError("engine.dist_backend = nccl needs a GPU; use gloo (or auto) on CPU")
    # DeepSpeed needs a process group even for one process; DDP at world size 1 needs none.
    needs_group = world > 1 or cfg.backend == "deepspeed"
    if needs_group and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=float(os.environ.get("KINDBENCH_DIST_TIMEOUT_MIN", "30")))
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "timeout": timeout}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device,
                       backend=backend if needs_group else "none", launcher=launcher)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small float tensor (logging, loss curves); a copy, in float64 for exactness."""
    out = values.detach().to(torch.float64).clone()
    if ctx.distributed:
        out = out.to(ctx.device)
        dist.all_reduce(out)
        out /= ctx.world_size
    return out.cpu()


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (collective)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------------------------------------------
#                                              Batch geometry
# --------------------------------------------------------------------------------------------------------------


def batch_geometry(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation steps) keeping ``global_batch`` fixed across world sizes."""
    if global_batch % world_size:
        raise EngineError(f"schedule.global_batch={global_batch} is not divisible by world size {world_size}")
    per_rank = global_batch // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise EngineError(f"schedule.micro_batch={micro} does not divide the per-rank batch {per_rank} "
                          f"(global_batch {global_batch} / world size {world_size})")
    return micro, per_rank // micro


# --------------------------------------------------------------------------------------------------------------
#                                                 Backends
# --------------------------------------------------------------------------------------------------------------


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the method's named groups; weight decay only on tensors with >= 2 dims (nanoGPT)."""
    param_groups = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        lr = optim.lr * float(group.get("lr_scale", 1.0))
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        for subset, wd, suffix in ((decay, optim.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if subset:
                param_groups.append({"params": subset, "lr": lr, "initial_lr": lr, "weight_decay": wd,
                                     "name": f"{group.get('name', 'params')}.{suffix}"})
    if not param_groups:
        raise EngineError("the method marked no parameter trainable; nothing to optimise")
    # foreach=False keeps the update order identical between backends and world sizes.
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=False)


def lr_factor(step: int, warmup_steps: int, decay: str = "constant", total_steps: int = 0) -> float:
    """The learning-rate multiplier after ``step`` optimiser steps: linear warm-up over ``warmup_steps``, then
    constant (DiT) or, with ``decay = "cosine"``, a half cosine from 1 to 0 at ``total_steps`` (short CPU runs:
    annealing is what lets a few thousand steps settle)."""
    factor = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    if decay == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, max(0.0, (step - warmup_steps) / (total_steps - warmup_steps)))
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def warmup_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                     total_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a scheduler: linear warm-up to the configured lr, then constant (DiT: no warm-up, constant
    lr) or cosine decay to 0 at ``total_steps`` (``optim.decay``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, optim.decay, total_steps))


class TrainEngine:
    """One training interface over DDP and DeepSpeed.

    Call pattern per micro-batch: ``loss = loss_fn(engine.module_for_forward, ...)``, ``engine.backward(loss)``,
    ``engine.step()``; ``step`` returns True when an optimizer step happened (an accumulation boundary).
    ``backward`` scales the loss by 1/accumulation itself, on both backends.
    """

    def __init__(self, ctx: DistContext, module: nn.Module, accum: int, precision: str):
        self.ctx = ctx
        self.module = module
        """The unwrapped model (owned by the method's structure, with DiT's names)."""
        self.accum = accum
        self.precision = precision
        self.micro_step = 0

    @property
    def forward_module(self) -> nn.Module:
        """The module to call for training forwards (the DDP/DeepSpeed wrapper where there is one)."""
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where configured; the loss itself is computed in fp32 by the caller."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def at_boundary(self) -> bool:
        return (self.micro_step + 1) % self.accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def full_fp32_params(self, params: list[nn.Parameter]) -> Iterable[torch.Tensor]:
        """Exact fp32 values of full (unpartitioned) parameters, in order. A collective on DeepSpeed:
        all ranks call it."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write model + optimizer state under ``directory`` (every rank calls it)."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote (every rank calls it)."""
        raise NotImplementedError


class DDPEngine(TrainEngine):
    """torch DDP (a plain module at world size 1), torch AdamW, optional clipping and warm-up."""

    def __init__(self, ctx: DistContext, module: nn.Module, groups: list[dict[str, Any]], optim: OptimConfig,
                 accum: int, precision: str, total_steps: int = 0):
        super().__init__(ctx, module.to(ctx.device), accum, precision)
        self.optimizer = build_optimizer(groups, optim)
        self.scheduler = warmup_scheduler(self.optimizer, optim, total_steps)
        self.grad_clip = optim.grad_clip
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.wrapped: nn.Module = module
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    @property
    def forward_module(self) -> nn.Module:
        return self.wrapped

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on micro-steps that are not accumulation boundaries."""
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not self.at_boundary:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> bool:
        boundary = self.at_boundary
        self.micro_step += 1
        if not boundary:
            return False
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_fp32_params(self, params: list[nn.Parameter]) -> Iterable[torch.Tensor]:
        return (p.detach().float() for p in params)

    def save(self, directory: Path) -> None:
        if self.ctx.is_main:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "micro_step": self.micro_step}
            with atomic_path(directory / "engine.pt") as tmp:
                torch.save(state, tmp)

    def load(self, directory: Path) -> None:
        path = directory / "engine.pt"
        try:
            state = torch.load(path, map_location=self.ctx.device, weights_only=True)
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.micro_step = int(state["micro_step"])
        except FileNotFoundError:
            raise EngineError(f"checkpoint {directory} has no engine.pt (written by another backend?)") from None
        except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise EngineError(f"checkpoint file {path} is corrupt or incompatible: "
                              f"{(str(err) or type(err).__name__).splitlines()[0]}") from None  # EOFError has no text


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, schedule: ScheduleConfig, micro: int,
                     accum: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the config tree (the only copy of batch sizes and clipping)."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    return {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(optim.grad_clip),  # explicit: the default changed to 1.0 in 0.19.3
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our own logger reports all-reduced losses
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type == "cpu" and os.environ.get("KINDBENCH_DS_SHM_COMM", "0") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op (~30 s of g++) on every fresh CPU machine. gloo is
        # correct without it and CPU runs here are tests, so skip it unless asked (docs/harness.md §11.2).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


class DeepSpeedEngine(TrainEngine):
    """DeepSpeed ZeRO 0-3 with a client torch AdamW (no JIT-built optimizer ops) and a generated config."""

    def __init__(self, ctx: DistContext, module: nn.Module, groups: list[dict[str, Any]], cfg: Any,
                 micro: int, accum: int):
        super().__init__(ctx, module, accum, cfg.engine.precision)
        deepspeed = _import_deepspeed(ctx.device)
        deepspeed.init_distributed(dist_backend=ctx.backend)
        self.ds_config = deepspeed_config(cfg.engine, cfg.optim, cfg.schedule, micro, accum, ctx.world_size)
        optimizer = build_optimizer(groups, cfg.optim)
        scheduler = warmup_scheduler(optimizer, cfg.optim, cfg.schedule.steps)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                config=self.ds_config)
        self.module = self.ds.module
        self.zero_stage = cfg.engine.zero_stage
        # Module weights are the exact master values only for fp32 below ZeRO-3 (replicated, updated in place).
        self._exact_from_module = self.precision == "fp32" and self.zero_stage < 3
        if ctx.device.type == "cuda":
            self.module.to(ctx.device)

    @property
    def forward_module(self) -> nn.Module:
        return self.ds

    @contextlib.contextmanager
    def no_sync(self):
        yield  # DeepSpeed handles accumulation boundaries itself

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        self.micro_step += 1
        return boundary

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def full_fp32_params(self, params: list[nn.Parameter]) -> Iterable[torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        for p in params:
            if self._exact_from_module:
                yield p.detach().float()
                continue
            full = safe_get_full_fp32_param(p)  # collective: every rank walks the same list
            if full is None:
                raise EngineError("DeepSpeed returned no fp32 master for a trainable parameter")
            yield full.detach().float()

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag="deepspeed", client_state={"micro_step": self.micro_step})

    def load(self, directory: Path) -> None:
        try:
            path, client = self.ds.load_checkpoint(str(directory), tag="deepspeed")
        except (RuntimeError, KeyError, EOFError, ValueError, AssertionError) as err:
            raise EngineError(f"DeepSpeed checkpoint under {directory} is corrupt or incompatible: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        if path is None:
            raise EngineError(f"checkpoint {directory} holds no DeepSpeed state (written by another backend?)")
        self.micro_step = int(client["micro_step"])


def build_engine(ctx: DistContext, module: nn.Module, groups: list[dict[str, Any]], cfg: Any,
                 micro: int, accum: int) -> TrainEngine:
    """The configured backend around ``module`` (``cfg`` is a ``bench.config.schema.RunConfig``)."""
    if cfg.engine.backend == "deepspeed":
        return DeepSpeedEngine(ctx, module, groups, cfg, micro, accum)
    if cfg.engine.zero_stage:
        raise EngineError("engine.zero_stage > 0 needs engine.backend = deepspeed")
    return DDPEngine(ctx, module, groups, cfg.optim, accum, cfg.engine.precision, cfg.schedule.steps)
