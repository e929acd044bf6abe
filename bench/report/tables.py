"""Markdown and LaTeX renderings of the leaderboard rows built by ``bench.report.leaderboard`` (no I/O here).

One table per evaluation protocol: rows scored with different extractors, sample counts, guidance or references
are not comparable, so they never share a table. Cells show ``mean ± std`` over seeds, the best value of each
metric within a protocol is bold, and headers carry the metric's direction (↓ lower is better, ↑ higher).
Stale rows (a non-empty ``stale``: made by other code than the checkout's) are never in a ranked table: Markdown
lists them in a table of their own after the ranked ones, LaTeX leaves them out and names them in a comment.
The output holds no timestamps or absolute paths, so the same records always give the same bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pandas as pd

from bench.metrics import metric_label

STATUSES = ("success", "failed", "cancelled")
STALE_TITLE = "Stale rows (made by other code; not ranked)"
REFRESH_HINT = ("`kindbench run` re-runs stale jobs (`kindbench plan` lists them); then rebuild the leaderboard "
                "with `kindbench leaderboard`.")
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "–": "--"}


# ---- number formats ------------------------------------------------------------------------------------------------


def fmt_count(value: float | None) -> str:
    """Parameter counts: ``830K``, ``1.23M``, ``675M``."""
    if value is None:
        return "–"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def fmt_general(value: float | None) -> str:
    """3 significant digits; large values with a suffix (training GMACs reach 1e9): ``0.05``, ``960``, ``1.54K``."""
    if value is not None and abs(value) >= 1e3:
        return fmt_count(value)
    return "–" if value is None else f"{value:.3g}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 3600:
        return f"{value / 3600:.2g} h"
    if value >= 60:
        return f"{value / 60:.2g} min"
    return f"{value:.2g} s"


def fmt_metric(mean: float | None, std: float | None, plus_minus: str,
               interval: tuple[float | None, float | None] = (None, None)) -> str:
    """``21.00 ± 1.41 [19.50, 22.30]``: mean ± std and the 95% interval over seeds (each only where there is one);
    2 decimals for values of 10 and more, 3 below (precision/recall are in [0, 1])."""
    if mean is None:
        return "–"
    decimals = 2 if abs(mean) >= 10 else 3
    text = f"{mean:.{decimals}f}"
    if std is not None:
        text += f"{plus_minus}{std:.{decimals}f}"
    if interval[0] is not None and interval[1] is not None:
        text += f" [{interval[0]:.{decimals}f}, {interval[1]:.{decimals}f}]"
    return text


def fmt_rank(row: dict[str, Any], primary: str | None) -> str:
    """The rank; ``=1`` for a row tied with the best (their intervals overlap)."""
    if not row["rank"]:
        return "–"
    return f"={row['rank']}" if primary and row.get(f"tied_{primary}") else str(row["rank"])


def metric_cells(row: dict[str, Any], used: Sequence[str], plus_minus: str) -> list[str]:
    return [fmt_metric(row[f"{m}_mean"], row[f"{m}_std"], plus_minus,
                       (row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high"))) for m in used]


def protocol_summary(row: dict[str, Any]) -> str:
    return (f"{row['n_samples']} samples, extractor {row['extractor']}, reference {row['reference_id']}, "
            f"cfg {row['cfg_scale']}, {row['sampler']} {row['num_steps']} steps")


def split_protocols(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive rows of one protocol (the leaderboard keeps each protocol's rows together and ranked)."""
    groups: list[list[dict[str, Any]]] = []
    for row in rows:
        if groups and groups[-1][0]["protocol_id"] == row["protocol_id"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def primary_metric(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str | None:
    return next((m for m in metrics if any(r.get(f"{m}_mean") is not None for r in rows)), None)


def pareto_text(row: dict[str, Any], metric: str | None) -> str:
    if metric is None:
        return ""
    return ", ".join(axis for axis in ("params", "compute") if row.get(f"pareto_{metric}_vs_{axis}"))


def _cells(row: dict[str, Any], primary: str | None = None) -> list[str]:
    """The non-metric cells, shared by both renderings."""
    return [fmt_rank(row, primary), row["method"], row["family"], row["variant"], str(row["n_seeds"]),
            fmt_count(row["params_trainable"]), fmt_count(row["params_total"]),
            f"{fmt_general(row['gmacs_fwd_trained'])} / {fmt_general(row['gmacs_fwd_sampled'])}",
            fmt_general(row["train_gmacs_total"]), fmt_general(row.get("total_gmacs")), fmt_general(row["gpu_hours"]),
            fmt_seconds(row["wall_s"]), fmt_seconds(row.get("ancestry_wall_s"))]


HEADERS = ["Rank", "Method", "Family", "Variant", "Seeds", "Trainable", "Total", "GMACs fwd (trained / sampled)",
           "Train GMACs", "+ ancestry GMACs", "GPU-h", "Wall", "+ ancestry wall"]


def _used_metrics(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if any(r.get(f"{m}_mean") is not None for r in rows)]


def split_stale(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(current rows, stale rows), each in the leaderboard's order."""
    return [r for r in rows if not r.get("stale")], [r for r in rows if r.get("stale")]


# ---- Markdown ------------------------------------------------------------------------------------------------------


def _md_table(header: list[str], body: list[list[str]], right_from: int = 0) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return lines


def leaderboard_markdown(benchmark: str, rows: Sequence[dict[str, Any]], metrics: Sequence[str],
                         counts: Counter, failed: Sequence[dict[str, Any]], n_stale: int | None = None) -> str:
    task, arch = (rows[0]["task"], rows[0]["arch"]) if rows else ("?", "?")
    current, stale = split_stale(rows)
    lines = [f"# Leaderboard: {benchmark}", ""]
    if current:
        lines += [f"{arch} on task {task}. Mean ± std over seeds (sample std) and the 95% bootstrap interval over "
                  "seeds and over each evaluation's samples in brackets; **bold** is the best value within a protocol "
                  "(none where every row has the same value); rank =1: tied with the best (the intervals overlap); "
                  "↓ lower is better, ↑ higher is better. Rows evaluated under different protocols are "
                  "never ranked together: each protocol has its own table. Pareto: on the front of the primary "
                  "metric vs trainable parameters (params) and vs training compute including the amortised ancestry "
                  "(compute). \"+ ancestry\": the run's share of the pre-training and distillation it inherits (each "
                  "ancestry's cost divided among the transfer runs that use it). The row "
                  "*real images* (family floor, no rank) scores held-out real images exactly as samples are, at the "
                  "same count: the floor no generator is expected to beat (its interval is over images), and its "
                  "class accuracy is the classifier's ceiling.", ""]
    elif stale:
        lines += [(f"{arch} on task {task}. No evaluation made by this checkout's code yet: every row is stale "
                   f"(see below). {REFRESH_HINT}"), ""]
    else:
        lines += ["No successful evaluation yet.", ""]
    for group in split_protocols(current):
        used = _used_metrics(group, metrics)
        primary = primary_metric(group, used)
        header = HEADERS + [f"{metric_label(m)} {'↑' if group[0][f'{m}_higher_is_better'] else '↓'}" for m in used]
        header.append(f"Pareto ({metric_label(primary) if primary else '–'})")
        body = []
        for row in group:
            cells = metric_cells(row, used, " ± ")
            cells = [f"**{c}**" if row[f"best_{m}"] else c for c, m in zip(cells, used)]
            body.append(_cells(row, primary) + cells + [pareto_text(row, primary)])
        lines += [f"## Protocol {group[0]['protocol_id']}", "", protocol_summary(group[0]) + ".", ""]
        lines += _md_table(header, body, right_from=4) + [""]
    if stale:
        lines += stale_markdown(stale, metrics)
    lines += ["## Status", ""] + status_lines(counts, failed, n_stale)
    return "\n".join(lines) + "\n"


def stale_markdown(stale: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    """The table of stale rows: what they scored (for reference only; never ranked) and why they are stale."""
    used = _used_metrics(stale, metrics)
    header = ["Protocol", "Method", "Family", "Variant", "Seeds"] + [
        f"{metric_label(m)} {'↑' if stale[0][f'{m}_higher_is_better'] else '↓'}" for m in used] + ["Stale because"]
    body = [[row["protocol_id"], row["method"], row["family"], row["variant"], str(row["n_seeds"])]
            + [fmt_metric(row[f"{m}_mean"], row[f"{m}_std"], " ± ") for m in used] + [row["stale"]]
            for row in stale]
    lines = [f"## {STALE_TITLE}", "",
             ("These rows were made by other code than this checkout's (or from inputs re-run since), so they are "
              "not results of this code: they have no rank, best marker or Pareto flag and are not compared with "
              f"the rows above. {REFRESH_HINT}"), ""]
    table = _md_table(header, body, right_from=4)
    table[1] = table[1].rsplit("---:", 1)[0] + "--- |"  # the reason reads left to right
    return lines + table + [""]


def status_lines(counts: Counter, failed: Sequence[dict[str, Any]], n_stale: int | None = None) -> list[str]:
    """The status table; ``n_stale`` (None: not counted) adds how many successful evaluations are stale."""
    steps = sorted({step for step, _ in counts})
    body = [[step] + [str(counts.get((step, status), 0)) for status in STATUSES] for step in steps]
    lines = _md_table(["Step", *STATUSES], body, right_from=1) + [""]
    if n_stale is not None:
        lines += [f"Stale evaluations (made by other code; not ranked): {n_stale} of "
                  f"{counts.get(('evaluate', 'success'), 0)} successful."
                  + (f" {REFRESH_HINT}" if n_stale else ""), ""]
    if failed:
        lines += ["Not ranked (failed or cancelled):", ""]
        lines += [f"- `{r['run_info']['job_id']}` ({r['status']}): {r['error']}" for r in failed] + [""]
    return lines


def status_markdown(counts: dict[str, Counter], failed: Sequence[dict[str, Any]],
                    malformed: Sequence[tuple[Any, str]], stale: dict[str, int] | None = None) -> str:
    """``stale``: benchmark -> number of stale successful evaluations (benchmarks with evaluations only)."""
    lines = ["# Record status", ""]
    stale = stale or {}
    for benchmark, counter in sorted(counts.items()):
        lines += [f"## {benchmark or '(suite-level jobs)'}", ""]
        lines += status_lines(counter, [r for r in failed if r["run_info"]["benchmark"] == benchmark],
                              stale.get(benchmark))
    if malformed:
        lines += ["## Malformed record files (skipped)", ""]
        lines += [f"- {message}" for _, message in malformed] + [""]
    return "\n".join(lines) + "\n"


# ---- LaTeX ---------------------------------------------------------------------------------------------------------


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(char, char) for char in str(text))


def _comment(text: Any) -> str:
    """Text safe inside a ``%`` comment line: one line (a newline would end the comment)."""
    return " ".join(str(text).split())


def leaderboard_latex(benchmark: str, rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """One booktabs ``table`` per protocol (needs ``\\usepackage{booktabs}``)."""
    lines = [f"% kindbench leaderboard for {latex_escape(benchmark)}, generated from run records; "
             "needs \\usepackage{booktabs}"]
    rows, stale = split_stale(rows)
    if stale:  # not results of this code: named in a comment, never typeset
        lines.append(f"% {len(stale)} stale row(s) left out (made by other code; not ranked; `kindbench run` "
                     "re-runs stale jobs): " + "; ".join(
                         f"{_comment(r['method'])}/{_comment(r['variant'])} (protocol {r['protocol_id']}, "
                         f"seeds {_comment(r['seeds'])}): {_comment(r['stale'])}" for r in stale))
    for group in split_protocols(rows):
        used = _used_metrics(group, metrics)
        primary = primary_metric(group, used)
        header = [latex_escape(h) for h in HEADERS] + [
            f"{metric_label(m)} $\\{'uparrow' if group[0][f'{m}_higher_is_better'] else 'downarrow'}$" for m in used]
        header.append("Pareto")
        body = []
        for row in group:
            cells = metric_cells(row, used, " $\\pm$ ")
            cells = [f"\\textbf{{{c}}}" if row[f"best_{m}"] else c for c, m in zip(cells, used)]
            body.append([latex_escape(c) for c in _cells(row, primary)] + cells + [pareto_text(row, primary)])
        caption = (f"{latex_escape(benchmark)}: {latex_escape(group[0]['arch'])} on {latex_escape(group[0]['task'])}. "
                   f"Protocol {group[0]['protocol_id']}: {latex_escape(protocol_summary(group[0]))}. Mean $\\pm$ std "
                   "over seeds, 95\\% bootstrap interval over seeds and samples in brackets; best in bold; =1: tied "
                   "with the best; real images: held-out real images scored as samples (the floor, not ranked); "
                   f"Pareto front of {metric_label(primary) if primary else '-'} vs "
                   "trainable parameters (params) and training compute (compute).")
        frame = pd.DataFrame(body, columns=header)
        lines += ["", frame.style.hide(axis="index").to_latex(
            caption=caption, label=f"tab:{benchmark}:{group[0]['protocol_id']}", position="t",
            position_float="centering", hrules=True, column_format="llll" + "r" * (len(header) - 4),
            environment="table").rstrip("\n").replace("\\centering", "\\centering\n\\small", 1)]
    return "\n".join(lines) + "\n"
