"""``kindbench run --suite tiny`` end to end through the local executor, with a reduced step count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from trainrun import REPO

SMOKE = ["--set", "schedule.steps=3", "--set", "sample.num_samples=32", "--set", "sample.num_steps=3"]


@pytest.mark.slow
def test_tiny_suite_end_to_end_and_rerun_is_a_no_op(tmp_path):
    cmd = [sys.executable, "-m", "bench", "run", "--suite", "tiny", "--runs", str(tmp_path / "runs"), "--results",
           str(tmp_path / "results"), *SMOKE]
    env = dict(os.environ)  # conftest shares one extractor cache (KINDBENCH_CACHE_DIR) across the session
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads((tmp_path / "results/last_run.json").read_text())
    assert summary["outcomes"]["failed"] == 0 and summary["outcomes"]["blocked"] == 0
    assert set(summary["step_seconds"]) == {"prepare", "pretrain", "train", "sample", "evaluate", "aggregate"}

    from bench.pipeline.executor import build_plan

    plan = build_plan("tiny", [s for s in SMOKE if s != "--set"])[1]
    records = {p.stem for p in (tmp_path / "results/records").glob("*.json")}
    assert records == set(plan.jobs)
    for benchmark in {j.info["benchmark"] for j in plan.by_step("evaluate")}:
        csv = (tmp_path / "results/leaderboard" / benchmark / "leaderboard.csv").read_text()
        expected = {j.info["method"] for j in plan.by_step("evaluate") if j.info["benchmark"] == benchmark}
        assert expected, benchmark
        for method in expected:  # a method may run on some tasks only (kind_fulltransfer: the domain task)
            assert f",{method}," in csv or csv.startswith(method), (benchmark, method)
        # every table ends with its floor (held-out real images) and every row has a class accuracy
        import csv as csv_module

        rows = list(csv_module.DictReader((tmp_path / "results/leaderboard" / benchmark / "leaderboard.csv").open()))
        assert rows[-1]["method"] == "real images" and rows[-1]["rank"] == "", benchmark
        assert all(row["class_acc_mean"] != "" for row in rows), benchmark
        assert (tmp_path / "results/plots" / benchmark / "loss_curves.png").stat().st_size > 0
        pid = rows[0]["protocol_id"]
        for figure in ("summary", "samples"):  # per question at a glance; real images beside the samples
            assert (tmp_path / "results/plots" / benchmark / pid / f"{figure}.png").stat().st_size > 0
    runs = list(csv_module.DictReader((tmp_path / "results/leaderboard/leaderboard_runs.csv").open()))
    leaderboard = tmp_path / "results/leaderboard"
    assert all((leaderboard / run["samples_npz"]).is_file() and (leaderboard / run["real_npz"]).is_file()
               for run in runs)

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    rerun = json.loads((tmp_path / "results/last_run.json").read_text())
    # nothing runs again, not even the aggregation: its inputs are the evaluations it already read
    assert rerun["outcomes"]["ran"] == 0 and rerun["outcomes"]["done"] == len(plan.jobs)
