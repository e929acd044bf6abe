"""Run the real trainer in a subprocess (shared by the training tests and the ``run_train`` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: A tiny pixel-space run: 16 px synthetic images, DiT-T/2, a global batch of 8.
TINY_RUN = [
    "--model.arch=DiT-T/2", "--model.in_channels=3", "--model.input_size=16", "--data.image_size=16",
    "--data.per_class=2", "--schedule.global_batch=8", "--schedule.log_every=1", "--method.stage=ancestry",
]


class TrainResult:
    def __init__(self, proc: subprocess.CompletedProcess, out_dir: Path):
        self.returncode = proc.returncode
        self.stderr = proc.stderr
        self.stdout = proc.stdout
        runs = sorted(p for p in out_dir.iterdir() if p.is_dir()) if out_dir.is_dir() else []
        self.run_dir = runs[-1] if runs else None

    def losses(self) -> list[float]:
        lines = (self.run_dir / "train.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]


def train_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "bench.run.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "bench.run.train"]


def train_tiny_run(out_dir: Path, steps: int = 2) -> Path:
    """Train ``TINY_RUN`` for ``steps`` steps into the empty folder ``out_dir``; returns its run directory."""
    proc = subprocess.run(train_command(1) + TINY_RUN + [f"--run.out_dir={out_dir}", f"--schedule.steps={steps}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = Path(out_dir).iterdir()
    return run_dir
