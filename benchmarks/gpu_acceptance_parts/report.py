"""The Markdown around each part's table: the machine header every file carries (device, versions, commit, date),
a part's page (command, wall time against budget, verdict, its table, log, traceback) and the run's summary."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_lines(device: str) -> list[str]:
    """Device, versions, commit and date: the header every table carries."""
    import torch

    from bench.records.environment import git_state, package_versions
    from bench.records.fields import utc_now

    versions = package_versions()
    git = git_state()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = (f"- GPU: **{torch.cuda.get_device_name(0)}** ({props.total_memory / 2**30:.0f} GiB, "
               f"{torch.cuda.device_count()} visible), CUDA {torch.version.cuda}, "
               f"cuDNN {torch.backends.cudnn.version()}")
    else:
        gpu = "- GPU: none (CPU run: a smoke test of the code paths, not a measurement)"
    sha = git["git_sha"] or "unknown"
    return [gpu,
            f"- CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores",
            f"- torch {torch.__version__}, deepspeed {versions.get('deepspeed')}, "
            f"diffusers {versions.get('diffusers')}, timm {versions.get('timm')}, Python {platform.python_version()}",
            f"- commit {sha}{' (with uncommitted changes)' if git['git_dirty'] else ''}",
            f"- date {utc_now()}"]


def render_part(outcome: dict[str, Any], render: Callable[[list[dict], dict, dict], list[str]], plan: dict[str, Any],
                header: list[str], command: str, smoke: bool) -> str:
    """A part's Markdown file; ``render(rows, info, plan)`` (the part's own) writes its table."""
    part = outcome["part"]
    status = ("**PASS**" if outcome["ok"] else "**FAIL**" + (f": {outcome['error']}" if outcome["error"] else "")
              + (f"; failed checks: {', '.join(outcome['failed_checks'])}" if outcome["failed_checks"] else ""))
    lines = [f"# GPU acceptance ({part}): {outcome['title']}{' — SMOKE RUN (toy sizes)' if smoke else ''}", "",
             f"Command: `{command}`", "", *header,
             f"- part wall time {outcome['wall_s']:.1f} s (budget {outcome['budget_s']} s); status {status}", ""]
    if smoke:
        lines += ["Smoke run: every code path at toy sizes; the numbers are not measurements.", ""]
    if outcome["rows"]:
        lines += render(outcome["rows"], outcome["info"], plan)
    else:
        lines.append("No rows: the part did not get far enough.")
    if outcome["notes"]:
        lines += ["", "Log:", "", *[f"- {note}" for note in outcome["notes"]]]
    if outcome["info"].get("traceback"):
        lines += ["", "```", outcome["info"]["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def render_summary(outcomes: list[dict], header: list[str], command: str, smoke: bool, total_s: float,
                   target_s: float, files: dict[str, Path]) -> str:
    """The run's summary file: one row per part (wall time, budget, verdict, file); a full run over ``target_s``
    says so."""
    lines = [f"# GPU acceptance{' — SMOKE RUN' if smoke else ''}: summary", "", f"Command: `{command}`", "", *header,
             f"- total wall time {total_s:.1f} s" + ("" if smoke or total_s <= target_s else
                                                     f" (**over the {target_s} s target**)"), "",
             "| part | what | wall s | budget s | result | table |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        result = "PASS" if o["ok"] else "**FAIL**" + (f" ({o['error']})" if o["error"] else "") + (
            f" (failed: {', '.join(o['failed_checks'])})" if o["failed_checks"] else "")
        lines.append(f"| {o['part']} | {o['title']} | {o['wall_s']:.1f} | {o['budget_s']} | {result} | "
                     f"{files[o['part']].name} |")
    return "\n".join(lines) + "\n"
