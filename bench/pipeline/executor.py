"""The local executor and the ``kindbench run`` / ``kindbench plan`` commands.

    kindbench plan --suite tiny                       # the job graph and what is already done
    kindbench run --suite tiny                        # run what is missing, then leaderboards and plots
    kindbench run --suite tiny --set schedule.steps=20 --set sample.num_samples=64   # a smoke run
    kindbench run --suite tiny --nproc 2              # training/sampling jobs under torchrun
    kindbench run --suite tiny --jobs 2               # two jobs at once, each in its own process

Jobs run in dependency order; a job whose record is trustworthy (``bench.pipeline.status``: outputs present and
unchanged, code fingerprint current, inputs unchanged) is skipped, any other runs again (``--force`` reruns everything,
``--keep-stale`` accepts records of other code). A failed job leaves a failed record; the jobs that depend on it
are skipped and everything else goes on, and the aggregate job still builds leaderboards from whatever finished.
Records, leaderboards and plots go to ``<runs>/results/<suite>/`` unless ``--results`` names another folder, so a
user's run never writes over the published results under ``results/``. The SLURM executor (``bench.pipeline.slurm``)
runs the same jobs through the same ``bench.pipeline.jobs.run_job``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.config.schema import ConfigError, EvalConfig, RunConfig, SampleConfig, from_dict, parse_override
from bench.config.suite import Suite, SuiteError, load_suite, protocol_section
from bench.pipeline.jobs import Roots, run_job
from bench.pipeline.plan import STEPS, Job, Plan, make_plan, resolve_budgets
from bench.pipeline.status import JobState, plan_states
from bench.pipeline.stopping import StopRequests, ignore_stop_signals

#: ``--set`` sections that are a protocol (the sample and evaluate jobs' settings), not training config.
PROTOCOL_SECTIONS = ("sample", "eval")


def _is_str_field(section: type, name: str) -> bool:
    """Whether the protocol dataclass ``section`` declares ``name`` as a str setting."""
    field = {f.name: f for f in dataclasses.fields(section)}.get(name)
    return field is not None and field.type in (str, "str")


def parse_sets(items: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--set`` items -> (config overrides for every training run, protocol overrides by section)."""
    config: dict[str, Any] = {}
    protocol: dict[str, dict[str, Any]] = {name: {} for name in PROTOCOL_SECTIONS}
    for item in items:
        key, value = parse_override(item)
        head, _, rest = key.partition(".")
        if head in PROTOCOL_SECTIONS:
            if not rest or "." in rest:
                raise SuiteError(f"--set {item!r}: expected {head}.key=value")
            # a str setting keeps the text as typed (eval.fdd=false is the word "false", not a bool)
            as_text = isinstance(value, str) or _is_str_field(SampleConfig if head == "sample" else EvalConfig, rest)
            protocol[head][rest] = item.split("=", 1)[1].strip() if as_text else value
            continue
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config, protocol


def build_plan(suite_name: str, sets: list[str]) -> tuple[Suite, Plan]:
    """Load the suite, apply ``--set`` overrides (training config to the training jobs, ``sample.*`` and
    ``eval.*`` to the protocol of the sample and evaluate jobs), resolve budgets, expand the plan and check every
    input path exists."""
    suite = load_suite(suite_name)
    try:
        config, protocol = parse_sets(sets)
    except ConfigError as err:
        raise SuiteError(str(err)) from None
    where = f"--set for suite {suite.name!r}"
    suite.sample = protocol_section(SampleConfig, {**suite.sample.to_dict(), **protocol["sample"]}, "sample", where)
    suite.eval = protocol_section(EvalConfig, {**suite.eval.to_dict(), **protocol["eval"]}, "eval", where)
    try:
        plan = make_plan(suite, config, resolve_budgets(suite))
    except ConfigError as err:  # a --set training override that no config accepts
        raise SuiteError(f"{where}: {err}") from None
    problems = missing_inputs(plan, suite)
    if problems:
        raise SuiteError(f"suite {suite.name!r} cannot run here; missing inputs:\n  " + "\n  ".join(problems))
    return suite, plan


def _expand(text: str) -> Path | None:
    return Path(os.path.expandvars(text)).expanduser() if text and "$" not in os.path.expandvars(text) else None


def missing_inputs(plan: Plan, suite: Suite) -> list[str]:
    """Data, weights and reference paths the plan needs that do not exist (checked before anything runs)."""
    problems: set[str] = set()

    def need(text: str, what: str, is_dir: bool) -> None:
        path = _expand(text)
        if path is None:
            problems.add(f"{what}: {text or '(empty)'} (unset environment variable or empty setting)")
        elif not (path.is_dir() if is_dir else path.is_file()):
            problems.add(f"{what}: {path} does not exist")

    for job in plan.jobs.values():
        if job.step not in ("pretrain", "train") or not job.config:
            continue
        data, model = job.config["data"], job.config["model"]
        if data["source"] == "imagefolder":
            need(data["root"], "data.root (ImageFolder root)", True)
            if data["class_list"] and os.sep in data["class_list"]:
                need(data["class_list"], "data.class_list", False)
        elif data["source"] == "latents":
            need(data["latent_dir"], "data.latent_dir (VAE latent cache)", True)
        if model["in_channels"] == 4:
            need(suite.sample.vae_dir or os.environ.get("KINDBENCH_VAE_DIR", ""),
                 "sample.vae_dir / $KINDBENCH_VAE_DIR (SD-VAE to decode samples)", True)
    for job in plan.by_step("prepare"):  # each task's own protocol: a task may name its own reference batch
        protocol = job.info["eval"]
        if protocol["extractor"] == "synthetic":
            continue
        whose = f" of task {job.info['task']!r}" if protocol["reference"] != suite.eval.reference else ""
        need(protocol["reference"], f"eval.reference (ADM reference batch{whose})", False)
        if protocol.get("fdd_reference") and protocol["fdd"] != "false":
            need(protocol["fdd_reference"], f"eval.fdd_reference (DINOv2 reference of task {job.info['task']!r})",
                 False)
        need(protocol["weights_dir"] or os.environ.get("KINDBENCH_WEIGHTS_DIR", ""),
             "eval.weights_dir / $KINDBENCH_WEIGHTS_DIR (Inception, DINOv2 weights)", True)
    return sorted(problems)


def print_plan(plan: Plan, roots: Roots, console: Console, keep_stale: bool = False) -> dict[str, JobState]:
    """The job graph with each job's state and, where it would run again, why (missing, changed, stale, ...)."""
    states = plan_states(plan, roots, keep_stale=keep_stale)
    table = Table(title=f"plan for suite {plan.suite!r}: {len(plan.jobs)} jobs (results: {roots.results})")
    for column in ("step", "job", "after", "status", "why"):
        table.add_column(column)
    colour = {"done": "green", "failed": "red", "pending": "yellow", "stale": "magenta"}
    for job in plan.jobs.values():
        state = states[job.job_id]
        table.add_row(job.step, job.job_id, str(len(job.deps)),
                      f"[{colour.get(state.state, 'cyan')}]{state.state}", state.reason)
    console.print(table)
    counts = defaultdict(int)
    for value in states.values():
        counts[value.state] += 1
    console.print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return states


def _job_command(plan_path: Path, job: Job, roots: Roots, nproc: int, force: bool) -> list[str]:
    """The command that runs one job in its own process: torchrun for multi-process training/sampling."""
    args = ["-m", "bench.pipeline.jobs", "--plan", str(plan_path), "--job", job.job_id, "--runs", str(roots.runs),
            "--results", str(roots.results)] + (["--force"] if force else [])
    if nproc > 1 and job.step in ("pretrain", "train", "sample"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def _job_env() -> dict[str, str]:
    # One BLAS thread per process unless the user says otherwise; engine.cpu_threads sets torch's own count.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def default_parallel_jobs(plan: Plan) -> int:
    """How many jobs ``kindbench run`` runs at once when not told: one per CPU core on a machine without a GPU
    when every run of the plan pins ``engine.cpu_threads`` to 1 (the tiny suite), else one at a time (a GPU, or
    runs that use every core themselves)."""
    import torch

    if torch.cuda.is_available():
        return 1
    threads = {from_dict(j.config).engine.cpu_threads for j in plan.jobs.values() if j.config}
    if threads != {1}:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def _blocked_by(job: Job, outcome: dict[str, str]) -> list[str]:
    """Failed or blocked dependencies that stop ``job`` (aggregation runs if any evaluation finished)."""
    blocked = [d for d in job.deps if outcome.get(d) in ("failed", "blocked")]
    if job.step == "aggregate":  # decided once every evaluation has ended: it builds on whatever finished
        if not all(d in outcome for d in job.deps) or any(outcome[d] in ("done", "ran") for d in job.deps):
            return []
    return blocked


def run_local(plan: Plan, roots: Roots, *, nproc: int = 1, force: bool = False, jobs: int = 1,
              keep_stale: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run every missing job of ``plan``, ``jobs`` at a time; returns per-step timings and the job outcomes.

    ``step_seconds`` sums the wall time of each step's jobs (with ``jobs`` > 1 they overlap, so the steps add
    up to more than ``wall_seconds``, the invocation's own wall time)."""
    console = console or Console(stderr=True, soft_wrap=True)
    plan_path = plan.save(roots.runs / "plans" / f"{plan.suite}-{plan.plan_id()}.json")
    outcome: dict[str, str] = {}
    step_time: dict[str, float] = defaultdict(float)
    t_start = time.perf_counter()
    states = plan_states(plan, roots, keep_stale=keep_stale, force=force)
    todo = []
    for job in plan.jobs.values():  # trustworthy records are done, whatever order they are met in
        if not states[job.job_id].todo:
            outcome[job.job_id] = "done"
        else:
            if states[job.job_id].state not in ("pending", "done"):
                console.print(f"[cyan]rerun[/]     {job.job_id}: {states[job.job_id].state}: "
                              f"{states[job.job_id].reason}")
            todo.append(job)
    with StopRequests() as stop:
        if jobs > 1:
            _run_parallel(todo, plan_path, roots, nproc, force, jobs, outcome, step_time, console, stop)
        else:
            _run_sequential(todo, plan, plan_path, roots, nproc, force, outcome, step_time, console, stop)
    summary = {"suite": plan.suite, "plan": str(plan_path), "step_seconds": dict(step_time), "parallel_jobs": jobs,
               "wall_seconds": time.perf_counter() - t_start, "stopped_by": stop.signal_name,
               "outcomes": {k: sum(1 for v in outcome.values() if v == k)
                            for k in ("ran", "done", "failed", "blocked", "stopped")}}
    _print_timings(summary, console)
    if stop.requested:
        console.print(f"[yellow]stopped[/] by {stop.signal_name}: training jobs checkpointed; run the same command "
                      "to resume")
    return summary


def _run_sequential(todo: list[Job], plan: Plan, plan_path: Path, roots: Roots, nproc: int, force: bool,
                    outcome: dict[str, str], step_time: dict[str, float], console: Console,
                    stop: StopRequests) -> None:
    """In this process, in plan order (the plan lists every job after its dependencies), until a stop request."""
    from bench.run.engine import init_distributed
    from bench.run.train import Preempted

    for job in todo:
        if stop.requested:
            break
        blocked = _blocked_by(job, outcome)
        if blocked:
            outcome[job.job_id] = "blocked"
            console.print(f"[yellow]skip[/] {job.job_id}: depends on failed {blocked[0]}")
            continue
        console.print(f"[bold]{job.step:9s}[/] {job.job_id}")
        t0 = time.perf_counter()
        try:
            if nproc > 1 and job.step in ("pretrain", "train", "sample"):
                returncode = _watched_subprocess(_job_command(plan_path, job, roots, nproc, force), stop)
                if returncode != 0:
                    raise RuntimeError(f"job {job.job_id} failed under torchrun "
                                       f"(exit {returncode}); see its record")
            else:
                engine = from_dict(job.config).engine if job.config else RunConfig().engine
                run_job(plan, job, roots, init_distributed(engine), force=force)
            outcome[job.job_id] = "ran"
        except Preempted:  # a training job checkpointed on a stop signal (its watch, not ours, caught it)
            outcome[job.job_id] = "stopped"
            stop.signal_name = stop.signal_name or "SIGTERM"
            console.print(f"[yellow]stopped[/]   {job.job_id} (checkpointed)")
        except Exception as err:  # noqa: BLE001 - recorded by run_job; the other branches go on
            if stop.requested:  # interrupted by the stop (e.g. before its first checkpoint): resumed next time
                outcome[job.job_id] = "stopped"
                console.print(f"[yellow]stopped[/]   {job.job_id}")
            else:
                outcome[job.job_id] = "failed"
                console.print(f"[red]failed[/] {job.job_id}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
        step_time[job.step] += time.perf_counter() - t0


def _watched_subprocess(command: list[str], stop: StopRequests) -> int:
    """Run a job's own process to its end, passing a stop request on to it."""
    proc = subprocess.Popen(command, env=_job_env())
    stop.watch(proc.pid)
    try:
        return proc.wait()
    finally:
        stop.unwatch(proc.pid)


def _execute(plan_path: str, job_id: str, runs: str, results: str, nproc: int, force: bool) -> tuple[bool, str]:
    """Run one job in a pool worker, its output going to ``<runs>/logs/<job>.log``; returns (ok, one-line error).

    Workers are long-lived processes that import torch and the method packages once (about 15 s of CPU) and then
    run jobs in-process, exactly as the sequential executor does; multi-process jobs (``nproc`` > 1) still go
    through torchrun."""
    from bench.run.engine import init_distributed

    roots = Roots(Path(runs), Path(results))
    plan = _worker_plan(plan_path)
    job = plan.jobs[job_id]
    log_path = roots.runs / "logs" / f"{job_id}.log"
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            if nproc > 1 and job.step in ("pretrain", "train", "sample"):
                # between jobs the worker ignores stop signals (ignore_stop_signals); while torchrun runs, it passes
                # them on, as the executor does to its own children
                with StopRequests() as stop:
                    returncode = _watched_subprocess(_job_command(Path(plan_path), job, roots, nproc, force), stop)
                if returncode != 0:
                    return False, f"torchrun exited with {returncode}; see its record"
                return True, ""
            engine = from_dict(job.config).engine if job.config else RunConfig().engine
            run_job(plan, job, roots, init_distributed(engine), force=force)
            return True, ""
        except Exception as err:  # noqa: BLE001 - run_job recorded it; the executor goes on with other branches
            return False, str(err).splitlines()[0] if str(err) else type(err).__name__
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


_PLANS: dict[str, Plan] = {}


def _worker_plan(plan_path: str) -> Plan:
    if plan_path not in _PLANS:
        _PLANS[plan_path] = Plan.from_json(Path(plan_path).read_text())
    return _PLANS[plan_path]


def _make_pool(jobs: int) -> concurrent.futures.Executor:
    """Worker processes, started fresh (spawn: no state inherited from this process, CUDA-safe) and reused."""
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=ignore_stop_signals)


def _run_parallel(todo: list[Job], plan_path: Path, roots: Roots, nproc: int, force: bool, jobs: int,
                  outcome: dict[str, str], step_time: dict[str, float], console: Console,
                  stop: StopRequests) -> None:
    """Up to ``jobs`` jobs at once in a pool of worker processes (each job's output in ``<runs>/logs/<job>.log``),
    started in plan order as soon as their dependencies have succeeded; after a stop request, only until the
    running ones have ended."""
    (roots.runs / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers, as the sequential path's subprocesses
    waiting = list(todo)
    running: dict[concurrent.futures.Future, tuple[Job, float]] = {}
    with _make_pool(jobs) as pool:
        while waiting or running:
            if stop.requested:
                waiting.clear()
            for job in list(waiting):
                blocked = _blocked_by(job, outcome)
                if blocked:
                    waiting.remove(job)
                    outcome[job.job_id] = "blocked"
                    console.print(f"[yellow]skip[/] {job.job_id}: depends on failed {blocked[0]}")
                elif len(running) < jobs and all(d in outcome for d in job.deps) and (
                        job.step != "aggregate" or not running and len(waiting) == 1):
                    waiting.remove(job)
                    future = pool.submit(_execute, str(plan_path), job.job_id, str(roots.runs), str(roots.results),
                                         nproc, force)
                    running[future] = (job, time.perf_counter())
                    console.print(f"[bold]{job.step:9s}[/] {job.job_id}")
            if not running:
                if stop.requested:
                    break
                for job in waiting:  # nothing can start and nothing runs: a dependency never finished
                    outcome[job.job_id] = "blocked"
                    console.print(f"[yellow]skip[/] {job.job_id}: its dependencies never finished")
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                job, t0 = running.pop(future)
                seconds = time.perf_counter() - t0
                step_time[job.step] += seconds
                try:
                    ok, error = future.result()
                except Exception as err:  # noqa: BLE001 - a worker died (killed, out of memory): the job failed
                    ok, error = False, f"worker process failed: {type(err).__name__}: {err}"
                log = roots.runs / "logs" / f"{job.job_id}.log"
                if ok:
                    outcome[job.job_id] = "ran"
                    console.print(f"[green]done[/]      {job.job_id} ({seconds:.0f} s)")
                elif stop.requested:  # ended by the stop (a training job checkpointed first): resumed next time
                    outcome[job.job_id] = "stopped"
                    console.print(f"[yellow]stopped[/]   {job.job_id}")
                else:
                    outcome[job.job_id] = "failed"
                    console.print(f"[red]failed[/] {job.job_id}: {error}; log: {log}")


def _print_timings(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="time per step (this invocation)")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step in STEPS:
        if step in summary["step_seconds"]:
            table.add_row(step, f"{summary['step_seconds'][step]:.1f}")
    table.add_row("sum of jobs", f"{sum(summary['step_seconds'].values()):.1f}")
    table.add_row(f"wall ({summary['parallel_jobs']} at a time)", f"{summary['wall_seconds']:.1f}")
    console.print(table)
    console.print(", ".join(f"{n} {k}" for k, n in summary["outcomes"].items()))


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="tiny", help="shipped suite name or a suite TOML file")
    parser.add_argument("--runs", type=Path, default=Path(os.environ.get("KINDBENCH_RUNS", "runs")),
                        help="bulk artefacts (checkpoints, samples, references); default runs/ or $KINDBENCH_RUNS")
    parser.add_argument("--results", type=Path,
                        help="records, leaderboards, plots; default <runs>/results/<suite> (your own results; the "
                             "published ones under results/<suite>/ are never written unless named here)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run (e.g. schedule.steps=20, sample.num_samples=64, "
                             "eval.ref_per_class=32)")
    parser.add_argument("--keep-stale", action="store_true",
                        help="accept records made by other code (stale) as done instead of re-running them")


def default_results(runs: Path, suite: str) -> Path:
    """Where a user's run writes records, leaderboards and plots when ``--results`` is not given: beside its
    artefacts, never over the published results of the repository (``results/<suite>/``)."""
    return Path(runs) / "results" / suite


def _roots(args: argparse.Namespace, suite: Suite) -> Roots:
    return Roots(args.runs, args.results or default_results(args.runs, suite.name))


def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kindbench plan", description="print a suite's job graph and its status")
    _common_args(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead")
    args = parser.parse_args(argv)
    try:
        suite, plan = build_plan(args.suite, args.sets)
    except SuiteError as err:
        print(f"kindbench plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan, _roots(args, suite), Console(), keep_stale=args.keep_stale)
    return 0


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kindbench run", description="run a suite on this machine")
    _common_args(parser)
    parser.add_argument("--nproc", type=int, default=1, help="processes per training/sampling job (torchrun)")
    parser.add_argument("--force", action="store_true", help="rerun jobs that already have a record")
    parser.add_argument("--jobs", type=int, default=0,
                        help="jobs run at once, each in its own process (default: one per core on a CPU-only machine "
                             "when every run uses one thread, as the tiny suite does; else 1)")
    args = parser.parse_args(argv)
    try:
        suite, plan = build_plan(args.suite, args.sets)
    except SuiteError as err:
        print(f"kindbench run: {err}", file=sys.stderr)
        return 2
    roots = _roots(args, suite)
    console = Console(stderr=True, soft_wrap=True)
    jobs = args.jobs if args.jobs > 0 else default_parallel_jobs(plan)
    summary = run_local(plan, roots, nproc=args.nproc, force=args.force, jobs=jobs, keep_stale=args.keep_stale,
                        console=console)
    roots.results.mkdir(parents=True, exist_ok=True)  # a run stopped or failed before any record has no folder yet
    (roots.results / "last_run.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    console.print(f"leaderboards: {roots.results / 'leaderboard'}    plots: {roots.results / 'plots'}")
    if summary["stopped_by"]:
        return 128 + signal.Signals[summary["stopped_by"]].value
    return 1 if summary["outcomes"]["failed"] else 0
