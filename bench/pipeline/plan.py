"""Plan: expand a suite into jobs with dependencies and content-addressed ids (docs/harness.md §2).

A job carries out one *step* of the pipeline (a method's *stage*, ``ancestry``/``transfer``/``descend``/``domain``,
is a setting of a training run, not a step). Jobs, per seed and model size::

    prepare   (task, data geometry, eval protocol)  -> the reference set a task is scored against
    pretrain  (ancestry spec)                      -> trains an ancestry: what methods transfer from
    train     (method x task)     after pretrain   -> trains the benchmarked model (method stage of the task)
    sample                        after train      -> ADM .npz
    evaluate                      after sample, prepare -> metrics with their protocol
    aggregate                     after every evaluate  -> leaderboards and plots

A job id is a readable prefix plus a hash of everything that determines its output, including the ids of what it
consumes (a training run hashes its ancestry's run id through ``run.ancestry``), so changing one setting changes the
ids of exactly the jobs that depend on it, and an unchanged job keeps its id and its finished record.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.config.schema import EvalConfig, RunConfig, from_dict
from bench.config.suite import Suite, SuiteError, ancestry_eval, resolve_config, task_eval
from bench.records.atomic import atomic_path
from bench.run.rundir import export_ref

STEPS = ("prepare", "pretrain", "train", "sample", "evaluate", "aggregate")

def short_hash(payload: Any, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Job:
    job_id: str
    step: str
    deps: tuple[str, ...]
    run_id: str | None = None
    """Training run the job belongs to (the run directory ``<runs>/<run_id>``)."""
    config: dict[str, Any] | None = None
    """Resolved RunConfig (training jobs and their sample/evaluate jobs)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Labels (suite, benchmark, task, arch, method, family, variant, seed) and step-specific settings."""


@dataclass
class Plan:
    suite: str
    jobs: dict[str, Job]
    """In dependency order: every job comes after the jobs it depends on."""

    def by_step(self, step: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.step == step]

    def plan_id(self) -> str:
        return short_hash(sorted(self.jobs))

    def to_json(self) -> str:
        return json.dumps({"suite": self.suite, "jobs": [asdict(j) for j in self.jobs.values()]}, indent=1,
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        jobs = {}
        for j in data["jobs"]:
            jobs[j["job_id"]] = Job(j["job_id"], j["step"], tuple(j["deps"]), j["run_id"], j["config"], j["info"])
        return cls(data["suite"], jobs)

    def save(self, path: Path) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())
        return path


def _arch_dash(arch: str) -> str:
    return arch.replace("/", "-")


def make_plan(suite: Suite, overrides: dict[str, Any] | None = None,
              budget_options: dict[tuple, dict[str, Any]] | None = None) -> Plan:
    """Every job of ``suite`` in dependency order (pure: builds no model, reads and writes no file, so ids are
    reproducible).

    ``overrides`` (nested config tables) apply last to every training run, e.g. fewer steps for a smoke run;
    they are part of the resolved configs, hence of the ids. ``budget_options`` holds the options of every
    budget-matched method (``resolve_budgets``, run before planning).
    """
    from methods import get_method_class

    final = overrides or {}
    budget_options = budget_options or {}
    jobs: dict[str, Job] = {}

    def add(job: Job) -> Job:
        jobs.setdefault(job.job_id, job)
        return jobs[job.job_id]

    evaluations = []
    for seed in suite.seeds:
        for arch in suite.archs:
            ancestry_seed = seed if suite.ancestry_seed is None else suite.ancestry_seed
            ancestry_jobs = _pretrain_jobs(suite, ancestry_seed, arch, final, add)
            # a shared ancestry is trained once and sampled once per seed (the sampling seed moves with it), so its
            # row, like every other, has as many seeds as the suite; an ancestry per seed is sampled with its own
            evaluations += _ancestry_evaluations(suite, ancestry_jobs, add, seed)
            for spec in suite.methods:
                for task_name in spec.tasks:
                    task = suite.tasks[task_name]
                    parent = ancestry_jobs.get(spec.ancestry) if spec.ancestry else None
                    run_name = task.name if spec.variant == "default" else f"{task.name}.{spec.variant}"
                    options = spec.options
                    if spec.budget:
                        key = budget_key(spec, task.name, arch, seed)
                        if key not in budget_options:
                            raise SuiteError(f"suite {suite.name!r} method {spec.name!r} variant {spec.variant!r}: "
                                             f"its {spec.budget} budget is not resolved (call resolve_budgets)")
                        options = budget_options[key]
                    layers = [{"model": {"arch": arch}, "engine": {"seed": seed},
                               "method": {"name": spec.name, "stage": task.stage, "options": options},
                               "run": {"name": run_name,
                                       # relative to the runs root: the id must not depend on where runs live
                                       "ancestry": export_ref(parent.run_id) if parent else ""}},
                              task.overrides, spec.overrides, final]
                    cfg = from_dict(resolve_config(suite, *layers))
                    labels = {"method": spec.name, "variant": spec.variant, "seed": seed, "task": task.name,
                              "task_stage": task.stage, "arch": cfg.model.arch,
                              "family": spec.family or get_method_class(spec.name).family,
                              "benchmark": f"{task.name}--{_arch_dash(cfg.model.arch)}",
                              "ancestry_job": parent.job_id if parent else None}
                    train = add(_train_job(suite, cfg, "train", (parent.job_id,) if parent else (), labels))
                    protocol = task_eval(suite, task)
                    prepare = add(_prepare_job(suite, cfg, task.name, protocol))
                    evaluations.append(_sample_and_evaluate(suite, cfg, train, prepare, labels, add, protocol))
    aggregate_id = f"aggregate--{suite.name}--{short_hash(sorted(e.job_id for e in evaluations))}"
    add(Job(aggregate_id, "aggregate", tuple(e.job_id for e in evaluations), info={"suite": suite.name}))
    return Plan(suite.name, jobs)


def _pretrain_jobs(suite: Suite, seed: int, arch: str, final: dict[str, Any], add) -> dict[str, Job]:
    """The pretrain job of every ancestry some method inherits from, by ancestry name (a distilled ancestry after
    the pretrain job of its teacher, which it depends on)."""
    jobs: dict[str, Job] = {}

    def pretrain_job(name: str) -> Job:
        if name in jobs:
            return jobs[name]
        spec = suite.ancestries[name]
        teacher = pretrain_job(spec.teacher) if spec.teacher else None
        cfg = from_dict(resolve_config(suite, {
            "model": {"arch": spec.arch or arch}, "engine": {"seed": seed},
            "method": {"name": spec.method, "stage": "ancestry", "options": spec.options},
            "run": {"name": f"ancestry-{spec.name}", "ancestry": export_ref(teacher.run_id) if teacher else ""}},
            spec.overrides, final))
        jobs[name] = add(_train_job(suite, cfg, "pretrain", (teacher.job_id,) if teacher else (), {
            "ancestry": spec.name, "method": spec.method, "family": "ancestry", "variant": "default",
            "seed": seed, "arch": cfg.model.arch, "task": f"ancestry-{spec.name}"}))
        return jobs[name]

    for spec in suite.ancestries.values():
        if spec.evaluate is not None or any(m.ancestry == spec.name for m in suite.methods):
            pretrain_job(spec.name)
    return jobs


def _ancestry_evaluations(suite: Suite, ancestry_jobs: dict[str, Job], add, seed: int) -> list[Job]:
    """Sample and evaluate jobs of every ancestry the suite scores (``evaluate``), on its own training data, for the
    suite's ``seed`` (the sampling seed; the training seed is the ancestry's own): one benchmark per size,
    ``ancestry--<arch>``, with a row per ancestry (variant = its name)."""
    from methods import get_method_class

    evaluations = []
    for name, job in ancestry_jobs.items():
        spec = suite.ancestries[name]
        if spec.evaluate is None:
            continue
        cfg = from_dict(job.config)
        protocol = ancestry_eval(suite, spec)
        labels = {"method": spec.method, "variant": name, "seed": seed, "task": "ancestry",
                  "task_stage": "ancestry", "arch": cfg.model.arch, "family": get_method_class(spec.method).family,
                  "benchmark": f"ancestry--{_arch_dash(cfg.model.arch)}", "ancestry_job": None}
        # one reference for every ancestry trained on the same data under the same protocol: ranked together
        prepare = add(_prepare_job(suite, cfg, "ancestry", protocol))
        evaluations.append(_sample_and_evaluate(suite, cfg, job, prepare, labels, add, protocol))
    return evaluations


def task_num_classes(cfg: RunConfig) -> int:
    """The number of classes a run's data has, known before any job runs (budget matching needs it)."""
    data = cfg.data
    looked = ""  # the file that was looked for, so a missing dataset is named before the preflight lists it
    if data.source == "synthetic":
        from bench.data.synthetic import synthetic_split

        return len(synthetic_split(data.split))
    if data.source == "imagefolder" and data.class_list:
        path = Path(os.path.expandvars(data.class_list)).expanduser()
        if path.is_file():
            return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
        looked = f" ({path} does not exist)"
    if data.source == "latents" and data.latent_dir:
        manifest = Path(os.path.expandvars(data.latent_dir)).expanduser() / "manifest.json"
        if manifest.is_file():
            return int(json.loads(manifest.read_text())["num_classes"])
        looked = f" ({manifest} does not exist)"
    raise SuiteError(f"cannot tell how many classes data.source={data.source!r} has before running (budget "
                     f"matching needs it){looked}: point data.class_list or data.latent_dir at existing files, or "
                     f"set the task's num_classes")


def _budget_cache_path() -> Path:
    root = os.environ.get("KINDBENCH_CACHE_DIR") or Path.home() / ".cache" / "kindbench"
    return Path(root) / "budget_ranks.json"


def _method_sources_hash(*methods: str) -> str:
    """The code fingerprint of the methods involved: a matched rank is reused only while their code is unchanged."""
    from bench.records.fingerprint import code_fingerprint

    return short_hash([code_fingerprint("train", m)["fingerprint"] for m in methods], 16)


def budget_key(spec: Any, task: str, arch: str, seed: int) -> tuple:
    return (spec.name, spec.variant, task, arch, seed)


def resolve_budgets(suite: Suite) -> dict[tuple, dict[str, Any]]:
    """The options of every budget-matched (method, task, arch, seed) of ``suite``: the step before planning that
    builds models (on the meta device) and reads/writes the rank cache, so ``make_plan`` itself stays pure."""
    out = {}
    for spec in suite.methods:
        if not spec.budget:
            continue
        for task_name in spec.tasks:
            for arch in suite.archs:
                for seed in suite.seeds:
                    out[budget_key(spec, task_name, arch, seed)] = matched_budget_options(
                        suite, spec, suite.tasks[task_name], arch, seed)
    return out


def kind_budget_options(suite: Suite, task: str) -> dict[str, Any]:
    """The KIND options a ``budget = "kind"`` method on ``task`` is matched to: those of the suite's default-variant
    ``kind`` entry on that task (an ablation row such as ``variant = "full-rank"`` never sets the budget; without a
    default-variant entry, the first ``kind`` entry on the task), on top of its ancestry's options, since structural
    options such as the ``ranks`` preset are the ancestry's and decide KIND's trainable count. No ``kind`` entry on
    the task: KIND's defaults."""
    entries = [s for s in suite.methods if s.name == "kind" and task in s.tasks]
    if not entries:
        return {}
    spec = next((s for s in entries if s.variant == "default"), entries[0])
    ancestry = suite.ancestries.get(spec.ancestry) if spec.ancestry else None
    return {**(ancestry.options if ancestry else {}), **spec.options}


def matched_budget_options(suite: Suite, spec: Any, task: Any, arch: str, seed: int) -> dict[str, Any]:
    """``spec.options`` with the method's rank option set to match ``spec.budget`` (KIND's trainable count on the
    same task and arch). Imported lazily: only suites that ask for a budget load the baselines package."""
    from methods import MethodError, get_method
    from methods.budget import kind_matched_rank

    cfg = from_dict(resolve_config(suite, {"model": {"arch": arch}, "engine": {"seed": seed}}, task.overrides,
                                   spec.overrides))
    arch_spec = cfg.model.arch_spec()
    kind_options = kind_budget_options(suite, task.name)
    try:
        num_classes = task.num_classes or task_num_classes(cfg)
        key = short_hash([spec.name, spec.options, arch_spec, num_classes, kind_options,
                          _method_sources_hash(spec.name, "kind")], 16)
        cache = _budget_cache_path()
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:  # bisection over real (meta-device) builds: seconds per method, minutes for DiT-L/2
            known[key] = kind_matched_rank(spec.name, arch_spec, num_classes, spec.options, kind_options,
                                           strict=False)
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        return {**spec.options, **get_method(spec.name, spec.options).budget_options(known[key])}
    except MethodError as err:
        raise SuiteError(f"suite {suite.name!r} method {spec.name!r} variant {spec.variant!r}: cannot match the "
                         f"{spec.budget} budget: {err}") from None


def _train_job(suite: Suite, cfg: RunConfig, step: str, deps: tuple[str, ...], labels: dict[str, Any]) -> Job:
    run_id = cfg.run_id()
    return Job(f"{run_id}--{step}", step, deps, run_id, cfg.to_dict(), {"suite": suite.name, **labels})


def _prepare_job(suite: Suite, cfg: RunConfig, task: str, protocol: EvalConfig | None = None) -> Job:
    """The reference set of a task: its data (split, domain, size) and its evaluation protocol (``protocol``: the
    task's own, ``task_eval``; default the suite's)."""
    protocol = protocol or suite.eval
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("num_workers",)}
    payload = {"data": data, "eval": protocol.to_dict(), "in_channels": cfg.model.in_channels,
               "extractor_id": _extractor_id(protocol.extractor)}
    if protocol.extractor == "synthetic":  # the floor row: real held-out images at the samples' count
        payload["floor_samples"] = suite.sample.num_samples
    job_id = f"prepare--{task}--{data['image_size']}px--{short_hash(payload)}"
    return Job(job_id, "prepare", (), None, None, {"suite": suite.name, "task": task, **payload})


def _extractor_id(extractor: str) -> str:
    """The feature extractor's identity, hashed into reference and evaluation ids: a new extractor version means
    new references and scores, never a stale reference reused under the same id."""
    if extractor == "synthetic":
        from bench.metrics.networks.domain import EXTRACTOR_NAME

        return EXTRACTOR_NAME
    return extractor


def _sample_and_evaluate(suite: Suite, cfg: RunConfig, train: Job, prepare: Job, labels: dict[str, Any], add,
                         protocol: EvalConfig | None = None) -> Job:
    """The sample job (its own settings: the suite's sampling protocol) and the evaluate job (the metric protocol:
    the task's, ``protocol``, default the suite's)."""
    sample_cfg = suite.sample.to_dict()
    # each seed's samples are drawn with their own noise: the sampling seed moves with the run's seed (seed 0 keeps
    # the protocol's), so the seed spread holds both sources of variance
    sample_cfg["seed"] = suite.sample.seed + int(labels["seed"])
    sample = add(Job(f"{train.run_id}--sample-{short_hash(sample_cfg)}", "sample", (train.job_id,), train.run_id,
                     train.config, {"suite": suite.name, **labels, "sample": sample_cfg}))
    eval_cfg = (protocol or suite.eval).to_dict()
    eval_hash = short_hash([sample_cfg, eval_cfg, prepare.job_id])
    return add(Job(f"{train.run_id}--evaluate-{eval_hash}", "evaluate", (sample.job_id, prepare.job_id), train.run_id,
                   train.config, {"suite": suite.name, **labels, "sample_job": sample.job_id,
                                  "prepare_job": prepare.job_id, "eval": eval_cfg}))


def dependents(plan: Plan, job_id: str) -> set[str]:
    """Every job that (transitively) depends on ``job_id``."""
    out: set[str] = set()
    frontier = {job_id}
    while frontier:
        frontier = {j.job_id for j in plan.jobs.values() if set(j.deps) & frontier} - out
        out |= frontier
    return out
