"""Training checkpoints: exact resume of model, optimizer, scheduler, EMA and step.

Layout under the run directory::

    checkpoints/0001000/      one folder per optimizer step (7 digits, DiT's convention)
        engine.pt | deepspeed/   what the backend wrote (model, optimizer, scheduler)
        ema.safetensors          fp32 EMA of the trainable parameters
        state.json               step, config hash, what the data position is
        DONE                     written last, after every rank finished: a folder without it is ignored

Nothing else needs saving: data order, noise and label drops are pure functions of (seed, step, sample) (see
``bench.run.batching``), so the step *is* the data position and the RNG state. Resume picks the highest step with a
DONE marker, never the newest file or the largest one (LightningDiT's resume bug).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bench.run.ema import EMA
from bench.run.engine import DistContext, EngineError, TrainEngine, barrier
from bench.run.rundir import RunDir


class CheckpointError(RuntimeError):
    """A checkpoint is unusable (corrupt, from another config); the message names the file."""


class Checkpoints:
    def __init__(self, run: RunDir, ctx: DistContext, keep: int = 2):
        self.root = run.checkpoints
        self.ctx = ctx
        self.keep = keep

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every finished checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            if folder.name.isdigit() and (folder / "DONE").is_file():
                found.append((int(folder.name), folder))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, engine: TrainEngine, ema: EMA, meta: dict[str, Any]) -> Path:
        """Every rank calls this (the backends save collectively); rank 0 writes the EMA, state and marker."""
        folder = self.root / f"{step:07d}"
        if self.ctx.is_main:
            if folder.exists():  # a half-written folder from a killed attempt at the same step
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        barrier(self.ctx)
        engine.save(folder)
        if self.ctx.is_main:
            save_file(ema.state_dict(), str(folder / "ema.safetensors"))
            (folder / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
        barrier(self.ctx)
        if self.ctx.is_main:
            (folder / "DONE").write_text(str(step))
            self._prune()
        barrier(self.ctx)
        return folder

    def load(self, folder: Path, engine: TrainEngine, ema: EMA, config_hash: str) -> dict[str, Any]:
        """Restore a checkpoint written by ``save``; raises CheckpointError naming the file on any problem."""
        state_path = folder / "state.json"
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"checkpoint state {state_path} is unreadable: {err}") from None
        if state.get("config_hash") != config_hash:
            raise CheckpointError(f"checkpoint {folder} was written by a different config "
                                  f"({state.get('config_hash')} != {config_hash}); use a new run id or delete it")
        try:
            engine.load(folder)
        except EngineError as err:
            raise CheckpointError(str(err)) from None
        ema_path = folder / "ema.safetensors"
        try:
            ema.load_state_dict(load_file(str(ema_path)))
        except (OSError, SafetensorError, ValueError) as err:
            raise CheckpointError(f"EMA file {ema_path} is corrupt or does not match the model: {err}") from None
        return state

    def _prune(self) -> None:
        done = self.complete()
        for _, folder in done[:-self.keep]:
            shutil.rmtree(folder, ignore_errors=True)
