"""The local executor's scheduler: dependency order, the parallelism bound, failures blocking only dependents.

The jobs are replaced by tiny Python processes (``_execute`` and ``_make_pool`` are the seams), so these tests check
the scheduling itself in seconds; the tiny-suite end-to-end test runs real jobs through the real worker pool.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import pytest

from bench.pipeline import executor
from bench.pipeline.jobs import Roots
from bench.pipeline.plan import Job, Plan

SCRIPT = """
import json, os, sys, time
log, name, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with open(log, "a") as f:
    f.write(json.dumps({"event": "start", "job": name, "t": time.time()}) + "\\n")
time.sleep(0.4)
with open(log, "a") as f:
    f.write(json.dumps({"event": "end", "job": name, "t": time.time()}) + "\\n")
sys.exit(3 if fail else 0)
"""


def diamond_plan() -> Plan:
    """a -> (b, c, d) -> e, plus an independent f; then aggregate over e and f."""
    jobs = [Job("a", "pretrain", ()), Job("b", "train", ("a",)), Job("c", "train", ("a",)),
            Job("d", "train", ("a",)), Job("e", "evaluate", ("b", "c", "d")), Job("f", "evaluate", ()),
            Job("agg", "aggregate", ("e", "f"))]
    return Plan("toy", {j.job_id: j for j in jobs})


@pytest.fixture
def fake_jobs(tmp_path, monkeypatch):
    """Jobs become small processes that log their start and end; the pool runs them from threads (the real pool's
    workers run ``_execute`` in spawned processes, which a monkeypatch cannot reach)."""
    log = tmp_path / "events.jsonl"
    failing: set[str] = set()

    def execute(plan_path, job_id, runs, results, nproc, force):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), job_id, "1" if job_id in failing else "0"])
        return proc.returncode == 0, "" if proc.returncode == 0 else f"exit {proc.returncode}"

    monkeypatch.setattr(executor, "_execute", execute)
    monkeypatch.setattr(executor, "_make_pool", lambda jobs: concurrent.futures.ThreadPoolExecutor(jobs))

    def events():
        return [json.loads(line) for line in log.read_text().splitlines()]

    return failing, events


def test_parallel_run_respects_dependencies_and_the_bound(tmp_path, fake_jobs):
    _, events = fake_jobs
    summary = executor.run_local(diamond_plan(), Roots(tmp_path / "runs", tmp_path / "results"), jobs=2)
    assert summary["outcomes"] == {"ran": 7, "done": 0, "failed": 0, "blocked": 0, "stopped": 0}
    log = events()
    start = {e["job"]: e["t"] for e in log if e["event"] == "start"}
    end = {e["job"]: e["t"] for e in log if e["event"] == "end"}
    for job in diamond_plan().jobs.values():
        for dep in job.deps:
            assert start[job.job_id] >= end[dep], (dep, job.job_id)
    running, peak = 0, 0
    for event in sorted(log, key=lambda e: (e["t"], e["event"] == "start")):
        running += 1 if event["event"] == "start" else -1
        peak = max(peak, running)
    assert peak == 2  # b, c, d (and f) could all run at once; the bound holds them to two
    assert summary["wall_seconds"] < sum(summary["step_seconds"].values())  # jobs overlapped


def test_a_failed_job_blocks_only_its_dependents(tmp_path, fake_jobs):
    failing, events = fake_jobs
    failing.add("c")
    summary = executor.run_local(diamond_plan(), Roots(tmp_path / "runs", tmp_path / "results"), jobs=3)
    ran = {e["job"] for e in events() if e["event"] == "end"}
    assert ran == {"a", "b", "c", "d", "f", "agg"}  # e waits on c; aggregation still runs on what finished
    assert summary["outcomes"] == {"ran": 5, "done": 0, "failed": 1, "blocked": 1, "stopped": 0}


def test_aggregation_waits_for_every_evaluation_even_after_an_early_failure(tmp_path, fake_jobs):
    failing, events = fake_jobs
    failing.add("f")  # f fails at once, while e's chain still runs: aggregation must wait for e, then run
    summary = executor.run_local(diamond_plan(), Roots(tmp_path / "runs", tmp_path / "results"), jobs=2)
    log = events()
    start = {e["job"]: e["t"] for e in log if e["event"] == "start"}
    end = {e["job"]: e["t"] for e in log if e["event"] == "end"}
    assert "agg" in start and start["agg"] >= end["e"]
    assert summary["outcomes"] == {"ran": 6, "done": 0, "failed": 1, "blocked": 0, "stopped": 0}


def test_default_parallelism_is_one_unless_every_run_pins_one_thread():
    from bench.pipeline.executor import build_plan, default_parallel_jobs

    _, tiny = build_plan("tiny", [])
    assert default_parallel_jobs(tiny) >= 1
    _, unpinned = build_plan("tiny", ["engine.cpu_threads=0"])
    assert default_parallel_jobs(unpinned) == 1
