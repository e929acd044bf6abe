"""The job steps, one module each: what a planned job of that step computes, and which files it leaves.

Each module exposes ``run(job, roots, ctx, store) -> StepResult``. A step module is the root of its jobs' code
fingerprint (``bench.records.fingerprint``), so it imports only what the step executes; ``bench.pipeline.jobs`` routes
jobs here and writes their records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Roots:
    runs: Path
    """Bulk artefacts: run directories, samples, references (git-ignored)."""
    results: Path
    """Records, leaderboards, plots (small; committed for shipped suites)."""

    def __post_init__(self) -> None:
        # absolute: jobs may run from another working directory (SLURM)
        object.__setattr__(self, "runs", Path(self.runs).resolve())
        object.__setattr__(self, "results", Path(self.results).resolve())

    def reference_dir(self, job_id: str) -> Path:
        return self.runs / "references" / job_id

    def artefact(self, path: str) -> Path:
        """A recorded output path: relative to the runs root (so a results tree outlives a move), or absolute."""
        return Path(path) if Path(path).is_absolute() else self.runs / path

    def relative(self, path: str | Path) -> str:
        """``path`` as a record stores it: relative to the runs root when it lies inside it."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.runs))
        except ValueError:
            return str(path)


@dataclass
class StepResult:
    blocks: dict[str, Any]
    """Record blocks (``train_info``, ``sample_info``, ``eval_info``, ``extra``)."""
    outputs: dict[str, str] = field(default_factory=dict)
    """Files the job produced that later jobs read, by name -> path (``Roots.relative``); recorded with sha256."""
    ancestry_sha256: str = ""
    """sha256 of the ancestry export the job actually loaded (training jobs that inherit)."""
