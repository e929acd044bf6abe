"""Leaderboards from run records: golden CSV, Markdown and LaTeX from realistic fixture records (recordfixtures)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import warnings
from pathlib import Path

import pytest

from bench import leaderboard
from bench.leaderboard import LeaderboardWarning, build_leaderboards, pareto_flags, protocol_id
from bench.store import MalformedRecordError, RecordStore
from recordfixtures import P1, P2, P2_FID, RUNS, eval_info, run_id_of, write_fixture_store

BENCH_A, BENCH_B = "novel-a--DiT-T-2", "novel-b--DiT-T-2"
PID1, PID2 = protocol_id(P1), protocol_id(P2)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fixture results tree and its leaderboard, built once for the module (no warnings expected)."""
    base = tmp_path_factory.mktemp("lb")
    write_fixture_store(base / "results")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeaderboardWarning)
        written = build_leaderboards(base / "results", base / "out")
    return base, written


def board(base: Path, benchmark=BENCH_A, pid=PID1) -> dict[tuple[str, str], dict[str, str]]:
    """(method, variant) -> row of ``<base>/out/<benchmark>/leaderboard.csv`` under one protocol."""
    rows = read_csv(base / "out" / benchmark / "leaderboard.csv")
    return {(r["method"], r["variant"]): r for r in rows if r["protocol_id"] == pid}


def seeds_of(method: str) -> list[dict]:
    return [numbers for key, numbers in RUNS.items() if key[0] == method]


# ---- the aggregate CSV ---------------------------------------------------------------------------------------------


def test_files_written(built):
    base, written = built
    names = {p.relative_to(base / "out").as_posix() for p in written}
    for bench in (BENCH_A, BENCH_B):
        assert {f"{bench}/leaderboard.csv", f"{bench}/leaderboard.md", f"{bench}/leaderboard.tex"} <= names
    assert {"leaderboard_runs.csv", "status.csv", "status.md"} <= names
    assert sorted(p.name for p in (base / "out").iterdir() if p.is_dir()) == [BENCH_A, BENCH_B]  # none for ""
    assert all(p.stat().st_size > 0 for p in written)


def test_means_and_stds_over_seeds(built):
    rows = board(built[0])
    assert set(rows) == {("kind", "default"), ("lora", "r4"), ("bitfit", "default"), ("full_ft", "default")}
    for (method, variant), row in rows.items():
        runs = seeds_of(method)
        assert int(row["n_seeds"]) == len(runs)
        for name, key in (("fid", "fid"), ("is", "is_"), ("precision", "prec"), ("fdd", "fdd")):
            values = [r[key] for r in runs]
            assert float(row[f"{name}_mean"]) == pytest.approx(statistics.fmean(values))
            if len(values) > 1:
                assert float(row[f"{name}_std"]) == pytest.approx(statistics.stdev(values))
            else:
                assert row[f"{name}_std"] == ""
        assert float(row["gpu_hours"]) == pytest.approx(statistics.fmean(r["gpu_h"] for r in runs))
        assert float(row["wall_s"]) == pytest.approx(statistics.fmean(r["wall"] for r in runs))
        assert row["params_trainable"] == str(runs[0]["trainable"])  # counts stay integers
        assert float(row["train_gmacs_total"]) == pytest.approx(runs[0]["gmacs"] * 3 * runs[0]["images"])
        assert float(row["trainable_pct"]) == pytest.approx(100 * runs[0]["trainable"] / runs[0]["total"])
    assert rows[("kind", "default")]["seeds"] == "0;1"


def test_failed_and_cancelled_runs_are_excluded(built):
    rows = board(built[0])
    assert rows[("lora", "r4")]["n_seeds"] == "2"  # seed 2's transfer failed
    assert rows[("bitfit", "default")]["n_seeds"] == "1"  # seed 1's sampling was cancelled
    assert run_id_of("lora", "r4", BENCH_A, 2) not in rows[("lora", "r4")]["run_ids"]


def test_ranks_best_markers_and_directions(built):
    rows = board(built[0])
    ranked = sorted(rows.values(), key=lambda r: int(r["rank"]))
    assert [r["method"] for r in ranked] == ["full_ft", "kind", "lora", "bitfit"]  # by FID, lower first
    assert [k for k, r in rows.items() if r["best_fid"] == "True"] == [("full_ft", "default")]
    assert [k for k, r in rows.items() if r["best_precision"] == "True"] == [("kind", "default")]  # higher wins
    assert [k for k, r in rows.items() if r["best_is"] == "True"] == [("full_ft", "default")]
    assert {r["fid_higher_is_better"] for r in rows.values()} == {"False"}
    assert {r["is_higher_is_better"] for r in rows.values()} == {"True"}


def test_pareto_flags(built):
    rows = board(built[0])
    on_params = {k[0] for k, r in rows.items() if r["pareto_fid_vs_params"] == "True"}
    on_compute = {k[0] for k, r in rows.items() if r["pareto_fid_vs_compute"] == "True"}
    assert on_params == {"lora", "kind", "full_ft"}  # bitfit: more params than lora and a worse FID
    assert on_compute == {"bitfit", "kind", "full_ft"}  # lora: more compute than kind and a worse FID
    on_precision = {k[0] for k, r in rows.items() if r["pareto_precision_vs_params"] == "True"}
    assert on_precision == {"lora", "kind"}  # higher is better: full_ft has more params and lower precision


def test_protocols_are_ranked_separately(built):
    p1, p2 = board(built[0], pid=PID1), board(built[0], pid=PID2)
    assert PID1 != PID2 and set(p2) == {("kind", "default"), ("lora", "r4")}
    assert {r["extractor"] for r in p1.values()} == {"kindbench-synthetic-v1"}
    assert {r["extractor"] for r in p2.values()} == {"inception-v3-tf"}
    assert {r["reference_id"] for r in p2.values()} == {"novel-a-val"}
    # lora wins FID under P2 although kind beats it under P1; the two rankings never see each other's rows
    assert p2[("lora", "r4")]["rank"] == "1" and p2[("lora", "r4")]["best_fid"] == "True"
    assert float(p2[("kind", "default")]["fid_mean"]) == P2_FID[("kind", 0)]
    assert p1[("full_ft", "default")]["best_fid"] == "True" and p1[("lora", "r4")]["best_fid"] == "False"
    assert sorted(int(r["rank"]) for r in p2.values()) == [1, 2]


def test_one_leaderboard_per_benchmark(built):
    rows = read_csv(built[0] / "out" / BENCH_B / "leaderboard.csv")
    assert [(r["benchmark"], r["method"], r["n_seeds"], r["rank"]) for r in rows] == [(BENCH_B, "kind", "1", "1")]
    assert all(r["benchmark"] == BENCH_A for r in read_csv(built[0] / "out" / BENCH_A / "leaderboard.csv"))


# ---- the runs CSV and the join -------------------------------------------------------------------------------------


def test_runs_csv_one_row_per_seed_run_joined_to_its_training(built):
    base = built[0]
    runs = read_csv(base / "out" / "leaderboard_runs.csv")
    assert len(runs) == len(RUNS) + len(P2_FID) + 1
    kind0 = [r for r in runs if r["method"] == "kind" and r["seed"] == "0" and r["benchmark"] == BENCH_A]
    assert {r["protocol_id"] for r in kind0} == {PID1, PID2}
    for row in kind0:
        # the transfer's cost, not the ancestry's (2.0 GPU-hours, 900K trainable), although both are upstream
        assert row["train_job_id"].endswith("--transfer") and float(row["gpu_hours"]) == 0.10
        assert row["params_trainable"] == "120000"
    for row in runs:
        assert (base / "out" / row["loss_curve"]).is_file() and (base / "out" / row["grid_png"]).is_file()
        assert row["sample_job_id"].endswith("--sample")
    assert float(next(r for r in runs if r["method"] == "full_ft")["fid"]) == 19.0


def test_status_summary_counts_failures(built):
    base = built[0]
    rows = read_csv(base / "out" / "status.csv")
    status = {(r["benchmark"], r["stage"], r["status"]): int(r["count"]) for r in rows}
    assert status[(BENCH_A, "transfer", "failed")] == 1
    assert status[(BENCH_A, "sample", "cancelled")] == 1
    assert status[(BENCH_A, "evaluate", "success")] == len(RUNS) + len(P2_FID)
    md = (base / "out" / BENCH_A / "leaderboard.md").read_text()
    failed_id = run_id_of("lora", "r4", BENCH_A, 2) + "--transfer"
    assert f"`{failed_id}` (failed): RuntimeError: CUDA out of memory" in md
    assert "(cancelled): cancelled: SLURM preemption" in md
    assert failed_id in (base / "out" / "status.md").read_text()
    assert status[("", "prepare", "success")] == 1  # suite-level jobs are counted too
    assert "## (suite-level jobs)" in (base / "out" / "status.md").read_text()


# ---- Markdown and LaTeX --------------------------------------------------------------------------------------------


def _table_rows(md: str, protocol: str) -> dict[str, list[str]]:
    section = md.split(f"## Protocol {protocol}")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[1]] = dict(zip(header, cells))
    return rows


def test_markdown_tables(built):
    md = (built[0] / "out" / BENCH_A / "leaderboard.md").read_text()
    assert md.count("## Protocol ") == 2
    p1 = _table_rows(md, PID1)
    assert p1["full_ft"]["FID ↓"] == "**19.00**" and p1["kind"]["FID ↓"] == "21.00 ± 1.41"
    assert p1["kind"]["Precision ↑"] == "**0.610 ± 0.014**" and p1["kind"]["Seeds"] == "2"
    assert p1["kind"]["Trainable"] == "120K" and p1["lora"]["Pareto (FID)"] == "params"
    assert p1["bitfit"]["Pareto (FID)"] == "compute" and p1["full_ft"]["Rank"] == "1"
    p2 = _table_rows(md, PID2)
    assert set(p2) == {"kind", "lora"} and p2["lora"]["FID ↓"] == "**35.00**"
    assert "extractor inception-v3-tf, reference novel-a-val" in md


def test_latex_tables(built):
    tex = (built[0] / "out" / BENCH_A / "leaderboard.tex").read_text()
    assert tex.count("\\begin{table}") == 2 == tex.count("\\end{table}")
    assert tex.count("\\toprule") == tex.count("\\midrule") == tex.count("\\bottomrule") == 2
    assert "FID $\\downarrow$" in tex and "IS $\\uparrow$" in tex
    assert "\\textbf{19.00}" in tex and "21.00 $\\pm$ 1.41" in tex
    assert "full\\_ft" in tex and "full_ft" not in tex.replace("full\\_ft", "")  # every underscore escaped
    header = next(line for line in tex.splitlines() if line.startswith("Rank"))
    body = [line for line in tex.splitlines() if line.startswith(("1 &", "2 &", "3 &", "4 &"))]
    assert body and all(line.count("&") == header.count("&") for line in body)


def test_outputs_are_deterministic(built, tmp_path):
    base = built[0]
    again = base / "out2"
    build_leaderboards(base / "results", again)
    for path in (base / "out").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (again / path.relative_to(base / "out")).read_bytes(), path


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.fixture
def results_copy(built, tmp_path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(built[0] / "results", root)
    return root


def test_malformed_record_is_skipped_with_a_warning_or_fails_when_strict(results_copy, tmp_path, capsys):
    broken = results_copy / "records" / "broken--evaluate.json"
    broken.write_text('{"schema_version": 1, "status": "success"}')
    with pytest.warns(LeaderboardWarning, match="broken--evaluate.json"):
        build_leaderboards(results_copy, tmp_path / "out")
    assert len(board(tmp_path, pid=PID1)) == 4  # everything else is still there
    status = read_csv(tmp_path / "out" / "status.csv")
    assert {"benchmark": "", "stage": "", "status": "malformed", "count": "1"} in status
    assert "broken--evaluate.json" in (tmp_path / "out" / "status.md").read_text()
    with pytest.raises(MalformedRecordError, match="broken--evaluate.json"):
        build_leaderboards(results_copy, tmp_path / "strict", strict=True)
    assert leaderboard.main(["--records", str(results_copy), "--out", str(tmp_path / "cli"), "--strict"]) == 2
    assert "broken--evaluate.json" in capsys.readouterr().err


def test_conflicting_metric_directions_are_refused(results_copy, tmp_path):
    path = next((results_copy / "records").glob("kind--*--s1--*--evaluate.json"))
    record = json.loads(path.read_text())
    record["eval_info"]["metrics"]["fid"]["higher_is_better"] = True
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="metric 'fid' has higher_is_better"):
        build_leaderboards(results_copy, tmp_path / "out")


def test_missing_training_record_leaves_costs_empty(results_copy, tmp_path):
    transfer = next((results_copy / "records").glob("bitfit--default--*--s0--*--transfer.json"))
    transfer.unlink()
    with pytest.warns(LeaderboardWarning, match="no successful training record"):
        build_leaderboards(results_copy, tmp_path / "out")
    row = board(tmp_path)[("bitfit", "default")]
    assert row["params_trainable"] == "" and row["pareto_fid_vs_params"] == "False"
    assert float(row["fid_mean"]) == 30.0


def test_duplicate_evaluations_keep_the_latest(results_copy, tmp_path):
    store = RecordStore(results_copy)
    original = store.read(run_id_of("kind", "default", BENCH_A, 0) + "--evaluate")
    redo = json.loads(json.dumps(original))
    redo["run_info"]["job_id"] += "--redo"
    redo["run_info"]["finished_at"] = "2025-03-02T10:00:00.000+00:00"
    redo["eval_info"] = eval_info(RUNS[("kind", "learngene", "default", 0)], P1, fid=18.0)
    store.write(redo)
    with pytest.warns(LeaderboardWarning, match="two evaluations"):
        build_leaderboards(results_copy, tmp_path / "out")
    assert float(board(tmp_path)[("kind", "default")]["fid_mean"]) == pytest.approx((18.0 + 22.0) / 2)


def test_cli(built, tmp_path, capsys):
    base = built[0]
    # pointing at the records/ folder itself is accepted
    assert leaderboard.main(["--records", str(base / "results" / "records"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / BENCH_A / "leaderboard.md").read_bytes() == (
        base / "out" / BENCH_A / "leaderboard.md").read_bytes()
    assert leaderboard.main(["--records", str(tmp_path / "nowhere")]) == 2
    assert "records folder not found" in capsys.readouterr().err
    assert leaderboard.main(["--records", str(tmp_path / "o")]) == 2  # a folder that is not a results tree
    assert "not a kindbench results tree" in capsys.readouterr().err


# ---- Pareto front unit ---------------------------------------------------------------------------------------------


def test_pareto_flags_unit():
    xs = [1.0, 2.0, 2.0, 3.0, None, 4.0]
    ys = [10.0, 8.0, 9.0, 8.0, 1.0, None]
    assert pareto_flags(xs, ys, higher_is_better=False) == [True, True, False, False, False, False]
    assert pareto_flags(xs, ys, higher_is_better=True) == [True, False, False, False, False, False]
    assert pareto_flags([1.0, 1.0], [5.0, 5.0], higher_is_better=False) == [True, True]  # ties do not dominate
    assert pareto_flags([], [], higher_is_better=True) == []
