"""``kindbench findings``: the numbers a FINDINGS.md quotes come from the leaderboards and records, not by hand."""

from __future__ import annotations

import csv
import json
import re
import shutil
from datetime import datetime

import pytest
from recordfixtures import write_fixture_store

from bench.report.findings import findings_markdown, main, number
from bench.report.leaderboard import build_leaderboards


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings") / "results"
    write_fixture_store(root)
    build_leaderboards(root, root / "leaderboard")
    return root


def test_every_leaderboard_row_is_quoted_with_its_mean_std_and_interval(results):
    text = findings_markdown(results, {"kind"})
    for board in sorted((results / "leaderboard").glob("*/leaderboard.csv")):
        assert f"### {board.parent.name}" in text
        for row in csv.DictReader(board.open(newline="")):
            if not row["fid_mean"]:
                continue
            quoted = f"{number(row['fid_mean'])}"
            if row["fid_std"]:
                quoted += f" ± {number(row['fid_std'])}"
            if row["fid_ci_low"]:
                quoted += f" [{number(row['fid_ci_low'])}, {number(row['fid_ci_high'])}]"
            line = next(line for line in text.splitlines() if f"| {row['method']}" in line and quoted in line)
            assert line.split(" | ")[2] == row["n_seeds"]


def test_per_seed_values_and_costs_come_from_the_runs_and_records(results):
    text = findings_markdown(results, {"kind"})
    runs = [row for row in csv.DictReader((results / "leaderboard" / "leaderboard_runs.csv").open(newline=""))
            if row["method"] == "kind"]
    assert runs
    for row in runs:
        assert f"seed {row['seed']}: fid {number(row['fid'])}" in text
    seconds = []
    for path in (results / "records").glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("status") == "success":
            info = record["run_info"]
            seconds.append((datetime.fromisoformat(info["finished_at"])
                            - datetime.fromisoformat(info["created_at"])).total_seconds())
    total = re.search(r"\| \*\*all\*\* \| (\d+) \| \*\*([\d,]+)\*\*", text)
    assert int(total.group(1)) == len(seconds) and total.group(2) == f"{sum(seconds):,.0f}"


def test_number_format_and_a_missing_folder(tmp_path, capsys):
    assert [number(v) for v in ("0.8496", "5.1234", "26.84", "123.4", "", None)] == [
        "0.850", "5.12", "26.8", "123", "–", "–"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "no leaderboard" in capsys.readouterr().err


def test_the_cli_prints_the_same_markdown(results, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    assert main([str(copy), "--per-seed", "kind"]) == 0
    assert capsys.readouterr().out == findings_markdown(copy, {"kind"})
