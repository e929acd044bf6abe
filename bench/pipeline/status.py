"""Whether a job's record can be trusted: the one rule the local executor, the SLURM submitter and
``kindbench plan`` share.

A job is **done** only when all of these hold:

* its success record exists (``pending`` / ``failed`` otherwise);
* every output the record names exists (``missing``) and still has the recorded sha256 (``changed``);
* the record's code fingerprint is the checkout's (``stale``; ``keep_stale`` accepts it);
* every job it consumed is done (``upstream``) and is the one it consumed: the digest of each input record equals
  the digest recorded when the job ran (``changed``). For the aggregate job that means: every evaluation it reads
  is done and is the one it read, so a new, failed or re-run evaluation makes it aggregate again.

Job ids stay config-addressed, so a job re-run for any reason but ``pending``/``failed`` overwrites its old record
(kept under ``superseded/``) after its old outputs are moved to ``<runs>/superseded/`` (``retire_outputs``): a
stale training run is retrained from its first step, never resumed from a checkpoint of other code.
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.pipeline.steps import Roots
from bench.records.currency import record_digest
from bench.records.fingerprint import code_fingerprint
from bench.records.hashing import file_sha256
from bench.records.store import MalformedRecordError, RecordStore

if TYPE_CHECKING:
    from bench.pipeline.plan import Plan

#: States in which a job runs again over an existing record, so its old outputs must not be reused.
RESTART_STATES = frozenset({"stale", "changed", "upstream"})


@dataclass(frozen=True)
class JobState:
    state: str
    """``done``, ``pending``, ``failed``, ``missing``, ``changed``, ``stale`` or ``upstream``."""
    reason: str = ""
    """One line saying why the job is not done ("" when it is)."""

    @property
    def todo(self) -> bool:
        return self.state != "done"


_HASHES: dict[tuple, str] = {}


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, computed once per process for an unchanged file (size, mtime and inode)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def consumed_inputs(job: Any, store: RecordStore) -> dict[str, str]:
    """Digest of every dependency record that exists now (what the job is about to consume)."""
    out = {}
    for dep in job.deps:
        record = store.read(dep)
        if record is not None:
            out[dep] = record_digest(record)
    return out


class _Checker:
    def __init__(self, plan: Plan, roots: Roots, keep_stale: bool):
        self.plan, self.roots, self.keep_stale = plan, roots, keep_stale
        self.store = RecordStore(roots.results)
        self.memo: dict[str, JobState] = {}

    def state(self, job_id: str) -> JobState:
        if job_id not in self.memo:
            self.memo[job_id] = self._state(job_id)
        return self.memo[job_id]

    def _state(self, job_id: str) -> JobState:
        job = self.plan.jobs[job_id]
        try:
            record = self.store.read(job_id)
        except MalformedRecordError as err:
            return JobState("changed", str(err))
        if record is None:
            failed = self.store.failed(job_id)
            return JobState("failed", failed.get("error") or "failed") if failed else JobState("pending", "no record")
        outputs = record.get("outputs")
        if outputs is None:
            return JobState("missing", "the record names no outputs with checksums (made by an older kindbench)")
        for name, out in outputs.items():
            path = self.roots.artefact(out["path"])
            if not path.is_file():
                return JobState("missing", f"{name} {path} does not exist")
            if cached_sha256(path) != out["sha256"]:
                return JobState("changed", f"{name} {path} differs from the sha256 its record holds")
        if job.step in ("pretrain", "train") and job.config:
            moved = data_changed(job.config, record)
            if moved:
                return JobState("changed", moved)
        recorded = (record["run_info"].get("code") or {}).get("fingerprint")
        current = code_fingerprint(job.step, job.info.get("method") or None)["fingerprint"]
        if recorded != current and not self.keep_stale:
            return JobState("stale", f"code fingerprint {recorded} != {current} (the code of this step or method "
                                     "changed since it ran)")
        consumed = record["run_info"].get("inputs") or {}
        for dep in job.deps:
            dep_state = self.state(dep)
            if dep_state.todo:  # it runs again first (the aggregate job: then re-aggregates what finished)
                return JobState("upstream", f"input {dep} is {dep_state.state}")
            digest = record_digest(self.store.read(dep))
            if consumed.get(dep) != digest:
                return JobState("changed", f"input {dep} is not the one this job consumed")
        return JobState("done")


def data_changed(config: dict[str, Any], record: dict[str, Any]) -> str:
    """Why a training record's data is not the data its config now names ("" when it is). Data paths are not part
    of a run's id, so one job id can come to point at other data (another ``$KINDBENCH_LATENTS``): the data's
    identity is recomputed only when its paths differ from those the record saw."""
    from bench.config.schema import from_dict
    from bench.data.identity import data_identity, same_data_place

    data = from_dict(config).data
    recorded = (record.get("train_info") or {}).get("data") or {}
    if same_data_place(recorded, data):
        return ""
    try:
        current = data_identity(data)["sha256"]
    except (OSError, ValueError) as err:
        return f"its data cannot be read where the config points ({err})"
    if current != recorded.get("sha256"):
        return (f"the data the config names (sha256 {current[:12]}) is not the data this run trained on "
                f"(sha256 {str(recorded.get('sha256'))[:12]})")
    return ""


def plan_states(plan: Plan, roots: Roots, *, keep_stale: bool = False, force: bool = False) -> dict[str, JobState]:
    """The state of every job of ``plan`` (plan order). ``force`` marks every job to run."""
    checker = _Checker(plan, roots, keep_stale)
    states = {job_id: checker.state(job_id) for job_id in plan.jobs}
    if force:
        states = {k: v if v.todo else JobState("pending", "--force") for k, v in states.items()}
    return states


def job_state(plan: Plan, job_id: str, roots: Roots, *, keep_stale: bool = False) -> JobState:
    """The state of one job (and, on the way, of what it depends on)."""
    return _Checker(plan, roots, keep_stale).state(job_id)


def retire_outputs(job: Any, roots: Roots) -> list[Path]:
    """Move what an untrusted earlier attempt of ``job`` left (a training run directory, a sample folder, a
    reference folder) to ``<runs>/superseded/`` so the re-run starts clean; nothing is deleted."""
    if job.step in ("pretrain", "train"):
        targets = [roots.runs / job.run_id]
    elif job.step == "prepare":
        targets = [roots.reference_dir(job.job_id)]
    elif job.step == "sample":
        record = RecordStore(roots.results).read(job.job_id)
        targets = [roots.artefact(record["outputs"]["samples"]["path"]).parent] if record and record.get(
            "outputs") else []
    else:
        targets = []
    moved = []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    for target in targets:
        if target.exists():
            dest = roots.runs / "superseded" / f"{target.name}.{stamp}.{os.getpid()}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(target), dest)
            moved.append(dest)
    return moved
