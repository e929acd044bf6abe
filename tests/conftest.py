"""Shared test setup: offline hub, CPU-only DeepSpeed, and a helper that runs the real trainer in a subprocess."""

from __future__ import annotations

import os
import subprocess

import pytest

# Nothing downloads in tests: hub lookups fail at once instead of retrying for 20-50 s (docs/harness.md §11.3).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from trainrun import REPO, TINY_RUN, TrainResult, train_command  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture
def run_train(tmp_path):
    """``run_train(*overrides, nproc=1, out="runs")`` runs ``bench.run.train`` for real and returns a TrainResult."""

    def run(*overrides: str, nproc: int = 1, out: str = "runs", timeout: int = 600) -> TrainResult:
        out_dir = tmp_path / out
        cmd = train_command(nproc) + TINY_RUN + [f"--run.out_dir={out_dir}", *overrides]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return TrainResult(proc, out_dir)

    return run


@pytest.fixture(scope="session", autouse=True)
def shared_extractor_cache(tmp_path_factory):
    """One cache for the synthetic-suite feature extractor across tests (and the SLURM jobs they submit): it is
    trained once per session, not once per test. Tests of the cache itself pass their own directories."""
    if "KINDBENCH_CACHE_DIR" not in os.environ:
        os.environ["KINDBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("kindbench-cache"))
    yield os.environ["KINDBENCH_CACHE_DIR"]
