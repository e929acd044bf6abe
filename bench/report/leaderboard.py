"""``kindbench leaderboard``: run records -> one leaderboard per benchmark (CSV, Markdown, LaTeX).

    kindbench leaderboard --records results --out results/leaderboard [--strict]

Everything here is derived from records only (docs/harness.md §4.2):

* **Join.** Each successful ``evaluate`` record is one seed-run row: its metrics and protocol come from the record;
  accounting and cost come from the run's training record, found by walking ``depends_on`` upstream (evaluate ->
  sample -> train) and, failing that, by the same ``run_id`` (``train``, else ``pretrain``). The sample grid
  comes from the ``sample`` record found the same way. A missing training record leaves the cost columns empty.
  ``ancestry_gmacs`` / ``ancestry_wall_s`` add what the run needed before it started: its ancestries' (and their
  teachers') training, each shared equally among the transfer runs that use it (``bench.report.amortise``), and
  ``total_gmacs`` is the run's own training compute plus that share; the compute Pareto front is drawn against it.
* **Aggregate.** Rows with the same (benchmark, protocol, method, variant) are one leaderboard row: metrics as mean,
  sample std over seeds (ddof=1, empty for one seed) and a 95% bootstrap interval over seeds and over each
  evaluation's samples (``bench.report.intervals.combined_interval``; over seeds alone where evaluations carry no
  ``sample_intervals``, then empty for one seed), costs as the mean over seeds.
* **Rank.** By the primary metric's mean within a protocol; rows whose interval overlaps the best row's are tied
  with it (``tied_<metric>``) and share rank 1. The best value of a metric is marked only where the column holds at
  least two different values.
* **Stale rows are never ranked.** Every evaluation gets
  ``bench.records.currency.stale_reason``: "" when it and everything
  upstream of it (over ``depends_on``) was made by this checkout's code from the inputs there now; otherwise why not
  (other code, no code fingerprint, an input re-run since). The reason is the ``stale`` column. A stale and a current
  run never share a leaderboard row; stale rows get no rank, best marker or Pareto flag, and the ranks, best markers
  and fronts of the current rows are computed without them. Markdown lists them in a separate table, LaTeX leaves
  them out (a comment names them), ``status.*`` counts them per benchmark. ``kindbench run`` re-runs stale jobs.
* **Protocols are never mixed.** The protocol (n_samples, extractor + sha256, reference + sha256, cfg_scale,
  sampler, num_steps) is hashed into ``protocol_id``; ranks, best markers and Pareto flags are computed within one
  protocol, and Markdown/LaTeX print a separate table per protocol.
* **Failures** (failed/cancelled records) never enter a ranking; they are counted in ``status.csv`` and listed in
  the Markdown. **Malformed record files** are skipped with a ``LeaderboardWarning`` and reported the same way, so
  one corrupt file on a shared filesystem does not hide every other result; ``--strict`` makes them an error.

Outputs under ``--out``: ``<benchmark>/leaderboard.{csv,md,tex}``, ``leaderboard_runs.csv`` (one row per seed-run,
all benchmarks), ``status.csv`` and ``status.md``. Paths in ``leaderboard_runs.csv`` (``loss_curve``, ``grid_png``)
are relative to the output folder, so the folder and the results tree can move together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.metrics import METRICS
from bench.records.currency import stale_reason
from bench.records.store import EvalProtocol, MalformedRecordError, Record, RecordStore
from bench.report import tables
from bench.report.amortise import ANCESTRY_COSTS, amortised_costs, ancestry_users
from bench.report.intervals import UNBOUNDED, combined_interval, competition_ranks, overlaps, sd_from_interval

#: metrics in display order; unknown metrics follow alphabetically
METRIC_ORDER = ("fid", "sfid", "is", "precision", "recall", "fdd", "class_acc")
FLOOR_METHOD = "real images"
"""The floor row's method: held-out real images scored like samples (``bench.pipeline.steps.prepare``)."""
PROTOCOL_KEYS = tuple(EvalProtocol.__annotations__)
IDENTITY_COLUMNS = ("benchmark", "task", "stage", "arch", "protocol_id") + PROTOCOL_KEYS
COST_COLUMNS = ("params_trainable", "params_total", "params_inherited", "params_new", "stored_bytes",
                "gmacs_fwd_trained", "gmacs_fwd_sampled", "train_gmacs_total", "steps", "images_seen", "global_batch",
                "world_size", "gpu_hours", "wall_s", "peak_mem_gb") + ANCESTRY_COSTS
RUN_COLUMNS = IDENTITY_COLUMNS + ("method", "family", "variant", "seed", "run_id", "eval_job_id", "train_job_id",
                                  "sample_job_id", "config_hash", "git_sha", "git_dirty", "stale") + COST_COLUMNS + (
                                  "final_loss", "loss_curve", "grid_png", "samples_npz", "real_npz")
AGG_HEAD = IDENTITY_COLUMNS + ("rank", "method", "family", "variant", "n_seeds", "seeds", "run_ids", "stale")
AGG_COSTS = ("params_trainable", "params_total", "trainable_pct", "stored_bytes", "gmacs_fwd_trained",
             "gmacs_fwd_sampled", "train_gmacs_total", "steps", "images_seen", "gpu_hours", "wall_s",
             "peak_mem_gb") + ANCESTRY_COSTS
INTEGER_COSTS = ("params_trainable", "params_total", "stored_bytes", "steps", "images_seen")
# x axes of the Pareto fronts: fewer trainable parameters / less training compute is better
PARETO_AXES = {"params": "params_trainable", "compute": "total_gmacs"}


class LeaderboardWarning(UserWarning):
    """Something the leaderboard skipped or could not join; the message says what and where."""


# --------------------------------------------------------------------------------------------------------------------
# Reading and joining
# --------------------------------------------------------------------------------------------------------------------


def load_records(store: RecordStore, strict: bool) -> tuple[list[Record], list[tuple[Path, str]]]:
    """All success and failed records, plus (path, message) for each malformed file (skipped unless strict)."""
    malformed: list[tuple[Path, str]] = []

    def skip(path: Path, exc: Exception) -> None:
        warnings.warn(f"skipping {exc}", LeaderboardWarning, stacklevel=2)
        malformed.append((path, str(exc)))

    records = list(store.iter("all", on_error=None if strict else skip))
    return records, malformed


def protocol_id(protocol: dict[str, Any]) -> str:
    """Short stable hash of the full protocol; numbers are normalised so 1 and 1.0 give the same id."""
    canonical = {key: protocol.get(key) for key in PROTOCOL_KEYS}
    for key in ("n_samples", "num_steps"):
        canonical[key] = None if canonical[key] is None else int(canonical[key])
    canonical["cfg_scale"] = None if canonical["cfg_scale"] is None else float(canonical["cfg_scale"])
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:8]


class RecordIndex:
    """Successful records by job id and by (run id, step), for walking from an evaluation to its inputs."""

    def __init__(self, records: Iterable[Record]):
        self.by_job: dict[str, Record] = {}
        self.by_run_step: dict[tuple[str, str], list[Record]] = defaultdict(list)
        for record in records:
            info = record["run_info"]
            self.by_job[info["job_id"]] = record
            self.by_run_step[(info["run_id"], info["step"])].append(record)

    def upstream(self, record: Record, steps: Sequence[str]) -> Record | None:
        """The first of ``steps`` (in that order of preference) that has a successful record upstream of
        ``record``: the nearest one over ``depends_on``, else the record of that step with the same run id."""
        for step in steps:
            found = self._nearest(record, step)
            if found is not None:
                return found
        for step in steps:
            candidates = self.by_run_step.get((record["run_info"]["run_id"], step))
            if candidates:
                return candidates[0]
        return None

    def _nearest(self, record: Record, step: str) -> Record | None:
        """Breadth-first over depends_on: an evaluation that also lists the ancestry directly still reaches the
        training run through its sample, because ``upstream`` asks for the ``train`` step first."""
        queue, seen = deque(record["run_info"]["depends_on"]), set()
        while queue:
            job_id = queue.popleft()
            if job_id in seen or job_id not in self.by_job:
                continue
            seen.add(job_id)
            parent = self.by_job[job_id]
            if parent["run_info"]["step"] == step:
                return parent
            queue.extend(parent["run_info"]["depends_on"])
        return None


def _relative_artefact(path: str | None, store_root: Path, out_dir: Path) -> str:
    """A record path (relative to the store root unless absolute) re-expressed relative to ``out_dir``."""
    if not path:
        return ""
    full = Path(path) if os.path.isabs(path) else store_root / path
    return Path(os.path.relpath(full.resolve(), out_dir.resolve())).as_posix()


def real_images_npz(evaluation: Record, index: RecordIndex, runs_root: Path | None) -> Path | None:
    """The held-out real images scored as the floor (``floor.npz`` beside the reference of the prepare job the
    evaluation depends on), where that file exists; reference paths are relative to the runs root."""
    for job_id in evaluation["run_info"]["depends_on"]:
        parent = index.by_job.get(job_id)
        if parent is None or parent["run_info"]["step"] != "prepare":
            continue
        path = (((parent.get("extra") or {}).get("reference") or {}).get("path")) or ""
        if path and not os.path.isabs(path) and runs_root is not None:
            path = str(runs_root / path)
        floor = Path(path).parent / "floor.npz" if path else None
        if floor is not None and floor.is_absolute() and floor.is_file():
            return floor
    return None


def run_row(evaluation: Record, index: RecordIndex, store_root: Path, out_dir: Path,
            stale: str = "", users: Counter | None = None, runs_root: Path | None = None) -> dict[str, Any]:
    """One seed-run row: identity + protocol + costs (from the training record, plus its ancestries' amortised
    over ``users``: ``bench.report.amortise``) + metric values; ``stale`` is why the evaluation is not current ("" when
    it is)."""
    info, protocol = evaluation["run_info"], evaluation["eval_info"]["protocol"]
    train = index.upstream(evaluation, ("train", "pretrain"))  # a run's own training before its ancestry's
    sample = index.upstream(evaluation, ("sample",))
    row: dict[str, Any] = {key: info[key] for key in ("benchmark", "task", "arch", "method", "family", "variant",
                                                      "seed", "run_id", "config_hash", "git_sha", "git_dirty")}
    # the method stage is the paper question the benchmark asks (transfer, domain, descend; ancestry)
    stage = ((info.get("config") or {}).get("method") or {}).get("stage") or ""
    row.update({key: protocol[key] for key in PROTOCOL_KEYS}, protocol_id=protocol_id(protocol), stage=stage,
               eval_job_id=info["job_id"], train_job_id="", sample_job_id="", loss_curve="", grid_png="",
               samples_npz="", real_npz="", stale=stale)
    row.update(dict.fromkeys(COST_COLUMNS), final_loss=None)
    if train is None:
        warnings.warn(f"evaluation {info['job_id']} has no successful training record upstream; its cost columns "
                      "stay empty", LeaderboardWarning, stacklevel=2)
    else:
        t = train["train_info"]
        row.update({key: t[key] for key in ("steps", "images_seen", "global_batch", "world_size", "gpu_hours",
                                            "wall_s", "peak_mem_gb", "train_gmacs_total", "final_loss")})
        row.update({key: t["accounting"][key] for key in COST_COLUMNS if key in t["accounting"]})
        row.update(amortised_costs(train, index.by_job, users or Counter()))
        row.update(train_job_id=train["run_info"]["job_id"],
                   loss_curve=_relative_artefact(t.get("loss_curve"), store_root, out_dir))
    if sample is not None:
        row.update(sample_job_id=sample["run_info"]["job_id"],
                   grid_png=_relative_artefact(sample["sample_info"].get("grid_png"), store_root, out_dir),
                   samples_npz=_relative_artefact(sample["sample_info"].get("npz"), store_root, out_dir))
    real = real_images_npz(evaluation, index, runs_root)
    if real is not None:
        row["real_npz"] = _relative_artefact(str(real), store_root, out_dir)
    intervals = evaluation["eval_info"].get("sample_intervals") or {}
    for name, value in evaluation["eval_info"]["metrics"].items():
        row[name] = value["value"]
        row[f"{name}_sample_sd"] = sd_from_interval(intervals.get(name), intervals.get("level", 0.95))
    return row


def metric_directions(evaluations: Iterable[Record]) -> dict[str, bool]:
    """metric -> higher_is_better, refusing records that disagree (a registry bug would flip every ranking)."""
    directions: dict[str, tuple[bool, str]] = {}
    for record in evaluations:
        for name, value in record["eval_info"]["metrics"].items():
            seen = directions.setdefault(name, (value["higher_is_better"], record["run_info"]["job_id"]))
            if seen[0] != value["higher_is_better"]:
                raise ValueError(f"metric {name!r} has higher_is_better={seen[0]} in {seen[1]} but "
                                 f"{value['higher_is_better']} in {record['run_info']['job_id']}")
    return {name: hib for name, (hib, _) in directions.items()}


def ordered_metrics(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def drop_duplicate_seeds(rows: list[dict[str, Any]], finished: dict[str, str]) -> list[dict[str, Any]]:
    """Keep one evaluation per (benchmark, protocol, method, variant, seed): a current one over a stale one, then
    the latest finished."""
    latest: dict[tuple, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (not r.get("stale"), finished[r["eval_job_id"]], r["eval_job_id"])):
        key = (row["benchmark"], row["protocol_id"], row["method"], row["variant"], row["seed"])
        if key in latest:
            warnings.warn(f"two evaluations of {key}: using {row['eval_job_id']}, ignoring "
                          f"{latest[key]['eval_job_id']}", LeaderboardWarning, stacklevel=2)
        latest[key] = row
    return sorted(latest.values(), key=lambda r: (r["benchmark"], r["protocol_id"], r["method"], r["variant"],
                                                  r["seed"]))


# --------------------------------------------------------------------------------------------------------------------
# Aggregation, ranking, best markers, Pareto fronts
# --------------------------------------------------------------------------------------------------------------------


def pareto_flags(xs: Sequence[float | None], ys: Sequence[float | None], higher_is_better: bool) -> list[bool]:
    """True for points no other point dominates (x no larger, y no worse, one of them strictly better).

    ``x`` is a cost (lower is better); points with a missing x or y are never on the front.
    """
    sign = 1.0 if higher_is_better else -1.0
    valid = [x is not None and y is not None for x, y in zip(xs, ys)]
    flags = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if not valid[i]:
            flags.append(False)
            continue
        dominated = any(valid[j] and xs[j] <= x and sign * ys[j] >= sign * y and (xs[j] < x or sign * ys[j] > sign * y)
                        for j in range(len(xs)) if j != i)
        flags.append(not dominated)
    return flags


def _numbers(runs: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """The seed-runs' ``columns`` as floats (missing and empty cells NaN), one row per run."""
    frame = pd.DataFrame.from_records(runs).reindex(columns=list(columns))
    return frame.apply(pd.to_numeric, errors="coerce").astype("float64")


def _value(number: float) -> float | None:
    return None if pd.isna(number) else float(number)


def aggregate_group(runs: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """One leaderboard row from the seed-runs of one (benchmark, protocol, method, variant): identity from the first
    run, means over seeds (NaN-skipping), sample std (ddof=1; None for one seed) and the interval over seeds and
    samples per metric, costs as means."""
    first = runs[0]
    row = {key: first[key] for key in IDENTITY_COLUMNS + ("method", "family", "variant")}
    row.update(rank=None, n_seeds=len(runs), seeds=";".join(str(r["seed"]) for r in runs),
               run_ids=";".join(r["run_id"] for r in runs),
               stale=next((r["stale"] for r in runs if r.get("stale")), ""))
    costs = [key for key in AGG_COSTS if key != "trainable_pct"]
    sds = [f"{name}_sample_sd" for name in metrics]
    numbers = _numbers(runs, costs + list(metrics) + sds)
    for key in ("params_trainable", "params_total", "stored_bytes"):
        distinct = numbers[key].dropna().unique()
        if len(distinct) > 1:
            warnings.warn(f"{first['method']}/{first['variant']} on {first['benchmark']}: seeds disagree on {key} "
                          f"({sorted(distinct)}); reporting the mean", LeaderboardWarning, stacklevel=2)
    means, stds = numbers.mean(), numbers.std(ddof=1)
    for key in costs:
        row[key] = _value(means[key])
        if key in INTEGER_COSTS and row[key] is not None and row[key].is_integer():
            row[key] = int(row[key])  # counts stay counts when the seeds agree
    total, trainable = row["params_total"], row["params_trainable"]
    row["trainable_pct"] = 100.0 * trainable / total if total and trainable is not None else None
    for name in metrics:
        row[f"{name}_mean"], row[f"{name}_std"] = _value(means[name]), _value(stds[name])
        values = [_value(v) for v in numbers[name]]
        interval = combined_interval(values, [_value(v) for v in numbers[f"{name}_sample_sd"]],
                                     bounds=value_range(name))
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval if interval else (None, None)
    return row


def rank_protocol_group(rows: list[dict[str, Any]], metrics: list[str], directions: dict[str, bool]) -> list[dict]:
    """Sort by the primary metric, number the ranks, mark the best value and the Pareto fronts per metric.

    Only current rows take part; stale rows (a non-empty ``stale``) get no rank, best marker or Pareto flag and
    follow the ranked rows, by method and variant."""
    stale = sorted((row for row in rows if row.get("stale")), key=lambda r: (r["method"], r["variant"]))
    for row in stale:
        row["rank"] = None
        for name in metrics:
            row[f"{name}_higher_is_better"] = directions[name]
            row[f"best_{name}"] = row[f"tied_{name}"] = False
            row.update({f"pareto_{name}_vs_{axis}": False for axis in PARETO_AXES})
    return _rank_current([row for row in rows if not row.get("stale")], metrics, directions) + stale


def _interval(row: dict[str, Any], name: str) -> tuple[float, float] | None:
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return None if low is None or high is None else (low, high)


def _rank_current(rows: list[dict[str, Any]], metrics: list[str], directions: dict[str, bool]) -> list[dict]:
    for name in metrics:
        hib = directions[name]
        means = [row[f"{name}_mean"] for row in rows]
        present = [m for m in means if m is not None]
        # a column where every row has the same value has no best
        best = (max if hib else min)(present) if len(set(present)) > 1 else None
        best_row = next((row for row, mean in zip(rows, means) if best is not None and mean == best), None)
        for row, mean in zip(rows, means):
            row[f"{name}_higher_is_better"] = hib
            row[f"best_{name}"] = best is not None and mean == best
            row[f"tied_{name}"] = (best_row is not None and row is not best_row and not row[f"best_{name}"]
                                   and overlaps(_interval(row, name), _interval(best_row, name)))
        for axis, column in PARETO_AXES.items():
            for row, flag in zip(rows, pareto_flags([row[column] for row in rows], means, hib)):
                row[f"pareto_{name}_vs_{axis}"] = flag
    primary = next((m for m in metrics if any(row[f"{m}_mean"] is not None for row in rows)), None)
    if primary is None:
        return sorted(rows, key=lambda r: (r["method"], r["variant"]))
    sign = -1.0 if directions[primary] else 1.0

    def order(row: dict[str, Any]) -> tuple:
        value = row[f"{primary}_mean"]
        leading = row[f"best_{primary}"] or row[f"tied_{primary}"]
        return (value is None, not leading, 0.0 if value is None else sign * value, row["method"], row["variant"])

    # rows whose interval overlaps the best row's share its rank (ties), the others take their position
    ranked = sorted(rows, key=order)
    ranks = competition_ranks([row[f"best_{primary}"] or row[f"tied_{primary}"] for row in ranked])
    for row, position in zip(ranked, ranks):
        row["rank"] = position if row[f"{primary}_mean"] is not None else None
    return ranked


def value_range(name: str) -> tuple[float, float]:
    """Where metric ``name``'s values lie (``bench.metrics.METRICS``; unbounded for a metric not registered): an
    interval drawn with normal noise (``combined_interval``) or a normal bootstrap (the floor's FID) is clipped to
    it, since a bound outside it says nothing about the metric."""
    info = METRICS.get(name)
    return info.value_range if info else UNBOUNDED


def within(name: str, interval: Sequence[float] | None) -> tuple[float, float] | None:
    """``interval`` clipped to metric ``name``'s range (``value_range``); None stays None."""
    if not interval:
        return None
    low, high = value_range(name)
    return max(float(interval[0]), low), min(float(interval[1]), high)


def floor_row(run: dict[str, Any], index: RecordIndex, metrics: list[str]) -> dict[str, Any] | None:
    """The floor of ``run``'s protocol group: the metrics of held-out real images, as many as the samples, against
    the same reference (``extra.floor`` of the prepare record the run's evaluation depends on); None where the
    reference has none (ADM protocol) or was made for another sample count."""
    evaluation = index.by_job.get(run["eval_job_id"])
    parents = [index.by_job.get(job_id) for job_id in (evaluation or {}).get("run_info", {}).get("depends_on", ())]
    prepare = next((p for p in parents if p is not None and p["run_info"]["step"] == "prepare"), None)
    floor = ((prepare or {}).get("extra") or {}).get("floor")
    if not floor or int(floor["n_samples"]) != int(run["n_samples"]):
        return None
    row = {key: run[key] for key in IDENTITY_COLUMNS}
    row.update(dict.fromkeys(AGG_COSTS), rank=None, method=FLOOR_METHOD, family="floor", variant="held-out",
               n_seeds=0, seeds="", run_ids="", stale="")
    intervals = floor.get("sample_intervals") or {}
    for name in metrics:
        value = floor["metrics"].get(name, {}).get("value")
        low, high = within(name, intervals.get(name)) or (None, None)
        row.update({f"{name}_mean": value, f"{name}_std": None, f"{name}_ci_low": low, f"{name}_ci_high": high,
                    f"{name}_higher_is_better": floor["metrics"].get(name, {}).get("higher_is_better"),
                    f"best_{name}": False, f"tied_{name}": False})
        row.update({f"pareto_{name}_vs_{axis}": False for axis in PARETO_AXES})
    return row


def aggregate(runs: list[dict[str, Any]], directions: dict[str, bool],
              index: RecordIndex | None = None) -> dict[str, list[dict[str, Any]]]:
    """benchmark -> leaderboard rows, grouped by protocol (in protocol_id order) and ranked within each; stale
    runs are aggregated apart from current runs of the same method and variant, and follow the ranked rows. With
    ``index`` each protocol group ends with its floor row where its reference scored one (``floor_row``); it is
    never ranked."""
    by_protocol: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    metrics = ordered_metrics(directions)
    if runs:
        keys = pd.DataFrame.from_records([(run["benchmark"], run["protocol_id"], run["method"], run["variant"],
                                           bool(run.get("stale"))) for run in runs])
        for (benchmark, pid, *_), positions in sorted(keys.groupby(list(keys.columns)).indices.items()):
            by_protocol[(benchmark, pid)].append(aggregate_group([runs[i] for i in positions], metrics))
    boards: dict[str, list[dict[str, Any]]] = defaultdict(list)
    first_run = {(run["benchmark"], run["protocol_id"]): run for run in runs}
    for (benchmark, pid), rows in sorted(by_protocol.items()):
        boards[benchmark].extend(rank_protocol_group(rows, metrics, directions))
        floor = floor_row(first_run[(benchmark, pid)], index, metrics) if index is not None else None
        if floor is not None:
            boards[benchmark].append(floor)
    return boards


def agg_columns(metrics: list[str]) -> list[str]:
    per_metric = []
    for name in metrics:
        per_metric += [f"{name}_mean", f"{name}_std", f"{name}_ci_low", f"{name}_ci_high", f"{name}_higher_is_better",
                       f"best_{name}", f"tied_{name}"]
        per_metric += [f"pareto_{name}_vs_{axis}" for axis in PARETO_AXES]
    return list(AGG_HEAD) + list(AGG_COSTS) + per_metric


# --------------------------------------------------------------------------------------------------------------------
# Status summary
# --------------------------------------------------------------------------------------------------------------------


def status_counts(records: list[Record]) -> dict[str, Counter]:
    """benchmark -> Counter of (step, status)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        counts[record["run_info"]["benchmark"]][(record["run_info"]["step"], record["status"])] += 1
    return counts


def failures(records: list[Record]) -> list[Record]:
    return sorted((r for r in records if r["status"] != "success"), key=lambda r: r["run_info"]["job_id"])


def stale_counts(evaluations: list[Record], stale: dict[str, str]) -> Counter:
    """benchmark -> number of its successful evaluations that are stale (0 for a benchmark with only current ones)."""
    counts: Counter = Counter()
    for record in evaluations:
        info = record["run_info"]
        counts[info["benchmark"]] += bool(stale.get(info["job_id"]))
    return counts


def write_status(out_dir: Path, records: list[Record], malformed: list[tuple[Path, str]],
                 stale: Counter | None = None) -> list[Path]:
    """``status.csv`` and ``status.md``. ``stale`` (benchmark -> count) adds an ``evaluate``/``stale`` row per
    benchmark with evaluations: how many of its successful evaluations are stale (a subset of ``success``)."""
    stale = stale or Counter()
    rows = []
    for benchmark, counter in sorted(status_counts(records).items()):
        rows += [{"benchmark": benchmark, "step": step, "status": status, "count": n}
                 for (step, status), n in sorted(counter.items())]
        if benchmark in stale:
            rows.append({"benchmark": benchmark, "step": "evaluate", "status": "stale", "count": stale[benchmark]})
    if malformed:
        rows.append({"benchmark": "", "step": "", "status": "malformed", "count": len(malformed)})
    csv_path = write_csv(out_dir / "status.csv", rows, ["benchmark", "step", "status", "count"])
    md_path = out_dir / "status.md"
    md_path.write_text(tables.status_markdown(status_counts(records), failures(records), malformed, stale))
    return [csv_path, md_path]


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """``rows`` as a CSV with exactly ``columns``: missing cells empty, floats to 12 significant digits (so 0.1 + 0.2
    noise does not reach the file), counts without a decimal point."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame.from_records(rows, columns=list(columns)) if rows else pd.DataFrame(columns=list(columns))
    for column in frame.columns:  # a count column with a missing cell must not print as 120000.0
        values = frame[column].dropna()
        if len(values) and values.map(lambda v: isinstance(v, int) and not isinstance(v, bool)).all():
            frame[column] = frame[column].astype("Int64")
    frame.to_csv(path, index=False, float_format="%.12g", lineterminator="\n", encoding="utf-8")
    return path


def build_leaderboards(store_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                       strict: bool = False, runs_root: str | os.PathLike | None = None,
                       evaluations_of: Collection[str] | None = None) -> list[Path]:
    """Read every record under ``store_root``, write the leaderboards under ``out_dir``; return the files written.
    ``runs_root`` (the bulk artefacts' folder, which reference paths are relative to) lets the runs CSV name the
    held-out real images beside each reference (``real_npz``, for the plots' real-image grids).

    ``strict=True`` raises ``MalformedRecordError`` on a broken record file instead of skipping it.
    ``evaluations_of`` (job ids: a plan's evaluations) ranks only those evaluations; records of jobs that left the
    suite (a changed setting gives new ids) stay in the store but not on its leaderboards. Default: every one.
    """
    store_root, out_dir = Path(store_root), Path(out_dir)
    if not store_root.is_dir():
        raise FileNotFoundError(f"records folder not found: {store_root}")
    if not (store_root / "records").is_dir() and not (store_root / "failed").is_dir():
        raise FileNotFoundError(f"{store_root} holds no records/ or failed/ folder: not a kindbench results tree")
    records, malformed = load_records(RecordStore(store_root), strict)
    success = [r for r in records if r["status"] == "success"]
    evaluations = [r for r in success if r["run_info"]["step"] == "evaluate"
                   and (evaluations_of is None or r["run_info"]["job_id"] in evaluations_of)]
    directions = metric_directions(evaluations)
    metrics = ordered_metrics(directions)
    index = RecordIndex(success)
    finished = {r["run_info"]["job_id"]: r["run_info"]["finished_at"] for r in evaluations}
    checked, memo = RecordStore(store_root), {}  # one memo: upstream records shared by evaluations are judged once
    stale = {r["run_info"]["job_id"]: stale_reason(r["run_info"]["job_id"], checked, memo) for r in evaluations}
    users = ancestry_users(success, index.by_job)
    runs_root = None if runs_root is None else Path(runs_root).resolve()
    runs = drop_duplicate_seeds([run_row(r, index, store_root, out_dir, stale[r["run_info"]["job_id"]], users,
                                         runs_root) for r in evaluations], finished)

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_csv(out_dir / "leaderboard_runs.csv", runs,
                         list(RUN_COLUMNS) + metrics + [f"{name}_sample_sd" for name in metrics])]
    boards = aggregate(runs, directions, index)
    counts = status_counts(records)
    n_stale = stale_counts(evaluations, stale)
    # suite-level jobs (prepare, aggregate) may have no benchmark: counted in status.*, no leaderboard of their own
    for benchmark in sorted(set(boards) | {name for name in counts if name}):
        rows = boards.get(benchmark, [])
        folder = out_dir / _safe_folder(benchmark)
        written.append(write_csv(folder / "leaderboard.csv", rows, agg_columns(metrics)))
        bench_failures = [r for r in failures(records) if r["run_info"]["benchmark"] == benchmark]
        (folder / "leaderboard.md").write_text(tables.leaderboard_markdown(
            benchmark, rows, metrics, counts[benchmark], bench_failures, n_stale.get(benchmark)))
        (folder / "leaderboard.tex").write_text(tables.leaderboard_latex(benchmark, rows, metrics))
        written += [folder / "leaderboard.md", folder / "leaderboard.tex"]
    written += write_status(out_dir, records, malformed, n_stale)
    return written


def _safe_folder(benchmark: str) -> str:
    return "".join(c if c.isalnum() or c in "._=+-" else "-" for c in benchmark).lstrip(".") or "benchmark"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kindbench leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", required=True, type=Path,
                        help="results tree holding records/ and failed/ (its records/ folder is accepted too)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <records>/leaderboard)")
    parser.add_argument("--strict", action="store_true", help="fail on a malformed record instead of skipping it")
    parser.add_argument("--runs", type=Path, default=os.environ.get("KINDBENCH_RUNS") or None,
                        help="bulk artefacts folder the records' reference paths are relative to (default "
                             "$KINDBENCH_RUNS); names the held-out real images for the plots")
    args = parser.parse_args(argv)
    root = args.records
    if root.name in ("records", "failed") and not (root / "records").is_dir():
        root = root.parent  # the user pointed at the records/ folder itself
    try:
        written = build_leaderboards(root, args.out or root / "leaderboard", strict=args.strict, runs_root=args.runs)
    except (FileNotFoundError, MalformedRecordError, ValueError) as exc:
        print(f"kindbench leaderboard: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files under {args.out or root / 'leaderboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
