"""Leaderboards from run records: golden CSV, Markdown and LaTeX from realistic fixture records (recordfixtures)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import warnings
from pathlib import Path

import pytest
from recordfixtures import P1, P2, P2_FID, RUNS, eval_info, run_id_of, write_fixture_store

from bench.records.fingerprint import code_fingerprint
from bench.records.store import MalformedRecordError, RecordStore
from bench.report import leaderboard
from bench.report.leaderboard import (
    AGG_COSTS,
    PROTOCOL_KEYS,
    LeaderboardWarning,
    build_leaderboards,
    pareto_flags,
    protocol_id,
)
from bench.report.tables import fmt_rank

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
    assert set(rows) == {("kind", "default"), ("lora", "r4"), ("bitfit", "default"), ("full", "default")}
    for (method, _variant), row in rows.items():
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
    assert [r["method"] for r in ranked] == ["full", "kind", "lora", "bitfit"]  # by FID, lower first
    assert [k for k, r in rows.items() if r["best_fid"] == "True"] == [("full", "default")]
    assert [k for k, r in rows.items() if r["best_precision"] == "True"] == [("kind", "default")]  # higher wins
    assert [k for k, r in rows.items() if r["best_is"] == "True"] == [("full", "default")]
    assert {r["fid_higher_is_better"] for r in rows.values()} == {"False"}
    assert {r["is_higher_is_better"] for r in rows.values()} == {"True"}


def test_pareto_flags(built):
    rows = board(built[0])
    on_params = {k[0] for k, r in rows.items() if r["pareto_fid_vs_params"] == "True"}
    on_compute = {k[0] for k, r in rows.items() if r["pareto_fid_vs_compute"] == "True"}
    assert on_params == {"lora", "kind", "full"}  # bitfit: more params than lora and a worse FID
    # compute includes the amortised ancestry: KIND's 9600-GMAC ancestry split over its 2 transfer runs puts KIND at
    # 960 + 4800 GMACs, more than full fine-tuning's 1536 with a worse FID
    assert on_compute == {"bitfit", "lora", "full"}
    on_precision = {k[0] for k, r in rows.items() if r["pareto_precision_vs_params"] == "True"}
    assert on_precision == {"lora", "kind"}  # higher is better: full has more params and lower precision


def test_ancestry_cost_is_amortised_over_the_transfer_runs_that_use_it(built):
    rows = board(built[0])
    kind, lora = rows[("kind", "default")], rows[("lora", "r4")]
    ancestry = 0.05 * 3 * 64_000  # the fixture's KIND ancestry: 9600 GMACs, used by KIND's two transfer runs
    assert float(kind["ancestry_gmacs"]) == pytest.approx(ancestry / 2)
    assert float(kind["total_gmacs"]) == pytest.approx(float(kind["train_gmacs_total"]) + ancestry / 2)
    assert float(lora["ancestry_gmacs"]) == 0.0 and float(lora["total_gmacs"]) == float(lora["train_gmacs_total"])
    runs = [r for r in read_csv(built[0] / "out" / "leaderboard_runs.csv")
            if r["method"] == "kind" and r["benchmark"] == BENCH_A]
    assert {float(r["ancestry_wall_s"]) for r in runs} == {360.0 / 2}  # the ancestry's wall time, shared alike


def test_protocols_are_ranked_separately(built):
    p1, p2 = board(built[0], pid=PID1), board(built[0], pid=PID2)
    assert PID1 != PID2 and set(p2) == {("kind", "default"), ("lora", "r4")}
    assert {r["extractor"] for r in p1.values()} == {"kindbench-synthetic-v1"}
    assert {r["extractor"] for r in p2.values()} == {"inception-v3-tf"}
    assert {r["reference_id"] for r in p2.values()} == {"novel-a-val"}
    # lora wins FID under P2 although kind beats it under P1; the two rankings never see each other's rows
    assert p2[("lora", "r4")]["rank"] == "1" and p2[("lora", "r4")]["best_fid"] == "True"
    assert float(p2[("kind", "default")]["fid_mean"]) == P2_FID[("kind", 0)]
    assert p1[("full", "default")]["best_fid"] == "True" and p1[("lora", "r4")]["best_fid"] == "False"
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
        assert row["train_job_id"].endswith("--train") and float(row["gpu_hours"]) == 0.10
        assert row["params_trainable"] == "120000"
    for row in runs:
        assert (base / "out" / row["loss_curve"]).is_file() and (base / "out" / row["grid_png"]).is_file()
        assert row["sample_job_id"].endswith("--sample")
    assert float(next(r for r in runs if r["method"] == "full")["fid"]) == 19.0


def test_status_summary_counts_failures(built):
    base = built[0]
    rows = read_csv(base / "out" / "status.csv")
    status = {(r["benchmark"], r["step"], r["status"]): int(r["count"]) for r in rows}
    assert status[(BENCH_A, "train", "failed")] == 1
    assert status[(BENCH_A, "sample", "cancelled")] == 1
    assert status[(BENCH_A, "evaluate", "success")] == len(RUNS) + len(P2_FID)
    md = (base / "out" / BENCH_A / "leaderboard.md").read_text()
    failed_id = run_id_of("lora", "r4", BENCH_A, 2) + "--train"
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
    # two seeds 20 and 22: resampled means 20, 21, 21, 22, whose 2.5% and 97.5% quantiles are 20.075 and 21.925
    assert p1["full"]["FID ↓"] == "**19.00**" and p1["kind"]["FID ↓"] == "21.00 ± 1.41 [20.07, 21.93]"
    assert p1["kind"]["Precision ↑"].startswith("**0.610 ± 0.014 [") and p1["kind"]["Seeds"] == "2"
    assert p1["kind"]["Trainable"] == "120K" and p1["lora"]["Pareto (FID)"] == "params, compute"
    assert p1["bitfit"]["Pareto (FID)"] == "compute" and p1["full"]["Rank"] == "1"
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
    assert {"benchmark": "", "step": "", "status": "malformed", "count": "1"} in status
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
    transfer = next((results_copy / "records").glob("bitfit--default--*--s0--*--train.json"))
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


# ---- stale records: made by other code, never ranked with current ones -------------------------------------------


def edit_record(root: Path, job_id: str, change) -> None:
    """Rewrite the success record ``job_id`` under ``root`` with ``change(record)`` applied (as another kindbench
    version, or an older one, would have left it)."""
    path = root / "records" / f"{job_id}.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def other_code(record: dict) -> None:
    record["run_info"]["code"]["fingerprint"] = "0" * 16


def evaluate_job(method: str, variant: str, seed: int, benchmark: str = BENCH_A) -> str:
    return run_id_of(method, variant, benchmark, seed) + "--evaluate"


def all_rows(base: Path, benchmark: str = BENCH_A) -> list[dict[str, str]]:
    return read_csv(base / "out" / benchmark / "leaderboard.csv")


def build_quietly(root: Path, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeaderboardWarning)
        build_leaderboards(root, out)


def stale_section(md: str) -> str:
    assert md.count("## Stale rows (made by other code; not ranked)") == 1
    return md.split("## Stale rows (made by other code; not ranked)")[1].split("\n## ")[0]


def test_fixture_records_are_current(built):
    """The fixtures carry this checkout's fingerprints and consistent input digests: nothing is stale."""
    base = built[0]
    runs = read_csv(base / "out" / "leaderboard_runs.csv")
    assert runs and {r["stale"] for r in runs} == {""}
    assert {r["stale"] for r in all_rows(base)} == {""}
    status = {(r["benchmark"], r["step"], r["status"]): r["count"] for r in read_csv(base / "out" / "status.csv")}
    assert status[(BENCH_A, "evaluate", "stale")] == "0" and status[(BENCH_B, "evaluate", "stale")] == "0"
    assert "Stale rows" not in (base / "out" / BENCH_A / "leaderboard.md").read_text()
    assert "stale" not in (base / "out" / BENCH_A / "leaderboard.tex").read_text()


def test_other_code_is_stale_listed_apart_and_never_ranked(results_copy, tmp_path, monkeypatch):
    """full (FID 19, best of P1) re-scored by other code at FID 5: stale, so kind (21) is still ranked first."""
    job = evaluate_job("full", "default", 0)

    def better_but_other_code(record):
        other_code(record)
        record["eval_info"]["metrics"]["fid"]["value"] = 5.0

    edit_record(results_copy, job, better_but_other_code)
    build_quietly(results_copy, tmp_path / "out")

    rows = [r for r in all_rows(tmp_path) if r["protocol_id"] == PID1]
    full = [r for r in rows if r["method"] == "full"]
    checkout = code_fingerprint("evaluate")["fingerprint"]
    assert len(full) == 1
    assert full[0]["stale"] == f"{job} was made by other code (fingerprint {'0' * 16}, checkout {checkout})"
    assert full[0]["rank"] == "" and float(full[0]["fid_mean"]) == 5.0
    assert not [k for k, v in full[0].items() if k.startswith(("best_", "pareto_")) and v != "False"]
    current = {r["method"]: r for r in rows if not r["stale"]}
    assert {m: r["rank"] for m, r in current.items()} == {"kind": "1", "lora": "2", "bitfit": "3"}
    assert current["kind"]["best_fid"] == "True" and current["kind"]["best_is"] == "True"  # full had the best IS
    assert {m for m, r in current.items() if r["pareto_fid_vs_params"] == "True"} == {"lora", "kind"}
    assert rows[-1]["method"] == "full"  # after the ranked rows of its protocol
    runs = read_csv(tmp_path / "out" / "leaderboard_runs.csv")
    assert [r["eval_job_id"] for r in runs if r["stale"]] == [job]

    md = (tmp_path / "out" / BENCH_A / "leaderboard.md").read_text()
    p1 = _table_rows(md.split("## Stale rows")[0], PID1)
    assert set(p1) == {"kind", "lora", "bitfit"} and p1["kind"]["Rank"] == "1" and p1["kind"]["FID ↓"] == (
        "**21.00 ± 1.41 [20.07, 21.93]**")
    section = stale_section(md)
    assert md.index("## Stale rows") > md.index(f"## Protocol {PID2}")  # after every ranked table
    assert "`kindbench run` re-runs stale jobs" in section and "`kindbench plan`" in section
    line = next(line for line in section.splitlines() if line.startswith(f"| {PID1} | full |"))
    assert "| 5.000 |" in line and "**" not in line and f"{job} was made by other code" in line

    tex = (tmp_path / "out" / BENCH_A / "leaderboard.tex").read_text()
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    assert not [line for line in body if "& full &" in line] and "\\textbf{21.00 $\\pm$ 1.41 [20.07, 21.93]}" in tex
    (comment,) = [line for line in tex.splitlines() if line.startswith("% 1 stale row(s) left out")]
    assert f"full/default (protocol {PID1}, seeds 0): {job} was made by other code" in comment

    status = {(r["benchmark"], r["step"], r["status"]): r["count"] for r in read_csv(tmp_path / "out" / "status.csv")}
    assert status[(BENCH_A, "evaluate", "stale")] == "1" and status[(BENCH_B, "evaluate", "stale")] == "0"
    assert status[(BENCH_A, "evaluate", "success")] == str(len(RUNS) + len(P2_FID))  # stale ones still succeeded
    assert "Stale evaluations (made by other code; not ranked): 1 of 8 successful" in (
        tmp_path / "out" / "status.md").read_text()

    # the plots never draw the stale row or run as a result of this code
    from bench.report import plots

    seen: dict[str, list] = {"board": [], "runs": []}
    monkeypatch.setattr(plots, "pareto_figure", lambda rows, axis, styles: seen["board"].extend(rows))
    monkeypatch.setattr(plots, "loss_figure", lambda runs, base, styles: seen["runs"].extend(runs))
    monkeypatch.setattr(plots, "samples_figure", lambda runs, base: seen["runs"].extend(runs))
    plots.make_plots(tmp_path / "out", tmp_path / "figs")
    assert {r["method"] for r in seen["board"]} == {"kind", "lora", "bitfit"}
    assert {r["method"] for r in seen["runs"]} == {"kind", "lora", "bitfit"}


def test_upstream_transfer_of_other_code_makes_the_evaluation_stale(results_copy, tmp_path):
    """lora s0's transfer ran other code: both its evaluations are stale; seed 1 stays a current row of its own."""
    transfer = run_id_of("lora", "r4", BENCH_A, 0) + "--train"
    edit_record(results_copy, transfer, other_code)
    build_quietly(results_copy, tmp_path / "out")
    rows = all_rows(tmp_path)
    lora = {(r["protocol_id"], r["stale"] != ""): r for r in rows if r["method"] == "lora"}
    assert set(lora) == {(PID1, False), (PID1, True), (PID2, True)}  # never merged across staleness
    assert lora[(PID1, False)]["seeds"] == "1" and float(lora[(PID1, False)]["fid_mean"]) == 27.0
    assert lora[(PID1, False)]["rank"] == "3" and lora[(PID1, False)]["stale"] == ""
    for key in ((PID1, True), (PID2, True)):
        assert lora[key]["seeds"] == "0" and lora[key]["rank"] == ""
        assert lora[key]["stale"].startswith(f"{transfer} was made by other code (fingerprint {'0' * 16}")
    p2 = [r for r in rows if r["protocol_id"] == PID2 and not r["stale"]]
    # lora won P2 before; kind alone now: ranked, but a column of one value has no best to bold
    assert [(r["method"], r["rank"], r["best_fid"]) for r in p2] == [("kind", "1", "False")]
    runs = read_csv(tmp_path / "out" / "leaderboard_runs.csv")
    stale_runs = {r["eval_job_id"] for r in runs if r["stale"]}
    assert stale_runs == {run_id_of("lora", "r4", BENCH_A, 0) + s for s in ("--evaluate", "--evaluate--p2")}
    status = {(r["benchmark"], r["status"]): r["count"] for r in read_csv(tmp_path / "out" / "status.csv")
              if r["step"] == "evaluate"}
    assert status[(BENCH_A, "stale")] == "2"


def test_record_without_code_fingerprint_is_stale_and_not_merged(results_copy, tmp_path):
    """kind s1 made before fingerprints existed: its own stale row; kind's current row keeps seed 0 only."""
    job = evaluate_job("kind", "default", 1)
    edit_record(results_copy, job, lambda record: record["run_info"].pop("code"))
    build_quietly(results_copy, tmp_path / "out")
    kind = {r["stale"] != "": r for r in all_rows(tmp_path) if r["method"] == "kind" and r["protocol_id"] == PID1}
    assert kind[True]["stale"] == f"{job} was made by a kindbench without code fingerprints"
    assert kind[True]["seeds"] == "1" and float(kind[True]["fid_mean"]) == 22.0 and kind[True]["rank"] == ""
    assert kind[False]["seeds"] == "0" and float(kind[False]["fid_mean"]) == 20.0 and kind[False]["rank"] == "2"
    assert kind[False]["fid_std"] == "" and kind[False]["best_precision"] == "True"  # 0.60, not 0.61 with seed 1
    assert kind[True]["best_precision"] == "False"  # 0.62 beats every current row, but it is stale
    md = (tmp_path / "out" / BENCH_A / "leaderboard.md").read_text()
    assert "without code fingerprints" in stale_section(md)


def test_input_rerun_after_consumption_is_stale(results_copy, tmp_path):
    """kind s0's sample was re-run after its evaluations consumed it: both evaluations are stale."""
    sample = run_id_of("kind", "default", BENCH_A, 0) + "--sample"
    edit_record(results_copy, sample, lambda r: r["run_info"].update(finished_at="2025-03-05T10:00:00.000+00:00"))
    build_quietly(results_copy, tmp_path / "out")
    runs = read_csv(tmp_path / "out" / "leaderboard_runs.csv")
    stale = {r["eval_job_id"]: r["stale"] for r in runs if r["stale"]}
    job = evaluate_job("kind", "default", 0)
    assert stale == {job: f"{sample} was re-run after {job} consumed it",
                     f"{job}--p2": f"{sample} was re-run after {job}--p2 consumed it"}


def test_every_row_stale_after_a_code_change(built, tmp_path, monkeypatch):
    """The checkout's evaluation code changed since every record was made: nothing is ranked, nothing typeset."""
    import bench.records.currency

    real = bench.records.currency.code_fingerprint

    def changed(step, method=None):
        found = dict(real(step, method))
        if step == "evaluate":
            found["fingerprint"] = "f" * 16
        return found

    monkeypatch.setattr(bench.records.currency, "code_fingerprint", changed)
    build_quietly(built[0] / "results", tmp_path / "out")
    rows = all_rows(tmp_path)
    assert rows and all(r["stale"] and r["rank"] == "" for r in rows)
    assert all("checkout ffffffffffffffff" in r["stale"] for r in rows)
    md = (tmp_path / "out" / BENCH_A / "leaderboard.md").read_text()
    assert "## Protocol" not in md and "No evaluation made by this checkout's code yet" in md
    assert len([line for line in stale_section(md).splitlines() if line.startswith("| ")]) == 2 + len(rows)
    tex = (tmp_path / "out" / BENCH_A / "leaderboard.tex").read_text()
    assert "\\begin{table}" not in tex and f"% {len(rows)} stale row(s) left out" in tex


def test_current_evaluation_beats_a_later_stale_duplicate(results_copy, tmp_path):
    store = RecordStore(results_copy)
    original = store.read(evaluate_job("kind", "default", 0))
    redo = json.loads(json.dumps(original))
    redo["run_info"]["job_id"] += "--redo"
    redo["run_info"]["finished_at"] = "2025-03-02T10:00:00.000+00:00"
    redo["run_info"].pop("code")
    redo["eval_info"] = eval_info(RUNS[("kind", "learngene", "default", 0)], P1, fid=18.0)
    store.write(redo)
    with pytest.warns(LeaderboardWarning, match="two evaluations"):
        build_leaderboards(results_copy, tmp_path / "out")
    kind = [r for r in all_rows(tmp_path) if r["method"] == "kind" and r["protocol_id"] == PID1]
    assert len(kind) == 1 and kind[0]["stale"] == "" and float(kind[0]["fid_mean"]) == pytest.approx(21.0)


# ---- Pareto front unit ---------------------------------------------------------------------------------------------


def test_pareto_flags_unit():
    xs = [1.0, 2.0, 2.0, 3.0, None, 4.0]
    ys = [10.0, 8.0, 9.0, 8.0, 1.0, None]
    assert pareto_flags(xs, ys, higher_is_better=False) == [True, True, False, False, False, False]
    assert pareto_flags(xs, ys, higher_is_better=True) == [True, False, False, False, False, False]
    assert pareto_flags([1.0, 1.0], [5.0, 5.0], higher_is_better=False) == [True, True]  # ties do not dominate
    assert pareto_flags([], [], higher_is_better=True) == []


# ---- intervals over seeds, ties and best markers ---------------------------------------------------------------


def test_the_bootstrap_interval_of_three_seeds_matches_the_hand_computed_one():
    """Seeds 1, 2, 3: the 27 equally likely resamples have means 1, 4/3, ..., 3 with multiplicities 1, 3, 6, 7, 6, 3,
    1; numpy's linear quantiles put 2.5% at index 0.65 (1 + 0.65/3) and 97.5% at index 25.35 (8/3 + 0.35/3)."""
    from bench.report.intervals import bootstrap_interval

    low, high = bootstrap_interval([3.0, 1.0, 2.0])
    assert low == pytest.approx(1 + 0.65 / 3) and high == pytest.approx(8 / 3 + 0.35 / 3)
    assert bootstrap_interval([5.0]) is None and bootstrap_interval([5.0, None]) is None
    many = bootstrap_interval([float(v) for v in range(10)])  # 10^10 resamples: drawn, with a fixed seed
    assert many == bootstrap_interval([float(v) for v in range(10)]) and 2.0 < many[0] < 4.5 < many[1] < 7.0



def test_the_interval_over_seeds_and_samples_matches_the_hand_computed_mixture():
    from statistics import NormalDist

    from bench.report.intervals import bootstrap_interval, combined_interval, sd_from_interval

    # one seed: only its samples' noise, value +- 1.96 sd
    low, high = combined_interval([10.0], [1.0], resamples=400_000)
    assert low == pytest.approx(10.0 - 1.96, abs=0.03) and high == pytest.approx(10.0 + 1.96, abs=0.03)
    # seeds 0 and 2, each with sample sd 1: the mean of two draws is N(0, 1/2), N(1, 1/2) or N(2, 1/2) with
    # probabilities 1/4, 1/2, 1/4; its 2.5 % and 97.5 % quantiles by bisection on that mixture's CDF
    sd = 0.5 ** 0.5
    parts = [(0.25, NormalDist(0.0, sd)), (0.5, NormalDist(1.0, sd)), (0.25, NormalDist(2.0, sd))]

    def quantile(q: float) -> float:
        lo, hi = -5.0, 7.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(w * d.cdf(mid) for w, d in parts) < q else (lo, mid)
        return lo

    low, high = combined_interval([0.0, 2.0], [1.0, 1.0], resamples=400_000)  # Monte Carlo error about 0.005
    assert low == pytest.approx(quantile(0.025), abs=0.03) and high == pytest.approx(quantile(0.975), abs=0.03)
    assert low < bootstrap_interval([0.0, 2.0])[0]  # wider than over seeds alone
    # no sample noise known: exactly the bootstrap over seeds
    assert combined_interval([3.0, 1.0, 2.0], [None, 0.0, None]) == bootstrap_interval([3.0, 1.0, 2.0])
    assert combined_interval([5.0], [None]) is None
    assert sd_from_interval([8.04, 11.96]) == pytest.approx(1.0, abs=1e-3) and sd_from_interval(None) is None


def test_intervals_stay_inside_the_metrics_range():
    """A precision near 0 with sample noise, and a floor FID whose normal bootstrap interval reaches below 0, were
    published with negative lower bounds (results/small, `smaller` and `sketch`)."""
    from bench.report.intervals import combined_interval
    from bench.report.leaderboard import value_range, within

    values, sds = [0.0, 0.0078, 0.0], [0.004, 0.005, 0.003]  # the shape of Weight Selection's precision on `smaller`
    assert combined_interval(values, sds)[0] < 0  # the unclipped normal draws
    low, high = combined_interval(values, sds, bounds=(0.0, 1.0))
    assert low >= 0.0 and 0.0 < high < 0.02
    low, high = combined_interval([0.99, 1.0, 1.0], [0.01, 0.0, 0.0], bounds=(0.0, 1.0))
    assert high <= 1.0 and low > 0.95
    assert within("fid", [-0.193, 1.02]) == (0.0, 1.02)
    assert within("precision", [0.9, 1.04]) == (0.9, 1.0) and within("kid", [-0.01, 0.02]) == (-0.01, 0.02)
    assert within("fid", None) is None
    # the ranges come from the metric registry: IS is at least 1, a metric it does not know is unbounded
    assert within("is", [0.7, 1.3]) == (1.0, 1.3) and value_range("a_plugin_metric") == (-math.inf, math.inf)


def _group(means_by_method: dict[str, list[float]]) -> list[dict]:
    from bench.report.leaderboard import aggregate_group

    rows = []
    for method, values in means_by_method.items():
        runs = [{"benchmark": "b", "task": "t", "stage": "transfer", "arch": "a", "protocol_id": "p",
                 **{k: None for k in PROTOCOL_KEYS},
                 "method": method, "family": "f", "variant": "default", "seed": seed, "run_id": f"{method}{seed}",
                 "stale": "", **{k: None for k in AGG_COSTS}, "fid": value} for seed, value in enumerate(values)]
        rows.append(aggregate_group(runs, ["fid"]))
    return rows


def test_rows_whose_interval_overlaps_the_best_share_its_rank():
    from bench.report.leaderboard import rank_protocol_group

    rows = rank_protocol_group(_group({"a": [10.0, 11.0, 12.0], "b": [11.5, 12.5, 13.5], "c": [20.0, 21.0, 22.0],
                                       "d": [30.0]}), ["fid"], {"fid": False})
    by = {r["method"]: r for r in rows}
    assert by["a"]["best_fid"] and not by["a"]["tied_fid"] and by["b"]["tied_fid"]  # [10.2, 11.8] vs [11.7, 13.3]
    assert not by["c"]["tied_fid"] and not by["d"]["tied_fid"]  # d: one seed, no interval
    assert [(r["method"], r["rank"]) for r in rows] == [("a", 1), ("b", 1), ("c", 3), ("d", 4)]
    assert fmt_rank(by["b"], "fid") == "=1" and fmt_rank(by["a"], "fid") == "1" and fmt_rank(by["c"], "fid") == "3"


def test_a_column_where_every_row_has_the_same_value_has_no_best():
    from bench.report.leaderboard import rank_protocol_group

    rows = rank_protocol_group(_group({"a": [0.0], "b": [0.0], "c": [0.0]}), ["fid"], {"fid": False})
    assert not any(r["best_fid"] or r["tied_fid"] for r in rows)
    differing = rank_protocol_group(_group({"a": [0.0], "b": [1.0]}), ["fid"], {"fid": False})
    assert [r["best_fid"] for r in differing] == [True, False]


def _run(method: str, seed: int, fid: float, n_samples: int = 256) -> dict:
    # the reference id is the reference's own (the images' hash), not the prepare job's: the floor is found upstream
    protocol = {k: None for k in PROTOCOL_KEYS} | {"reference_id": "images-0123", "n_samples": n_samples}
    return {"benchmark": "b", "task": "t", "stage": "transfer", "arch": "a", "protocol_id": "p", **protocol,
            "method": method,
            "family": "f", "variant": "default", "seed": seed, "run_id": f"{method}{seed}", "stale": "",
            "eval_job_id": f"{method}{seed}--evaluate", **{k: None for k in AGG_COSTS}, "fid": fid}


def _records(runs: list[dict], prepare: dict) -> list[dict]:
    evaluations = [{"run_info": {"job_id": r["eval_job_id"], "run_id": r["run_id"], "step": "evaluate",
                                 "depends_on": [f"{r['run_id']}--sample", "prepare--t"]}} for r in runs]
    return [prepare, *evaluations]


def test_each_protocol_group_ends_with_its_unranked_floor_row_from_the_reference():
    from bench.report.leaderboard import FLOOR_METHOD, RecordIndex, aggregate

    floor = {"n_samples": 256, "metrics": {"fid": {"value": 2.5, "higher_is_better": False}},
             "sample_intervals": {"fid": [2.0, 3.1]}}
    prepare = {"run_info": {"job_id": "prepare--t", "run_id": None, "step": "prepare", "depends_on": []},
               "extra": {"floor": floor}}
    runs = [_run("a", s, v) for s, v in enumerate([10.0, 11.0, 12.0])] + [_run("b", 0, 30.0)]
    rows = aggregate(runs, {"fid": False}, RecordIndex(_records(runs, prepare)))["b"]
    assert [r["method"] for r in rows] == ["a", "b", FLOOR_METHOD]
    last = rows[-1]
    assert last["rank"] is None and not last["best_fid"] and last["family"] == "floor"
    assert (last["fid_mean"], last["fid_ci_low"], last["fid_ci_high"]) == (2.5, 2.0, 3.1)
    assert rows[0]["best_fid"] and rows[0]["rank"] == 1  # the floor never takes the best marker from a method
    # a floor made for another sample count is not this protocol's floor
    other_runs = [_run("a", 0, 10.0, n_samples=512)]
    other = aggregate(other_runs, {"fid": False}, RecordIndex(_records(other_runs, prepare)))["b"]
    assert [r["method"] for r in other] == ["a"]


def test_the_aggregate_job_leaves_no_table_or_figure_of_an_earlier_protocol(tmp_path):
    """A rebuilt reference is a new protocol: the old protocol's figures must not stay beside the new ones."""
    from bench.pipeline.plan import Job
    from bench.pipeline.steps import Roots, aggregation

    results = tmp_path / "results"
    write_fixture_store(results)
    stray = [results / "plots" / BENCH_A / "0ld0ld00" / "samples.png", results / "leaderboard" / "gone" / "x.csv"]
    for path in stray:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"old")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluations = tuple(p.stem for p in (results / "records").glob("*.json")
                            if json.loads(p.read_text())["run_info"]["step"] == "evaluate")
        out = aggregation.run(Job("agg", "aggregate", evaluations), Roots(tmp_path / "runs", results), None, None)
    assert not any(path.exists() for path in stray)
    assert (results / "leaderboard" / BENCH_A / "leaderboard.csv").is_file()
    assert any(p.endswith("summary.png") for p in out.blocks["extra"]["aggregate"]["plots"])


def test_only_the_plans_evaluations_are_ranked(results_copy, tmp_path):
    """A record whose job left the suite (a changed setting gives new ids) stays in the store, but the aggregate job
    ranks only its plan's evaluations (``evaluations_of``)."""
    evaluations = [p.stem for p in (results_copy / "records").glob("*.json")
                   if json.loads(p.read_text())["run_info"]["step"] == "evaluate"]
    everything = build_leaderboards(results_copy, tmp_path / "all")
    kept = [job for job in evaluations if not job.startswith("lora--")]
    build_leaderboards(results_copy, tmp_path / "plan", evaluations_of=set(kept))
    runs_all = read_csv(tmp_path / "all" / "leaderboard_runs.csv")
    runs_plan = read_csv(tmp_path / "plan" / "leaderboard_runs.csv")
    assert everything and any(r["method"] == "lora" for r in runs_all)
    assert not any(r["method"] == "lora" for r in runs_plan)
    assert len(runs_plan) == len(runs_all) - sum(r["method"] == "lora" for r in runs_all)
