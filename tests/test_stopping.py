"""A stop signal to ``kindbench run`` (``bench.pipeline.stopping``): the running training checkpoints, nothing new
starts, the executor exits 128 + SIGTERM, and none of its job processes outlives it.

Before this, SIGTERM killed the executor alone: its pool workers went on (one kept training a run the user was about
to resume), and the sequential executor treated a training job's own preemption as a failure and started the next
job. Real jobs on the mini suite, whose ancestry trains long enough to be stopped half-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from suitefixtures import mini_suite, suite_file

from bench.run.rundir import RunDir

STEPS = 20000  # far more than the test waits for: the ancestry is always stopped half-way


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            kids = (task / "children").read_text().split() if (task / "children").exists() else []
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    frontier.append(kid)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize(("jobs", "nproc"), [(1, 1), (2, 1), (2, 2)])
def test_sigterm_checkpoints_the_running_training_and_leaves_no_job_behind(tmp_path, jobs, nproc):
    suite = suite_file(tmp_path, mini_suite("stopme", schedule={"steps": STEPS, "ckpt_every": STEPS}))
    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KINDBENCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", "--suite", suite, "--runs", str(runs),
                             "--jobs", str(jobs), "--nproc", str(nproc)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    train_log = None
    while time.monotonic() < deadline and proc.poll() is None:  # until the ancestry has logged a few steps
        logs = list(runs.glob("scratch--ancestry-dense--*/train.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= 2:
            train_log = logs[0]
            break
        time.sleep(0.5)
    assert train_log is not None, proc.communicate()[0][-3000:] if proc.poll() is not None else "no training"
    children = _children(proc.pid)
    assert children or jobs == 1, "the pool has worker processes"  # one job at a time runs in-process
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    time.sleep(1)
    assert not [pid for pid in children if _alive(pid)], "job processes outlived the executor"

    run = RunDir(train_log.parent)
    steps = [int(f.name) for f in run.checkpoints.iterdir() if f.name.isdigit() and (f / "DONE").is_file()]
    assert steps and 0 < max(steps) < STEPS and run.preempted.exists()  # stopped half-way, resumable
    summary = json.loads((runs / "results" / "stopme" / "last_run.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["outcomes"]["stopped"] >= 1  # what was running
    assert summary["outcomes"]["failed"] == 0 and summary["outcomes"]["ran"] <= 2, output[-3000:]  # nothing after
    assert "run the same command to resume" in output
