"""The layout of one training run's directory, ``<runs root>/<run id>``: the only module that names its files.

Training writes it, sampling reads it, the pipeline points later jobs at it (a run's export, relative to the runs
root so that a results tree survives a move of the runs root).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPORT_NAME = "export.safetensors"


def export_ref(run_id: str) -> str:
    """The export of run ``run_id`` as configs and records name it: relative to the runs root."""
    return f"{run_id}/{EXPORT_NAME}"


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
