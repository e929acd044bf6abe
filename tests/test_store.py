"""The records store: schema validation, status routing, immutability, and many concurrent writers (real processes)."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import time

import pytest
from recordfixtures import (
    GIT,
    N_WRITERS,
    PER_WRITER,
    big_writer,
    check_complete,
    concurrent_writer,
    racing_writer,
    simple_record,
)

from bench.records.store import (
    SCHEMA_VERSION,
    MalformedRecordError,
    RecordStore,
    load_record,
    new_record,
    new_run_info,
    utc_now,
    validate_job_record,
)

# ---- builders and validation ---------------------------------------------------------------------------------------


def test_new_record_is_valid_and_stamped_in_utc():
    record = simple_record("kind--s0--3f9a1c2e--evaluate")
    validate_job_record(record)
    assert record["schema_version"] == SCHEMA_VERSION
    for key in ("created_at", "finished_at"):
        stamp = datetime.datetime.fromisoformat(record["run_info"][key])
        assert stamp.utcoffset() == datetime.timedelta(0)
    assert record["timings"]["step_wall_s"] >= 0
    assert datetime.datetime.fromisoformat(utc_now()).tzinfo is not None


def test_failure_record_gets_a_one_line_error():
    info = new_run_info(job_id="a--transfer", run_id="a", step="train", suite="tiny", benchmark="b", task="t",
                        arch="DiT-T/2", method="kind", family="learngene", variant="default", seed=0, config={},
                        config_hash="x", git=GIT)
    record = new_record(info, status="failed", error=RuntimeError("CUDA out of memory\n  at line 3"), meta_info={})
    assert record["error"] == "RuntimeError: CUDA out of memory at line 3"
    with pytest.raises(ValueError, match="one-line error"):
        new_record(info, status="cancelled", meta_info={})
    with pytest.raises(ValueError, match="train_info"):  # a successful transfer must say what it trained
        new_record(info, status="success", meta_info={})


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("status"), "record lacks status"),
    (lambda r: r.update(status="done"), "status must be one of"),
    (lambda r: r.update(schema_version=2), "schema_version is 2"),
    (lambda r: r["run_info"].update(job_id="../etc/passwd"), "not safe as a file name"),
    (lambda r: r["run_info"].update(job_id="a/b"), "not safe as a file name"),
    (lambda r: r["run_info"].update(job_id=".hidden"), "not safe as a file name"),
    (lambda r: r["run_info"].pop("benchmark"), "run_info lacks benchmark"),
    (lambda r: r["run_info"].update(step="fit"), "run_info.step must be one of"),
    (lambda r: r["run_info"].update(depends_on="a--sample"), "depends_on must be a list"),
    (lambda r: r["run_info"].update(created_at="yesterday"), "ISO-8601"),
    (lambda r: r["run_info"].update(created_at="2025-03-01T10:00:00+02:00"), "must be in UTC"),
    (lambda r: r["eval_info"]["protocol"].pop("extractor"), "eval_info.protocol lacks extractor"),
    (lambda r: r["eval_info"]["metrics"].update(fid={"value": 3.0}), "eval_info.metrics.fid must be"),
    (lambda r: r["eval_info"]["metrics"]["fid"].update(value=float("nan")), "finite number"),
    (lambda r: r.pop("eval_info"), "successful evaluate record needs eval_info"),
    (lambda r: r.update(error="should not be here"), "error=None"),
    (lambda r: r["run_info"]["config"].update(lr=float("inf")), "not JSON compliant"),
    (lambda r: r["run_info"]["config"].update(path=object()), "not JSON serializable"),
])
def test_write_rejects_invalid_records_with_a_clear_message(tmp_path, mutate, message):
    record = simple_record("kind--s0--3f9a1c2e--evaluate")
    mutate(record)
    store = RecordStore(tmp_path)
    with pytest.raises(ValueError, match=message):
        store.write(record)
    assert not any(tmp_path.rglob("*.json")) and not any(tmp_path.rglob(".*.tmp"))


# ---- routing and immutability --------------------------------------------------------------------------------------


def test_status_routing_and_lookup(tmp_path):
    store = RecordStore(tmp_path)
    ok = store.write(simple_record("run--evaluate"))
    bad = store.write(simple_record("run2--transfer", step="train", status="failed"))
    gone = store.write(simple_record("run3--sample", step="sample", status="cancelled"))
    assert ok == tmp_path / "records" / "run--evaluate.json"
    assert bad == tmp_path / "failed" / "run2--transfer.json" and gone.parent == tmp_path / "failed"
    assert store.exists("run--evaluate") and not store.exists("run2--transfer") and not store.exists("nope")
    assert store.read("run--evaluate")["eval_info"]["metrics"]["fid"]["value"] == 21.5
    assert store.read("run2--transfer") is None and store.failed("run2--transfer")["status"] == "failed"
    assert store.failed("run--evaluate") is None
    assert [r["run_info"]["job_id"] for r in store.iter()] == ["run--evaluate"]
    assert sorted(r["run_info"]["job_id"] for r in store.iter("failed")) == ["run2--transfer", "run3--sample"]
    assert len(list(store.iter("all"))) == 3
    with pytest.raises(ValueError, match="status must be"):
        list(store.iter("done"))
    assert json.loads(ok.read_text()) == store.read("run--evaluate")


def test_records_are_immutable_unless_forced(tmp_path):
    store = RecordStore(tmp_path)
    store.write(simple_record("run--evaluate", fid=21.5))
    with pytest.raises(FileExistsError, match="immutable"):
        store.write(simple_record("run--evaluate", fid=99.0))
    with pytest.raises(FileExistsError):  # a failure cannot quietly shadow a success either
        store.write(simple_record("run--evaluate", status="failed"))
    assert store.read("run--evaluate")["eval_info"]["metrics"]["fid"]["value"] == 21.5
    store.write(simple_record("run--evaluate", fid=20.0), force=True)
    assert store.read("run--evaluate")["eval_info"]["metrics"]["fid"]["value"] == 20.0
    old = [json.loads(p.read_text()) for p in (tmp_path / "superseded").glob("run--evaluate.*.json")]
    assert [r["eval_info"]["metrics"]["fid"]["value"] for r in old] == [21.5]


def test_failures_never_block_a_retry_and_are_kept(tmp_path):
    store = RecordStore(tmp_path)
    store.write(simple_record("run--transfer", step="train", status="failed"))
    store.write(simple_record("run--transfer", step="train", status="cancelled"))  # the retry failed again
    assert store.failed("run--transfer")["status"] == "cancelled"
    assert len(list((tmp_path / "superseded").glob("run--transfer.*.json"))) == 1
    store.write(simple_record("run--evaluate", status="failed"))
    store.write(simple_record("run--evaluate"))  # the retry succeeded: the failure leaves failed/
    assert store.exists("run--evaluate") and store.failed("run--evaluate") is None
    assert len(list((tmp_path / "superseded").glob("run--evaluate.*.json"))) == 1
    store.write(simple_record("run--evaluate", status="failed"), force=True)  # forced rerun that failed
    assert not store.exists("run--evaluate") and store.failed("run--evaluate")["status"] == "failed"


# ---- malformed files -----------------------------------------------------------------------------------------------


def test_malformed_files_are_named_in_the_error(tmp_path):
    store = RecordStore(tmp_path)
    store.write(simple_record("good--evaluate"))
    broken = tmp_path / "records" / "broken--evaluate.json"
    broken.write_text('{"schema_version": 1, "run_info": ')  # truncated by a full disk, say
    with pytest.raises(MalformedRecordError, match="broken--evaluate.json"):
        list(store.iter())
    with pytest.raises(MalformedRecordError, match="broken--evaluate.json"):
        store.read("broken--evaluate")
    seen = []
    assert [r["run_info"]["job_id"] for r in store.iter(on_error=lambda p, e: seen.append(p))] == ["good--evaluate"]
    assert seen == [broken]


def test_a_record_must_match_its_file_name_and_folder(tmp_path):
    store = RecordStore(tmp_path)
    path = store.write(simple_record("a--evaluate"))
    renamed = path.with_name("b--evaluate.json")
    renamed.write_text(path.read_text())
    with pytest.raises(MalformedRecordError, match="not the file name"):
        load_record(renamed)
    renamed.unlink()
    misplaced = tmp_path / "failed" / "a--evaluate.json"
    misplaced.parent.mkdir()
    misplaced.write_text(path.read_text())
    with pytest.raises(MalformedRecordError, match="belongs in records/"):
        load_record(misplaced)


def test_stray_temp_files_are_ignored(tmp_path):
    store = RecordStore(tmp_path)
    store.write(simple_record("a--evaluate"))
    (tmp_path / "records" / ".b--evaluate.123.abc.tmp").write_text("{half a rec")  # a writer killed mid-write
    assert [r["run_info"]["job_id"] for r in store.iter()] == ["a--evaluate"]


# ---- concurrency (real processes, spawn) ---------------------------------------------------------------------------


def test_fifty_concurrent_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(N_WRITERS), ctx.Queue()  # all 50 booted before anyone writes: real contention
    procs = [ctx.Process(target=concurrent_writer, args=(str(tmp_path), w, barrier, results))
             for w in range(N_WRITERS)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * N_WRITERS

    store = RecordStore(tmp_path)
    records = {r["run_info"]["job_id"]: r for r in store.iter()}  # validates every file
    assert len(records) == N_WRITERS * PER_WRITER + 1
    for w in range(N_WRITERS):
        for k in range(PER_WRITER):
            assert records[f"w{w:02d}-r{k}--evaluate"]["eval_info"]["metrics"]["fid"]["value"] == w + k / 10
    winners = [w for outcome, w in outcomes if outcome == "won"]
    assert len(winners) == 1, f"exactly one writer may publish a contested job id, got {winners}"
    assert records["contested--evaluate"]["eval_info"]["metrics"]["fid"]["value"] == winners[0]
    assert not [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "temp files left behind"
    assert not (tmp_path / "superseded").exists()


def test_a_job_is_never_both_succeeded_and_failed_after_a_race(tmp_path):
    """A failure and a success of the same job written at the same moment: the success wins, the failure is kept
    under superseded/ only (a leaderboard must never list a job that succeeded as failed)."""
    ctx = multiprocessing.get_context("spawn")
    job_ids = [f"race{k:02d}--evaluate" for k in range(40)]
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=racing_writer, args=(str(tmp_path), role, job_ids, barrier))
             for role in ("failed", "success") * 4]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    store = RecordStore(tmp_path)
    both = [j for j in job_ids if store.read(j) is not None and store.failed(j) is not None]
    assert not both, f"success and failure records of the same job: {both}"
    assert all(store.read(j) is not None for j in job_ids)


def test_readers_never_see_half_written_records(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Event()
    writer = ctx.Process(target=big_writer, args=(str(tmp_path), 12, 2.0, done))
    writer.start()
    store = RecordStore(tmp_path)
    reads, hot_seen, deadline = 0, False, time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        for path in sorted((tmp_path / "records").glob("*.json")) if (tmp_path / "records").is_dir() else []:
            try:
                record = load_record(path)  # raises on a torn file
            except FileNotFoundError:
                continue
            check_complete(record)
            reads += 1
        hot = store.read("hot--evaluate")
        if hot_seen:
            assert hot is not None, "a forced rewrite must swap atomically, never leave a gap"
        if hot is not None:
            hot_seen = True
            check_complete(hot)
    writer.join(60)
    assert writer.exitcode == 0 and done.is_set()
    assert reads > 0, "the reader never overlapped the writer"
    assert store.read("hot--evaluate")["eval_info"]["metrics"]["fid"]["value"] == 11.0
    assert len(list((tmp_path / "superseded").glob("hot--evaluate.*.json"))) == 11
    assert not [p for p in tmp_path.rglob("*.tmp")]
