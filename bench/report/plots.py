"""``kindbench plot``: figures from the leaderboard CSVs (never from records), as PNG and PDF.

    kindbench plot --leaderboard results/leaderboard --out results/plots

Per benchmark and evaluation protocol (protocols are never mixed in one figure, as in the tables):

* ``pareto_params``: every metric vs trainable parameters (log x), mean ± std over seeds, Pareto front dashed;
* ``pareto_compute``: every metric vs training compute (GMACs, log x), with its Pareto front;
* ``summary``: FID, precision and class accuracy of every method in rank order, each with its 95% interval over seeds
  and samples and the floor (held-out real images): the benchmark's question answered in one figure;
* ``questions/<stage>``: one figure per paper question (benchmarks of stage transfer, domain, descend), a FID panel
  per benchmark in rank order with intervals and floor;
* ``samples``: held-out real images, then one grid per (method, variant) from its lowest seed, one labelled row per
  class (``bench.report.grids``; the sampler's ``grid.png`` where the samples' file is too large to read).

Per benchmark: ``loss_curves`` from the runs' ``train.jsonl`` (one line per seed; colour by family, marker by
method/variant, ``styles_for``).

Stale rows and runs (a non-empty ``stale`` column: made by other code than the checkout's) are not results of this
code and are never drawn; CSVs from before that column are drawn whole.

The Pareto fronts are the ``pareto_<metric>_vs_<axis>`` flags of ``leaderboard.csv``: the leaderboard decides, the
plot draws. Output is reproducible: a fixed style (matplotlib defaults + ``STYLE``, not the user's matplotlibrc),
fixed sizes and dpi, no timestamps or version strings in PNG/PDF metadata, so the same CSVs give identical bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (cluster nodes have no display)
import matplotlib.style  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from PIL import Image  # noqa: E402

from bench.metrics import metric_label  # noqa: E402
from bench.report import grids  # noqa: E402
from bench.report.tables import protocol_summary  # noqa: E402

DPI = 150
PANEL_SIZE = (3.4, 2.8)  # inches per panel
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "axes.grid": True, "grid.alpha": 0.3, "lines.markersize": 5,
         "pdf.fonttype": 42, "svg.hashsalt": "kindbench"}
PNG_METADATA = {"Software": None}  # the default names the matplotlib version; nothing else varies
PDF_METADATA = {"CreationDate": None, "Producer": None, "Creator": "kindbench plot"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
AXES = {"params": ("params_trainable", "trainable parameters"),
        "compute": ("total_gmacs", "training compute incl. amortised ancestry (GMACs)")}


class PlotWarning(UserWarning):
    """An input a figure needed was missing (a loss curve, a sample grid, a non-positive x on a log axis)."""


# --------------------------------------------------------------------------------------------------------------------
# Reading the CSVs
# --------------------------------------------------------------------------------------------------------------------


BOARD_COLUMNS = ("benchmark", "protocol_id", "method", "variant", "params_trainable", "total_gmacs")
RUN_COLUMNS = ("benchmark", "protocol_id", "method", "variant", "seed", "run_id", "loss_curve", "grid_png")


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a leaderboard CSV; ``ValueError`` naming the file if a column the plots need is missing."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks columns {missing}: not a kindbench leaderboard CSV")
        return list(reader)


def current_rows(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The rows that are results of this code: a non-empty ``stale`` cell leaves a row out."""
    return [row for row in rows if not row.get("stale")]


def number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    value = float(text)
    return None if math.isnan(value) else value


def flag(text: str | None) -> bool:
    return text == "True"


def metrics_in(rows: Sequence[dict[str, str]]) -> list[str]:
    """Metrics with at least one value, in the CSV's column order."""
    names = [column[: -len("_mean")] for column in rows[0] if column.endswith("_mean")] if rows else []
    return [name for name in names if any(number(row[f"{name}_mean"]) is not None for row in rows)]


def label_of(row: dict[str, str]) -> str:
    return row["method"] if row["variant"] in ("", "default") else f"{row['method']}/{row['variant']}"


def _lighter(color: Sequence[float], amount: float) -> tuple[float, ...]:
    return tuple(c + (1.0 - c) * amount for c in color)


def styles_for(rows: Sequence[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """One style per method/variant label: the colour says the family (tab10, families sorted), the marker the
    label within its family (labels sorted). No two labels of a benchmark share a (colour, marker) pair: a family
    with more labels than markers, or a family beyond tab10's ten colours, takes lighter shades. Styles depend on
    the benchmark's labels only, so every figure of a benchmark agrees."""
    palette = matplotlib.colormaps["tab10"].colors
    family_of = {label_of(row): row.get("family") or "" for row in rows}
    styles = {}
    for f_index, family in enumerate(sorted(set(family_of.values()))):
        labels = sorted(label for label, f in family_of.items() if f == family)
        for l_index, label in enumerate(labels):
            shade = l_index // len(MARKERS) + f_index // len(palette)
            styles[label] = {"color": _lighter(palette[f_index % len(palette)], 1 - 0.6 ** shade),
                             "marker": MARKERS[l_index % len(MARKERS)]}
    return styles


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------


LEGEND_WIDTH = 1.6  # inches kept free on the right for the legend
TITLE_HEIGHT = 0.6  # inches kept free on top for the two-line title


def new_figure(n_panels: int, ncols: int = 3, panel: tuple[float, float] = PANEL_SIZE,
               legend: bool = True) -> tuple[Figure, list]:
    """A grid of panels with fixed margins (not constrained layout: that measures every tick label, several times
    slower, and fixed margins keep every figure of a kind the same size)."""
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    extra = LEGEND_WIDTH if legend else 0.0
    width, height = panel[0] * ncols + extra, panel[1] * nrows + TITLE_HEIGHT
    figure = Figure(figsize=(width, height), dpi=DPI)
    figure.subplots_adjust(left=0.75 / width, right=1 - (extra + 0.15) / width, bottom=0.5 / height,
                           top=1 - (TITLE_HEIGHT + 0.1) / height, wspace=0.45, hspace=0.55)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return figure, axes[:n_panels]


def save(figure: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    figure.savefig(png, dpi=DPI, metadata=PNG_METADATA)
    figure.savefig(pdf, metadata=PDF_METADATA)
    return [png, pdf]


def set_log_x(ax, xs: Sequence[float]) -> None:
    """Log x padded by a factor 2 each side (so at least one labelled decade shows), minor ticks unlabelled."""
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.xaxis.set_minor_formatter(NullFormatter())


def is_floor(row: dict[str, str]) -> bool:
    """The leaderboard's floor row (held-out real images), which has no training cost and is never ranked."""
    return row.get("family") == "floor"


def pareto_figure(rows: list[dict[str, str]], axis: str, styles: dict[str, dict[str, Any]]) -> Figure | None:
    """One panel per metric: mean ± std vs the axis' cost, log x, the flagged front as a dashed staircase and the
    floor (held-out real images) as a dotted horizontal line."""
    column, xlabel = AXES[axis]
    floor = next((row for row in rows if is_floor(row)), None)
    rows = [row for row in rows if not is_floor(row)]
    if not rows:
        return None
    metrics = metrics_in(rows)
    usable = [row for row in rows if (number(row[column]) or 0) > 0]
    if len(usable) < len(rows):
        dropped = sorted(label_of(row) for row in rows if row not in usable)
        warnings.warn(f"{rows[0]['benchmark']}: no positive {column} for {dropped}; left out of the {axis} plot",
                      PlotWarning, stacklevel=2)
    if not metrics or not usable:
        return None
    figure, axes = new_figure(len(metrics))
    for ax, name in zip(axes, metrics):
        higher = flag(usable[0][f"{name}_higher_is_better"])
        for row in usable:
            mean, std = number(row[f"{name}_mean"]), number(row[f"{name}_std"])
            if mean is None:
                continue
            style = styles[label_of(row)]
            ax.errorbar(number(row[column]), mean, yerr=std, linestyle="none", capsize=2, label=label_of(row),
                        **style)
        front = sorted((number(r[column]), number(r[f"{name}_mean"])) for r in usable
                       if flag(r[f"pareto_{name}_vs_{axis}"]))
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", linestyle="--", color="0.35", linewidth=1, zorder=0)
        level = number(floor[f"{name}_mean"]) if floor else None
        if level is not None:
            ax.axhline(level, linestyle=":", color="0.2", linewidth=1, label="real images (floor)")
        set_log_x(ax, [number(row[column]) for row in usable])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric_label(name)} {'↑' if higher else '↓'}")
    unique = dict(zip(*reversed(axes[0].get_legend_handles_labels())))
    figure.legend([unique[k] for k in sorted(unique)], sorted(unique), loc="center right", title="method")
    figure.suptitle(f"{rows[0]['benchmark']}, protocol {rows[0]['protocol_id']}: {protocol_summary(rows[0])}\n"
                    f"dashed: Pareto front vs {xlabel}" + ("; dotted: held-out real images" if floor else ""))
    return figure


def read_loss_curve(path: Path) -> tuple[list[float], list[float]]:
    steps, losses = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            if "loss" in entry:
                steps.append(float(entry["step"]))
                losses.append(float(entry["loss"]))
    return steps, losses


def loss_figure(runs: list[dict[str, str]], base: Path, styles: dict[str, dict[str, Any]]) -> Figure | None:
    """Training loss vs step, one line per seed-run (each run once, however many protocols scored it)."""
    curves = []
    for run in sorted({r["run_id"]: r for r in runs}.values(), key=lambda r: (label_of(r), r["seed"])):
        path = base / run["loss_curve"] if run["loss_curve"] else None
        if path is None or not path.is_file():
            warnings.warn(f"loss curve of {run['run_id']} not found: {path or '(none recorded)'}", PlotWarning,
                          stacklevel=2)
            continue
        curves.append((run, *read_loss_curve(path)))
    if not curves:
        return None
    figure, (ax,) = new_figure(1, panel=(5.0, 3.2))
    seen = set()
    for run, steps, losses in curves:
        label = label_of(run)
        # the family's colour and the method's marker (every tenth of the curve), so no two labels look alike
        ax.plot(steps, losses, color=styles[label]["color"], marker=styles[label]["marker"], linewidth=1,
                markersize=3, markevery=max(1, len(steps) // 10), label=None if label in seen else label)
        seen.add(label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss ↓")
    figure.legend(loc="center right", title="method")
    figure.suptitle(f"{runs[0]['benchmark']}: training loss (one line per seed)")
    return figure


def _class_grid(path: Path | None, n_classes: int | None) -> tuple[np.ndarray, int] | None:
    """(per-class grid, its number of class rows) of a small labelled ``.npz``, else None."""
    read = grids.read_labelled(path) if path is not None else None
    if read is None:
        return None
    rows = n_classes if n_classes is not None else int(read[1].max()) + 1
    return grids.class_grid(*read, classes=rows), rows


def samples_figure(runs: list[dict[str, str]], base: Path) -> Figure | None:
    """Held-out real images first, then the samples of each method/variant's lowest seed, one row per class
    (labelled) where the samples' file is small enough to read (``bench.report.grids``), else the sampler's own
    ``grid.png``; 4 panels per row."""
    chosen: dict[str, tuple[np.ndarray, int]] = {}
    real = _class_grid(next((base / r["real_npz"] for r in runs if r.get("real_npz")), None), None)
    n_classes = real[1] if real is not None else None
    for run in sorted(runs, key=lambda r: (label_of(r), int(r["seed"]))):
        label = label_of(run)
        if label in chosen:
            continue
        grid = _class_grid(base / run["samples_npz"] if run.get("samples_npz") else None, n_classes)
        path = base / run["grid_png"] if run["grid_png"] else None
        if grid is None and path is not None and path.is_file():
            with Image.open(path) as image:
                grid = np.asarray(image.convert("RGB")), 0  # the sampler's grid: rows are not classes
        if grid is None:
            warnings.warn(f"sample grid of {run['run_id']} not found: {path or '(none recorded)'}", PlotWarning,
                          stacklevel=2)
            continue
        chosen[label] = grid
    if not chosen:
        return None
    panels = ([("real images (held-out)", real)] if real is not None else []) + sorted(chosen.items())
    rows = max(rows for _, (_, rows) in panels)  # a panel grows with its classes: 48 rows stay readable
    figure, axes = new_figure(len(panels), ncols=4, panel=(2.4, max(2.6, 0.2 * rows + 0.8)), legend=False)
    for ax, (label, (grid, rows)) in zip(axes, panels):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(label)
        ax.set_xticks([])
        if rows:  # a per-class grid: label its rows
            step = grid.shape[0] / rows
            ax.set_yticks([(c + 0.5) * step for c in range(rows)], [f"class {c}" for c in range(rows)], fontsize=6)
            ax.tick_params(length=0)
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
        else:
            ax.set_axis_off()
    figure.suptitle(f"{runs[0]['benchmark']}, protocol {runs[0]['protocol_id']}: held-out real images and samples "
                    "(one row per class, first seed)")
    return figure


SUMMARY_METRICS = ("fid", "precision", "class_acc")


def _ranked(rows: list[dict[str, str]]) -> tuple[dict[str, str] | None, list[dict[str, str]]]:
    """(the floor row or None, the other rows in rank order; unranked last). Rows of one rank (tied with the best)
    keep the leaderboard's order, which is by the metric's mean."""
    floor = next((row for row in rows if is_floor(row)), None)
    ordered = sorted((row for row in rows if not is_floor(row)),
                     key=lambda r: (number(r.get("rank")) is None, number(r.get("rank")) or 0.0))
    return floor, ordered


def interval_panel(ax, ordered: list[dict[str, str]], floor: dict[str, str] | None, name: str,
                   styles: dict[str, dict[str, Any]], labels: bool, primary: str) -> None:
    """One metric of rows in rank order, top to bottom: mean and 95% interval over seeds and samples, the floor
    dotted; with ``labels`` the method names (``=1`` before a row tied with the best on the ``primary`` metric, the
    one the rows are ranked by)."""
    positions = list(range(len(ordered)))[::-1]
    for y, row in zip(positions, ordered):
        mean = number(row.get(f"{name}_mean"))
        if mean is None:
            continue
        low, high = number(row.get(f"{name}_ci_low")), number(row.get(f"{name}_ci_high"))
        err = [[mean - low], [high - mean]] if low is not None and high is not None else None
        ax.errorbar(mean, y, xerr=err, linestyle="none", capsize=2, **styles[label_of(row)])
    level = number(floor.get(f"{name}_mean")) if floor else None
    if level is not None:
        ax.axvline(level, linestyle=":", color="0.2", linewidth=1)
    names = [("=1 " if flag(r.get(f"tied_{primary}")) else "") + label_of(r) for r in ordered]
    ax.set_yticks(positions, names if labels else [""] * len(names))
    ax.set_ylim(-0.7, len(ordered) - 0.3)
    higher = flag(ordered[0][f"{name}_higher_is_better"]) if ordered else False
    ax.set_xlabel(f"{metric_label(name)} {'↑' if higher else '↓'}")


def summary_figure(rows: list[dict[str, str]], styles: dict[str, dict[str, Any]]) -> Figure | None:
    """The benchmark's answer at a glance: per metric (FID, precision, class accuracy where present) every method's
    mean with its 95% interval over seeds and samples, methods in rank order top to bottom, ``=1`` before a row tied
    with the best, the floor (held-out real images) as a dotted line."""
    floor, ordered = _ranked(rows)
    metrics = [m for m in SUMMARY_METRICS if m in metrics_in(ordered)] if ordered else []
    if not metrics:
        return None
    figure, axes = new_figure(len(metrics), ncols=len(metrics), panel=(3.2, 0.6 + 0.22 * len(ordered)),
                              legend=False)
    for index, (ax, name) in enumerate(zip(axes, metrics)):
        interval_panel(ax, ordered, floor, name, styles, labels=index == 0, primary=metrics[0])
    figure.subplots_adjust(left=min(0.45, 1.4 / figure.get_figwidth()))
    dotted = "; dotted: real images" if floor else ""
    figure.suptitle(f"{ordered[0]['benchmark']}, protocol {ordered[0]['protocol_id']}\nmean, 95% interval over seeds "
                    f"and samples; rank order by {metric_label(metrics[0])}{dotted}")
    return figure


#: the papers' questions, by the method stage of their benchmarks
QUESTIONS = {"transfer": "(a) novel classes", "domain": "(b) domain shift", "descend": "(c) other model sizes"}


def question_figure(stage: str, boards: list[list[dict[str, str]]]) -> Figure | None:
    """One paper question at a glance: a panel per benchmark of that stage (its protocol with the most rows), FID of
    every method in rank order with its 95% interval over seeds and samples, the floor dotted."""
    panels = []
    for board in boards:
        counts = Counter(row["protocol_id"] for row in board)
        main = max(sorted(counts), key=counts.__getitem__)
        floor, ordered = _ranked([row for row in board if row["protocol_id"] == main])
        if ordered and "fid" in metrics_in(ordered):
            panels.append((floor, ordered))
    if not panels:
        return None
    styles = styles_for([row for _, ordered in panels for row in ordered])
    tallest = max(len(ordered) for _, ordered in panels)
    figure, axes = new_figure(len(panels), ncols=len(panels), panel=(3.6, 0.6 + 0.22 * tallest), legend=False)
    for ax, (floor, ordered) in zip(axes, panels):
        interval_panel(ax, ordered, floor, "fid", styles, labels=True, primary="fid")
        ax.set_title(ordered[0]["benchmark"])
    figure.subplots_adjust(left=min(0.3, 1.4 / figure.get_figwidth()), wspace=0.9)
    figure.suptitle(f"{QUESTIONS[stage]}: FID, mean and 95% interval over seeds and samples, rank order"
                    "; dotted: real images")
    return figure


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


def _emit(figure: Figure | None, stem: Path) -> list[Path]:
    return [] if figure is None else save(figure, stem)


def plot_benchmark(board: list[dict[str, str]], runs: list[dict[str, str]], base: Path, out: Path) -> list[Path]:
    styles = styles_for([row for row in [*board, *runs] if not is_floor(row)])
    written = _emit(loss_figure(runs, base, styles), out / "loss_curves") if runs else []
    by_protocol: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in board:
        by_protocol[row["protocol_id"]].append(row)
    for pid, rows in sorted(by_protocol.items()):
        for axis in AXES:
            written += _emit(pareto_figure(rows, axis, styles), out / pid / f"pareto_{axis}")
        written += _emit(summary_figure(rows, styles), out / pid / "summary")
        protocol_runs = [r for r in runs if r["protocol_id"] == pid]
        if protocol_runs:
            written += _emit(samples_figure(protocol_runs, base), out / pid / "samples")
    return written


def make_plots(leaderboard_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Draw every figure from the CSVs under ``leaderboard_dir``; return the PNG and PDF files written.

    Paths in ``leaderboard_runs.csv`` are relative to ``leaderboard_dir`` (as ``kindbench leaderboard`` writes).
    """
    base, out = Path(leaderboard_dir), Path(out_dir)
    boards = sorted(base.glob("*/leaderboard.csv"))
    runs_csv = base / "leaderboard_runs.csv"
    if not boards and not runs_csv.is_file():
        raise FileNotFoundError(f"no <benchmark>/leaderboard.csv under {base}: run `kindbench leaderboard` first")
    if not boards:
        warnings.warn(f"{base}: the leaderboard has no benchmark yet; no figures", PlotWarning, stacklevel=2)
    runs = current_rows(read_csv(runs_csv, RUN_COLUMNS)) if runs_csv.is_file() else []
    written: list[Path] = []
    by_stage: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        for board_csv in boards:
            board = current_rows(read_csv(board_csv, BOARD_COLUMNS))
            if not board:
                continue  # a benchmark with failures or stale rows only: nothing to draw
            benchmark = board[0]["benchmark"]
            bench_runs = [r for r in runs if r["benchmark"] == benchmark]
            written += plot_benchmark(board, bench_runs, base, out / board_csv.parent.name)
            by_stage[board[0].get("stage") or ""].append(board)
        for stage, boards_of_stage in sorted(by_stage.items()):
            if stage in QUESTIONS:
                written += _emit(question_figure(stage, boards_of_stage), out / "questions" / stage)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kindbench plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaderboard", required=True, type=Path, help="output folder of `kindbench leaderboard`")
    parser.add_argument("--out", type=Path, default=None, help="figure folder (default: <leaderboard>/plots)")
    args = parser.parse_args(argv)
    out = args.out or args.leaderboard / "plots"
    try:
        written = make_plots(args.leaderboard, out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"kindbench plot: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
