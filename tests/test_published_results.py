"""The published results under ``results/`` are what they say: one clean commit, complete provenance."""

from __future__ import annotations

import json

import pytest
from trainrun import REPO

SUITES = sorted(p.parent.name for p in (REPO / "results").glob("*/records"))


def _records(suite: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (REPO / "results" / suite / "records").glob("*.json")}


@pytest.mark.parametrize("suite", SUITES)
def test_published_records_come_from_one_clean_commit_with_fingerprints(suite):
    records = _records(suite)
    assert records
    assert {r["run_info"]["git_sha"] for r in records.values()} and len({r["run_info"]["git_sha"]
                                                                          for r in records.values()}) == 1
    assert not any(r["run_info"]["git_dirty"] for r in records.values())
    assert all(r["run_info"].get("code", {}).get("fingerprint") for r in records.values())
    assert all("outputs" in r for r in records.values())


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
