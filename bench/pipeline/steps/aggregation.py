"""The ``aggregate`` step: leaderboards and plots, derived only from the records of the results tree."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.pipeline.steps import Roots, StepResult

if TYPE_CHECKING:  # types only: the record plumbing and the plan are not part of what a step computes
    from bench.pipeline.plan import Job
    from bench.records.store import RecordStore
    from bench.run.engine import DistContext


def run(job: Job, roots: Roots, ctx: DistContext, store: RecordStore) -> StepResult:
    import shutil

    from bench.report.leaderboard import build_leaderboards
    from bench.report.plots import make_plots

    # Both folders hold this job's outputs only: start them empty, so no table or figure of a benchmark, protocol or
    # method that is no longer in the records (a rebuilt reference is a new protocol) outlives the run that made it.
    for folder in ("leaderboard", "plots"):
        shutil.rmtree(roots.results / folder, ignore_errors=True)
    # the plan's evaluations only: records of jobs that left the suite are history, not rows
    tables = build_leaderboards(roots.results, roots.results / "leaderboard", runs_root=roots.runs,
                                evaluations_of=set(job.deps))
    plots = make_plots(roots.results / "leaderboard", roots.results / "plots")
    rel = [str(p.resolve().relative_to(roots.results)) if p.resolve().is_relative_to(roots.results) else str(p)
           for p in [*tables, *plots]]
    return StepResult({"extra": {"aggregate": {"tables": rel[: len(tables)], "plots": rel[len(tables):]}}})
