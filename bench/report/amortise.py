"""What a transfer needs before it starts, in its cost columns: its ancestries' compute and wall time, amortised.

A transfer run inherits from an ancestry (a ``pretrain`` record), which may itself have been distilled or grown from
another (WAVE, TLEG, SWS and LiGO from the dense ancestry; FINE's and WAVE's first phases on the descendant's task
from their own ancestries). Its *chain* is every pretrain record it depends on, directly or through another
ancestry. Each ancestry's cost is shared equally among the transfer runs (``train`` records: every task and seed in
the same records) whose chain contains it, as the papers pre-train once and transfer many times: an ancestry
used by 30 runs adds a thirtieth of its cost to each. An ancestry no transfer run uses is charged whole.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

Record = dict[str, Any]

#: cost columns this module adds to every leaderboard row
ANCESTRY_COSTS = ("ancestry_gmacs", "ancestry_wall_s", "total_gmacs")


def ancestry_chain(record: Record, by_job: dict[str, Record]) -> list[Record]:
    """The pretrain records ``record`` depends on, directly or through another pretrain record."""
    found: dict[str, Record] = {}
    queue = deque(record["run_info"]["depends_on"])
    while queue:
        job_id = queue.popleft()
        parent = by_job.get(job_id)
        if parent is None or job_id in found or parent["run_info"]["step"] != "pretrain":
            continue
        found[job_id] = parent
        queue.extend(parent["run_info"]["depends_on"])
    return list(found.values())


def ancestry_users(records: Iterable[Record], by_job: dict[str, Record]) -> Counter:
    """pretrain job id -> how many successful transfer (``train``) runs have it in their chain."""
    users: Counter = Counter()
    for record in records:
        if record["run_info"]["step"] == "train" and record.get("status", "success") == "success":
            users.update(parent["run_info"]["job_id"] for parent in ancestry_chain(record, by_job))
    return users


def amortised_costs(training: Record, by_job: dict[str, Record], users: Counter) -> dict[str, float | None]:
    """``ancestry_gmacs`` and ``ancestry_wall_s``: the chain's training compute and wall time, each ancestry's
    divided by its number of users; ``total_gmacs``: the run's own training compute plus ``ancestry_gmacs``."""
    gmacs = wall = 0.0
    for parent in ancestry_chain(training, by_job):
        share = 1.0 / max(1, users[parent["run_info"]["job_id"]])
        info = parent["train_info"]
        gmacs += float(info.get("train_gmacs_total") or 0.0) * share
        wall += float(info.get("wall_s") or 0.0) * share
    own = training["train_info"].get("train_gmacs_total")
    return {"ancestry_gmacs": gmacs, "ancestry_wall_s": wall,
            "total_gmacs": None if own is None else float(own) + gmacs}
