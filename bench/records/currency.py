"""Whether a record is current, from records alone: made by the checkout's code, from inputs that are still the
ones it consumed. The pipeline's job states (``bench.pipeline.status``) build on it and add the artefact checks;
leaderboards use it alone (published results ship without artefacts)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bench.records.fingerprint import code_fingerprint
from bench.records.store import MalformedRecordError, RecordStore


def record_digest(record: dict[str, Any]) -> str:
    """What a consumer of ``record`` depends on: that very run of the job (a re-run, even one that reproduces the
    same bytes, makes its consumers run again: nothing is trusted that was not made from what is there now), its
    outputs' checksums and its metrics."""
    payload = {"finished_at": record["run_info"].get("finished_at"),
               "outputs": {k: v.get("sha256") for k, v in (record.get("outputs") or {}).items()},
               "metrics": (record.get("eval_info") or {}).get("metrics"),
               "reference": ((record.get("extra") or {}).get("reference") or {}).get("sha256")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stale_reason(job_id: str, store: RecordStore, memo: dict[str, str] | None = None) -> str:
    """Why the success record ``job_id`` (and what it consumed, upstream) is not current: "" when it is.

    From records alone, so a leaderboard can tell: a record made by other code than the checkout's, one made
    before code fingerprints existed, or one whose input was re-run after it consumed it. Artefacts are not
    checked here (published results ship without them)."""
    memo = {} if memo is None else memo
    if job_id in memo:
        return memo[job_id]
    memo[job_id] = ""  # a cycle cannot occur in a plan; this only guards the recursion
    try:
        record = store.read(job_id)
    except MalformedRecordError as err:
        memo[job_id] = str(err)
        return memo[job_id]
    reason = ""
    if record is None:
        reason = f"{job_id} has no success record"
    else:
        info = record["run_info"]
        recorded = (info.get("code") or {}).get("fingerprint")
        try:
            current = code_fingerprint(info["step"], info.get("method") or None)["fingerprint"]
        except Exception as err:  # noqa: BLE001 - e.g. a method no longer registered
            current = f"unknown ({err})"
        consumed = info.get("inputs") or {}
        if recorded is None:
            reason = f"{job_id} was made by a kindbench without code fingerprints"
        elif recorded != current:
            reason = f"{job_id} was made by other code (fingerprint {recorded}, checkout {current})"
        for dep in info["depends_on"]:
            if reason:
                break
            reason = stale_reason(dep, store, memo)
            if not reason and consumed.get(dep) != record_digest(store.read(dep)):
                reason = f"{dep} was re-run after {job_id} consumed it"
    memo[job_id] = reason
    return reason
