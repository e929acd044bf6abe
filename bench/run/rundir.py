"""The layout of one training run's directory, ``<runs root>/<run id>``: the only module that names its files.

Training writes it, sampling reads it, the pipeline points later jobs at it (a run's export, relative to the runs
root so that a results tree survives a move of the runs root).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXPORT_NAME = "export.safetensors"


def export_ref(run_id: str) -> str:
    """The export of run ``run_id`` as configs and records name it: relative to the runs root."""
    return f"{run_id}/{EXPORT_NAME}"


class RunDirBusy(RuntimeError):
    """Another process is already training or sampling in this run directory."""


@dataclass(frozen=True)
class RunDir:
    """One run directory. Every path a run leaves is a property here; nothing else spells a file name."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, runs_root: str | Path, run_id: str) -> RunDir:
        return cls(Path(runs_root) / run_id)

    @property
    def config(self) -> Path:
        """The resolved ``RunConfig`` the run trained with (JSON)."""
        return self.path / "config.json"

    @property
    def export(self) -> Path:
        """The run's EMA weights and how to rebuild its model (``methods.transfer``): what later jobs load."""
        return self.path / EXPORT_NAME

    @property
    def data_identity(self) -> Path:
        """What data the run trains on (``bench.data.identity``): a run directory belongs to one dataset."""
        return self.path / "data.json"

    @property
    def summary(self) -> Path:
        """What training reports when it finishes (steps, losses, accounting, timings)."""
        return self.path / "summary.json"

    @property
    def train_log(self) -> Path:
        """One JSON line per logged step (all-reduced losses)."""
        return self.path / "train.jsonl"

    @property
    def checkpoints(self) -> Path:
        """Resumable training state (model, optimizer, scheduler, EMA, step), kept for exact resume."""
        return self.path / "checkpoints"

    @property
    def preempted(self) -> Path:
        """Present while a preempted run waits to be resumed (``slurm/job.sbatch`` looks for it by this name)."""
        return self.path / "PREEMPTED"

    def samples(self, tag: str) -> Path:
        """The folder of one sampling protocol's output (``tag`` names the protocol)."""
        return self.path / "samples" / tag

    @contextlib.contextmanager
    def exclusive(self, what: str, rank: int = 0) -> Iterator[None]:
        """Hold ``.<what>.rank<r>.lock`` in the run directory while ``what`` runs (one lock per rank, so the ranks
        of one job never contend): a second trainer or sampler of the same run refuses at once with
        ``RunDirBusy`` instead of interleaving logs or taking the other's temporary files. An advisory
        ``flock``: released by the kernel when the holder dies, so a crash never leaves the directory locked."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / f".{what}.rank{rank}.lock", "a+")  # held, and locked, for the whole block
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirBusy(f"run directory {self.path} is in use by another {what} ({holder}): wait for it to "
                             "finish or stop it") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
