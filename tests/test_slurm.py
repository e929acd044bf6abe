"""``sbatch slurm/run_all.sh`` on a real SLURM cluster (``slurm/testing/local_cluster.sh``; .ci/run starts one).

Marked ``slurm``: they need slurmctld/slurmd running on this machine and take minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainrun import REPO

pytestmark = pytest.mark.slurm

SUITE = textwrap.dedent("""
    name = "slurm-mini"
    seeds = [0]
    archs = ["DiT-T/2"]
    [defaults.model]
    in_channels = 3
    input_size = 16
    [defaults.data]
    image_size = 16
    per_class = 4
    [defaults.schedule]
    global_batch = 8
    steps = 3
    log_every = 1
    [protocol.sample]
    num_samples = 16
    per_proc_batch = 16
    scheduler = "ddim"
    num_steps = 3
    [protocol.eval]
    extractor = "synthetic"
    ref_per_class = 4
    [ancestries.dense]
    method = "scratch"
    overrides = { data = { split = "pretrain" } }
    [tasks.novel-a]
    overrides = { data = { split = "novel-a" } }
    [[methods]]
    name = "full"
    ancestry = "dense"
    [[methods]]
    name = "lora"
    ancestry = "dense"
    options = { rank = 2 }
""")


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


needs_cluster = pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster here: start one with "
                                   "`bash slurm/testing/local_cluster.sh` (.ci/run does)")


def _env() -> dict[str, str]:
    return {**os.environ, "KB_CLUSTER": "local", "KB_PYTHON": os.environ.get("KB_PYTHON", _python())}


def _python() -> str:
    return sys.executable


def _run_all(tmp: Path, *args: str) -> str:
    """``sbatch --wait slurm/run_all.sh`` (the submitter job itself), returning its output file's text."""
    out = tmp / f"submit-{time.time_ns()}.out"
    proc = subprocess.run(["sbatch", "--wait", f"--output={out}", "slurm/run_all.sh", "--runs", str(tmp / "runs"),
                           "--results", str(tmp / "results"), *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stderr + text
    return text


def _wait_for_queue_to_drain(prefix: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
        if not any(name.startswith(prefix) for name in out):
            return
        time.sleep(2)
    subprocess.run(["scancel", "--name", prefix + "*"], capture_output=True)
    pytest.fail(f"SLURM jobs {prefix}* still queued after {timeout} s")


def _logs(tmp: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp / "runs/slurm/logs").glob("*")))


@needs_cluster
def test_run_all_submits_a_job_graph_that_finishes_and_resubmitting_submits_nothing(tmp_path):
    suite = tmp_path / "slurm-mini.toml"
    suite.write_text(SUITE)
    text = _run_all(tmp_path, "--suite", str(suite))
    for stage in ("prepare", "ancestry", "transfer", "sample", "evaluate", "aggregate"):
        assert re.search(rf"^{stage}\s+\d+", text, flags=re.M), text
    _wait_for_queue_to_drain("kb-slurm-mini", timeout=1500)

    from bench.executor import build_plan

    plan = build_plan(str(suite), [])[1]
    records = list((tmp_path / "results/records").glob("*.json"))
    assert sorted(p.stem for p in records) == sorted(plan.jobs), _logs(tmp_path)
    assert not list((tmp_path / "results").glob("failed/*.json")), _logs(tmp_path)
    csvs = list((tmp_path / "results/leaderboard").glob("*.csv"))
    assert csvs, _logs(tmp_path)
    assert list((tmp_path / "results/plots").rglob("*.png")), _logs(tmp_path)

    again = _run_all(tmp_path, "--suite", str(suite))
    assert "nothing to submit" in again


@needs_cluster
def test_a_signalled_training_job_is_requeued_and_resumes(tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@N does before the time limit): the trainer checkpoints, the job
    is requeued, and the next attempt resumes from that checkpoint and finishes."""
    text = SUITE.replace('overrides = { data = { split = "pretrain" } }',
                        'overrides = { data = { split = "pretrain" }, schedule = { steps = 400, ckpt_every = 100000 } }')
    suite = tmp_path / "slurm-mini.toml"
    suite.write_text(text)
    out = _run_all(tmp_path, "--suite", str(suite))
    ancestry_array = re.search(r"^ancestry\s+(\d+)", out, flags=re.M).group(1)
    run_dirs = lambda: [p for p in (tmp_path / "runs").glob("scratch--ancestry-dense--*") if p.is_dir()]  # noqa: E731
    deadline = time.time() + 600
    while time.time() < deadline and not any((d / "train.jsonl").exists() for d in run_dirs()):
        time.sleep(1)
    assert run_dirs(), _logs(tmp_path)
    time.sleep(3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{ancestry_array}_0"], check=True)
    _wait_for_queue_to_drain("kb-slurm-mini", timeout=1800)

    (run_dir,) = run_dirs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0, _logs(tmp_path)
    assert summary["steps"] == 400 and not (run_dir / "PREEMPTED").exists()
    log = (tmp_path / "runs/slurm/logs").glob(f"ancestry-{ancestry_array}_0.out")
    text = "".join(p.read_text() for p in log)
    assert "requeueing" in text and "restart 1" in text, text[-3000:]

