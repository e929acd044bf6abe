"""What every part of the GPU acceptance run shares: the part's context (sizes, device, deadline, rows saved as they
come), device synchronisation, and subprocesses that are killed together with everything they started."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_SCRIPT = REPO_ROOT / "benchmarks" / "gpu_acceptance.py"
"""The entry script; part (c) starts it again as its torchrun worker (``--deterministic-trainer``)."""


@dataclasses.dataclass
class PartContext:
    """What a part function gets: its sizes, the device, a scratch directory and a deadline."""

    part: str
    plan: dict[str, Any]
    device: str
    smoke: bool
    work_dir: Path
    deadline: float
    """Wall-clock time (``time.time()``) by which the part must be done; loops stop early when it comes close."""
    result_path: Path | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def time_left(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        print(f"  [{self.part}] {text}", flush=True)
        self.notes.append(text)

    def save(self, rows: list[dict[str, Any]] | None = None) -> None:
        """Write what the part has so far: if it is killed at its time limit, the finished rows survive."""
        if rows is not None:
            self.rows = rows
        if self.result_path is not None:
            payload = {"rows": self.rows, "info": self.info, "notes": self.notes}
            tmp = self.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(payload, default=str))
            tmp.replace(self.result_path)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_checked(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in its own session; on timeout it is killed with everything it started."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise TimeoutError(f"{shlex.join(cmd[:6])} ... did not finish within {timeout:.0f} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc): torchrun's workers are the children of its agent process."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(set(found))


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid``, whatever session it runs in (torchrun starts its workers in their own)."""
    found, stack = [], [pid]
    while stack:
        for child in child_pids(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, all its descendants and its process group: nothing of a part outlives its time limit."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, signal.SIGSTOP)  # no new children while the tree is walked
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
