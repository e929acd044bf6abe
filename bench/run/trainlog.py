"""Training log: all-reduced losses to ``train.jsonl`` and a rich progress bar on rank 0.

The loss is all-reduced before it is logged (fast-DiT logged a per-rank loss divided by the world size, issue #16).
On resume, lines past the resumed step are dropped: they came from an attempt that died before its next checkpoint,
and keeping them would draw two overlapping curves.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench.run.engine import DistContext, all_reduce_mean
from bench.run.rundir import RunDir


class TrainLog:
    def __init__(self, run: RunDir, ctx: DistContext, total_steps: int, start_step: int, images_per_step: int):
        self.ctx = ctx
        self.path = run.train_log
        self.images_per_step = images_per_step
        self._sums = torch.zeros(3, dtype=torch.float64)
        self._count = 0
        self._t0 = time.perf_counter()
        self._last = (start_step, self._t0)
        self._progress = None
        if ctx.is_main:
            self._truncate(start_step)
            console = Console(file=sys.stderr)
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False, disable=not console.is_terminal)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
            self._progress.start()

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def add(self, loss: torch.Tensor, mse: torch.Tensor, vb: torch.Tensor) -> None:
        """Accumulate one micro-batch's mean losses (local; reduced at ``flush``)."""
        self._sums += torch.stack([loss.detach().double().cpu(), mse.detach().double().cpu(),
                                   vb.detach().double().cpu()])
        self._count += 1

    def flush(self, step: int, lr: float, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """All-reduce the accumulated means (a collective: every rank calls it) and write one line on rank 0."""
        means = all_reduce_mean(self.ctx, self._sums / max(self._count, 1))
        self._sums.zero_()
        self._count = 0
        now = time.perf_counter()
        last_step, last_t = self._last
        self._last = (step, now)
        record = {"step": step, "loss": float(means[0]), "mse": float(means[1]), "vb": float(means[2]), "lr": lr,
                  "img_per_s": (step - last_step) * self.images_per_step / max(now - last_t, 1e-9),
                  "elapsed_s": now - self._t0, **(extra or {})}
        if self.ctx.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self._progress is not None:
                self._progress.update(self._task, completed=step,
                                      status=f"loss {record['loss']:.4f}  {record['img_per_s']:.1f} img/s")
                if not self._progress.console.is_terminal:
                    print(f"step {step}: loss {record['loss']:.4f} mse {record['mse']:.4f} "
                          f"vb {record['vb']:.4f} {record['img_per_s']:.1f} img/s", file=sys.stderr, flush=True)
        return record

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
