"""The published results under ``results/`` are what they say: clean commits, this checkout's code, complete
provenance."""

from __future__ import annotations

import json

import pytest
from trainrun import REPO

from bench.records.currency import stale_reason
from bench.records.store import RecordStore

SUITES = sorted(p.parent.name for p in (REPO / "results").glob("*/records"))


def _marked_stale(suite: str) -> bool:
    """A suite whose code changed since its run says so in ``results/<suite>/STALE.md`` (what changed, at which
    commit, how to re-run it) until it is re-run; its leaderboards then list every row as stale, unranked."""
    return (REPO / "results" / suite / "STALE.md").exists()


def _records(suite: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (REPO / "results" / suite / "records").glob("*.json")}


@pytest.mark.parametrize("suite", SUITES)
def test_published_records_come_from_clean_commits_with_fingerprints(suite):
    records = _records(suite)
    assert records
    assert all(r["run_info"]["git_sha"] for r in records.values())
    assert not any(r["run_info"]["git_dirty"] for r in records.values())
    assert all(r["run_info"].get("code", {}).get("fingerprint") for r in records.values())
    assert all("outputs" in r for r in records.values())


@pytest.mark.parametrize("suite", SUITES)
def test_every_published_record_is_current_at_this_checkout_or_the_suite_says_it_is_stale(suite):
    """Each record was made by the code this checkout holds for its job (its code fingerprint is the checkout's) from
    the inputs published beside it: a change to a method, a metric or the report that is not re-run fails here,
    unless the suite is marked stale (``STALE.md``), and then every record must be stale (a note that outlives the
    staleness fails too). A suite resumed across commits may hold several commits' records, each current."""
    store = RecordStore(REPO / "results" / suite)
    memo: dict[str, str] = {}
    stale = {job_id: reason for job_id in _records(suite) if (reason := stale_reason(job_id, store, memo))}
    if _marked_stale(suite):
        evaluations = [job_id for job_id in _records(suite) if "--evaluate-" in job_id]
        assert evaluations and all(job_id in stale for job_id in evaluations), f"results/{suite}/STALE.md outlived it"
    else:
        assert not stale, f"{len(stale)} stale record(s), e.g. {next(iter(stale.values()))}; re-run the suite"


@pytest.mark.parametrize("suite", SUITES)
def test_every_transfer_names_the_sha256_of_the_ancestry_it_loaded(suite):
    records = _records(suite)
    inheriting = [r for r in records.values() if r["run_info"]["step"] == "train" and r["run_info"]["ancestry"]]
    assert inheriting
    for record in inheriting:
        ancestry = record["run_info"]["ancestry"]
        parent = records[ancestry["job_id"]]
        assert ancestry["sha256"] and ancestry["sha256"] == parent["outputs"]["export"]["sha256"], ancestry["job_id"]
        assert ancestry["path"] == parent["outputs"]["export"]["path"]


@pytest.mark.parametrize("suite", SUITES)
def test_every_leaderboard_row_has_the_suites_seeds_an_interval_and_ends_with_its_floor(suite):
    """Rows of a published suite carry every seed it declares (a std and an interval with two or more), and every
    protocol table of the embedded suites ends with its floor row (held-out real images). A suite marked stale
    ranks nothing: every row but the floor is stale and unranked."""
    import csv

    from bench.config.suite import load_suite

    n_seeds = len(load_suite(suite).seeds)
    boards = sorted((REPO / "results" / suite / "leaderboard").glob("*/leaderboard.csv"))
    assert boards
    for board in boards:
        rows = list(csv.DictReader(board.open(newline="")))
        if _marked_stale(suite):
            assert all(row["stale"] and not row["rank"] for row in rows if row["method"] != "real images"), board
            continue
        assert rows and not any(row["stale"] for row in rows), board
        by_protocol: dict[str, list[dict]] = {}
        for row in rows:
            by_protocol.setdefault(row["protocol_id"], []).append(row)
        for group in by_protocol.values():
            assert group[-1]["method"] == "real images" and group[-1]["rank"] == "", board
            for row in group[:-1]:
                means = [row[f"{m}_mean"] for m in ("fid", "precision", "class_acc")]
                assert int(row["n_seeds"]) == n_seeds and all(means), (board.parent.name, row["method"])
                assert row["fid_ci_low"] and row["fid_ci_high"], (board.parent.name, row["method"])
                if n_seeds > 1:
                    assert row["fid_std"] and row["class_acc_std"], (board.parent.name, row["method"])


def _board(suite: str, benchmark: str) -> dict[tuple[str, str], dict]:
    import csv

    path = REPO / "results" / suite / "leaderboard" / benchmark / "leaderboard.csv"
    return {(row["method"], row["variant"]): row for row in csv.DictReader(path.open(newline=""))}


def test_the_small_suite_learns_its_classes_and_separates_inheritance_from_scratch():
    """What the small suite exists to show (results/small/FINDINGS.md), in its published numbers (whether they are
    this code's is the currency test's question, and a stale suite says so in STALE.md): the dense
    ancestry's samples reach a class accuracy of at least 85% of the classifier's on held-out real images (the floor
    row); the best novel-class transfer reaches precision 0.5; scratch at the transfer budget is worse than the best
    inherited method with intervals that do not overlap."""
    ancestry = _board("small", "ancestry--DiT-T-2-d4")
    ceiling = float(ancestry[("real images", "held-out")]["class_acc_mean"])
    assert float(ancestry[("scratch", "dense")]["class_acc_mean"]) >= 0.85 * ceiling
    novel = {key: row for key, row in _board("small", "novel-a--DiT-T-2-d4").items() if key[0] != "real images"}
    inherited = [row for key, row in novel.items() if key[0] != "scratch"]
    assert max(float(row["precision_mean"]) for row in inherited) >= 0.5
    best = min(inherited, key=lambda row: float(row["fid_mean"]))
    assert float(novel[("scratch", "default")]["fid_ci_low"]) > float(best["fid_ci_high"])
