"""``kindbench findings RESULTS``: the numbers a suite's FINDINGS.md quotes, as Markdown, read from its results folder.

A FINDINGS.md is prose written by a person; its numbers must be the leaderboards', not copies typed by hand. This
prints, per benchmark, every row of its leaderboard (rank, trainable parameters, FID, precision and class accuracy
as mean ± std over seeds and the 95% interval) with the floor's ratio for class accuracy, each seed's value for the
rows named by ``--per-seed``, and the run's cost by step from its records (job-seconds: each job's own wall time,
so two jobs at a time on two cores take about half as long on the clock).

Reads only ``leaderboard/*/leaderboard.csv``, ``leaderboard/leaderboard_runs.csv`` and ``records/*.json``: run it on
a published folder (``results/small``) or on a run's own (``runs/results/small``).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path

METRICS = ("fid", "precision", "class_acc")
FLOOR = "real images"


def number(value: str | float | None) -> str:
    """Three significant digits, at most three decimals (0.850, 5.12, 26.8, 123); ``–`` for no value."""
    if value in ("", None):
        return "–"
    x = float(value)
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def cell(row: dict[str, str], metric: str) -> str:
    """``mean ± std [low, high]`` of ``metric`` in a leaderboard row (parts without a value left out)."""
    text = number(row.get(f"{metric}_mean"))
    if row.get(f"{metric}_std"):
        text += f" ± {number(row[f'{metric}_std'])}"
    if row.get(f"{metric}_ci_low"):
        text += f" [{number(row[f'{metric}_ci_low'])}, {number(row[f'{metric}_ci_high'])}]"
    return text


def row_name(row: dict[str, str]) -> str:
    variant = row["variant"]
    return row["method"] if variant in ("", "default") else f"{row['method']} ({variant})"


def benchmark_table(path: Path) -> str:
    """One leaderboard as a Markdown table, then each row's class accuracy as a share of the floor's."""
    rows = list(csv.DictReader(path.open(newline="")))
    lines = [f"### {path.parent.name}", "", "| rank | method | seeds | trainable | FID | precision | class accuracy |",
             "|---|---|---:|---:|---|---|---|"]
    for row in rows:
        rank = row["rank"] or ("floor" if row["method"] == FLOOR else "stale" if row.get("stale") else "–")
        lines.append(f"| {rank} | {row_name(row)} | {row['n_seeds']} | {row['params_trainable'] or '–'} | "
                     + " | ".join(cell(row, metric) for metric in METRICS) + " |")
    floors = {row["protocol_id"]: float(row["class_acc_mean"]) for row in rows
              if row["method"] == FLOOR and row.get("class_acc_mean") and float(row["class_acc_mean"]) > 0}
    shares = [f"{row_name(row)} {100 * float(row['class_acc_mean']) / floors[row['protocol_id']]:.1f}%"
              for row in rows if row["method"] != FLOOR and row.get("class_acc_mean") and row["protocol_id"] in floors]
    if shares:
        lines += ["", "Class accuracy as a share of the floor's: " + ", ".join(shares) + "."]
    return "\n".join(lines)


def per_seed(runs_csv: Path, methods: set[str]) -> str:
    """Each seed's metrics for the rows of ``methods`` (every benchmark they appear in)."""
    seeds: dict[tuple[str, str], list[tuple[int, dict[str, str]]]] = defaultdict(list)
    for row in csv.DictReader(runs_csv.open(newline="")):
        if row["method"] in methods:
            seeds[(row["benchmark"], row_name(row))].append((int(row["seed"]), row))
    lines = []
    for (benchmark, name), values in sorted(seeds.items()):
        parts = [f"seed {seed}: " + ", ".join(f"{metric} {number(row.get(metric))}" for metric in METRICS)
                 for seed, row in sorted(values, key=lambda item: item[0])]
        lines.append(f"- {benchmark}, {name}: " + "; ".join(parts))
    return "\n".join(lines)


def costs(records_dir: Path) -> str:
    """Job-seconds by step (each success record's own start-to-finish time) and each pre-training job's."""
    by_step: dict[str, list[float]] = defaultdict(list)
    pretrain: dict[str, float] = {}
    for path in sorted(records_dir.glob("*.json")):
        record = json.loads(path.read_text())
        info = record["run_info"]
        if record.get("status") != "success":
            continue
        started, finished = datetime.fromisoformat(info["created_at"]), datetime.fromisoformat(info["finished_at"])
        seconds = (finished - started).total_seconds()
        by_step[info["step"]].append(seconds)
        if info["step"] == "pretrain":
            pretrain[info["job_id"]] = seconds
    total = sum(sum(values) for values in by_step.values())
    lines = ["| step | jobs | job-seconds |", "|---|---:|---:|"]
    lines += [f"| {step} | {len(values)} | {sum(values):,.0f} |" for step, values in sorted(by_step.items())]
    jobs = sum(len(values) for values in by_step.values())
    hours = total / 7200  # two cores
    lines += [f"| **all** | {jobs} | **{total:,.0f}** ({hours:.2f} hours of two cores if packed perfectly) |", ""]
    lines += [f"- {job}: {seconds:,.0f} s" for job, seconds in sorted(pretrain.items())]
    return "\n".join(lines)


def findings_markdown(results: Path, per_seed_methods: set[str]) -> str:
    """Every section: the benchmarks' tables, the chosen rows' seeds, the costs."""
    boards = sorted((results / "leaderboard").glob("*/leaderboard.csv"))
    if not boards:
        raise FileNotFoundError(f"no leaderboard/*/leaderboard.csv under {results}: run `kindbench run` or "
                                f"`kindbench leaderboard` first")
    parts = [benchmark_table(board) for board in boards]
    runs_csv = results / "leaderboard" / "leaderboard_runs.csv"
    if per_seed_methods and runs_csv.is_file():
        parts.append("### Per seed\n\n" + per_seed(runs_csv, per_seed_methods))
    if (results / "records").is_dir():
        parts.append("### Cost\n\n" + costs(results / "records"))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kindbench findings", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results folder holding leaderboard/ and records/")
    parser.add_argument("--per-seed", default="scratch,kind",
                        help="comma-separated methods whose every seed is listed (default: scratch,kind)")
    args = parser.parse_args(argv)
    methods = {name for name in args.per_seed.split(",") if name}
    try:
        print(findings_markdown(args.results, methods), end="")
    except FileNotFoundError as err:
        parser.exit(2, f"kindbench findings: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
