"""Suites: which ancestries, tasks, methods, model sizes and seeds a benchmark runs. Suites are data (TOML).

A suite file only *overrides* the config defaults (``bench/config/schema.py``); shipped suites live in
``bench/suites/``, and a path to any other file works too. Layout::

    name = "tiny"
    seeds = [0]                                 # every downstream run (training and sampling) at each seed
    ancestry_seed = 0                           # optional: ancestries once, at this seed, shared by every seed's
                                                # runs (as a paper pre-trains once); absent: one ancestry per seed
    archs = ["DiT-T/2"]                         # model sizes; every run is made at each
    [defaults]                                  # config overrides for every training run (nested tables)
    [protocol.sample]  [protocol.eval]          # how every trained model is sampled and scored
    [ancestries.<name>]  method, options, overrides, arch (optional: pin one size),
                         teacher (optional: another ancestry this one distils from, e.g. TLEG from a dense DiT)
    [tasks.<name>]       stage = transfer|domain|descend, overrides (data split/domain, other model size, ...),
                         num_classes (optional: the class count, for budget matching before the data is placed),
                         eval (optional: ``[protocol.eval]`` keys for this task only, e.g. its own reference batch
                         ``eval = { reference = "${KINDBENCH_REFS}/celebahq-256.npz" }``; they win over the
                         suite's ``[protocol.eval]`` and ``--set eval.*`` for this task)
    [[methods]]          name (registry key), variant, ancestry, tasks (default: all), options, overrides, family,
                         budget = "kind" (set the method's rank option so that it trains as many parameters as
                         KIND does on the same task, at plan time: computed by ``methods.budget``, never typed in)

Everything is validated when the suite is loaded, before any job runs or is submitted: unknown methods, tasks,
ancestries, stages a method does not support, config keys, and (for real data) missing paths.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bench.config.schema import ConfigError, EvalConfig, RunConfig, SampleConfig, from_dict, section_from_dict
from bench.config.toml import tomllib

SUITES_PACKAGE = "bench.suites"
TASK_STAGES = ("transfer", "domain", "descend")
#: Parameter budgets a method's rank can be matched to (``[[methods]] budget``).
BUDGETS = ("kind",)


class SuiteError(ValueError):
    """A suite file is malformed or names something that does not exist; the message says what."""


@dataclass(frozen=True)
class AncestrySpec:
    name: str
    method: str
    options: dict[str, Any]
    overrides: dict[str, Any]
    arch: str | None = None
    teacher: str | None = None
    evaluate: dict[str, Any] | None = None
    """Set: the ancestry is sampled and scored too (benchmark ``ancestry--<arch>``, variant = its name), under the
    suite's metric protocol with these ``eval`` keys on top (``evaluate = true``: none; a table: e.g. the reference
    of the pre-training classes)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    stage: str
    overrides: dict[str, Any]
    num_classes: int | None = None
    """The task's class count when it cannot be read before running (budget matching on data not yet placed)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """``[protocol.eval]`` keys set for this task only (e.g. its own reference batch); empty: the suite's protocol.
    ``task_eval`` gives the task's resolved protocol."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    variant: str
    family: str
    ancestry: str | None
    tasks: tuple[str, ...]
    options: dict[str, Any]
    overrides: dict[str, Any]
    budget: str | None = None


@dataclass
class Suite:
    name: str
    description: str
    seeds: tuple[int, ...]
    archs: tuple[str, ...]
    defaults: dict[str, Any]
    sample: SampleConfig
    """The sampling protocol: the sample jobs' settings (never part of a training config)."""
    eval: EvalConfig
    """The metric protocol: the prepare and evaluate jobs' settings."""
    ancestries: dict[str, AncestrySpec]
    tasks: dict[str, TaskSpec]
    methods: list[MethodSpec]
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    ancestry_seed: int | None = None
    """Set: every ancestry trains once at this seed and all seeds' downstream runs share it; None: per seed."""


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; ``override`` wins. Neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def suite_path(name_or_path: str) -> Path:
    """A shipped suite by name (``tiny``) or a TOML file path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or os.sep in name_or_path:
        if not candidate.is_file():
            raise SuiteError(f"suite file not found: {candidate}")
        return candidate
    shipped = resources.files(SUITES_PACKAGE) / f"{name_or_path}.toml"
    if not shipped.is_file():
        available = sorted(p.name[:-5] for p in resources.files(SUITES_PACKAGE).iterdir() if p.name.endswith(".toml"))
        raise SuiteError(f"unknown suite {name_or_path!r}; shipped suites: {', '.join(available)}")
    return Path(str(shipped))


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: '{key}' must be a table")
    return value


def _known(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def load_suite(name_or_path: str) -> Suite:
    """Load and validate a suite (see the module docstring for the format)."""
    path = suite_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SuiteError(f"suite {path} is not valid TOML: {err}") from None
    where = f"suite {path.name}"
    _known(data, {"name", "description", "seeds", "ancestry_seed", "archs", "defaults", "protocol", "ancestries",
                  "tasks", "methods"}, where)
    protocol = _table(data, "protocol", where)
    _known(protocol, {"sample", "eval"}, f"{where} [protocol]")
    ancestries = {}
    for name, spec in _table(data, "ancestries", where).items():
        _known(spec, {"method", "options", "overrides", "arch", "teacher", "evaluate"}, f"{where} [ancestries.{name}]")
        if "method" not in spec:
            raise SuiteError(f"{where} [ancestries.{name}] needs a method")
        ancestries[name] = AncestrySpec(name, spec["method"], spec.get("options", {}), spec.get("overrides", {}),
                                        spec.get("arch"), spec.get("teacher"),
                                        _ancestry_evaluation(spec, protocol, f"{where} [ancestries.{name}]"))
    tasks = {}
    for name, spec in _table(data, "tasks", where).items():
        _known(spec, {"stage", "overrides", "num_classes", "eval"}, f"{where} [tasks.{name}]")
        stage = spec.get("stage", "transfer")
        if stage not in TASK_STAGES:
            raise SuiteError(f"{where} [tasks.{name}]: stage must be one of {TASK_STAGES}, got {stage!r}")
        eval_keys = _table(spec, "eval", f"{where} [tasks.{name}]")
        checked = protocol_section(EvalConfig, {**_table(protocol, "eval", where), **eval_keys}, "eval",
                                   f"{where} [tasks.{name}]")
        tasks[name] = TaskSpec(name, stage, spec.get("overrides", {}), spec.get("num_classes"),
                               {key: getattr(checked, key) for key in eval_keys})
    methods = []
    for i, spec in enumerate(data.get("methods", [])):
        _known(spec, {"name", "variant", "family", "ancestry", "tasks", "options", "overrides", "budget"},
               f"{where} [[methods]] #{i + 1}")
        if spec.get("budget") not in (None, *BUDGETS):
            raise SuiteError(f"{where} [[methods]] #{i + 1}: budget must be one of {BUDGETS}, got {spec['budget']!r}")
        if "name" not in spec:
            raise SuiteError(f"{where} [[methods]] #{i + 1} needs a name")
        methods.append(MethodSpec(spec["name"], spec.get("variant", "default"), spec.get("family", ""),
                                  spec.get("ancestry"), tuple(spec.get("tasks", list(tasks))),
                                  spec.get("options", {}), spec.get("overrides", {}), spec.get("budget")))
    seeds, archs = data.get("seeds", [0]), data.get("archs", [RunConfig().model.arch])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in seeds):
        raise SuiteError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds = [0, 1, 2]; got {seeds!r}")
    ancestry_seed = data.get("ancestry_seed")
    if ancestry_seed is not None and (not isinstance(ancestry_seed, int) or isinstance(ancestry_seed, bool)):
        raise SuiteError(f"{where}: ancestry_seed must be an integer, e.g. ancestry_seed = 0; got {ancestry_seed!r}")
    if not isinstance(archs, list) or not archs or not all(isinstance(x, str) for x in archs):
        raise SuiteError(f"{where}: archs must be a non-empty list of DiT names, e.g. archs = [\"DiT-B/2\"]; "
                         f"got {archs!r}")
    suite = Suite(name=data.get("name", path.stem), description=data.get("description", ""),
                  seeds=tuple(seeds), archs=tuple(archs),
                  defaults=_table(data, "defaults", where),
                  sample=protocol_section(SampleConfig, _table(protocol, "sample", where), "sample", where),
                  eval=protocol_section(EvalConfig, _table(protocol, "eval", where), "eval", where),
                  ancestries=ancestries, tasks=tasks, methods=methods,
                  source=str(path), raw=data, ancestry_seed=ancestry_seed)
    validate_suite(suite)
    return suite


def protocol_section(cls: type, table: dict[str, Any], section: str, where: str) -> Any:
    """``[protocol.sample]`` / ``[protocol.eval]`` (or ``--set sample.*`` / ``eval.*`` merged into them), typed and
    checked: an unknown key or a wrong type is a one-line SuiteError naming it."""
    try:
        return section_from_dict(cls, table, section)
    except (ConfigError, TypeError) as err:
        raise SuiteError(f"{where}: {err}") from None


def _ancestry_evaluation(spec: dict[str, Any], protocol: dict[str, Any], where: str) -> dict[str, Any] | None:
    """An ancestry's ``evaluate``: absent or false (None), true (no eval keys of its own) or a table of eval keys."""
    value = spec.get("evaluate", False)
    if isinstance(value, bool):
        return {} if value else None
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: evaluate must be true, false or a table of eval keys, got {value!r}")
    checked = protocol_section(EvalConfig, {**_table(protocol, "eval", where), **value}, "eval", f"{where} evaluate")
    return {key: getattr(checked, key) for key in value}


def ancestry_eval(suite: Suite, spec: AncestrySpec) -> EvalConfig:
    """The metric protocol an evaluated ancestry is scored under (``AncestrySpec.evaluate``)."""
    if not spec.evaluate:
        return suite.eval
    return protocol_section(EvalConfig, {**suite.eval.to_dict(), **spec.evaluate}, "eval",
                            f"suite {suite.name!r} [ancestries.{spec.name}] evaluate")


def task_eval(suite: Suite, task: TaskSpec) -> EvalConfig:
    """The metric protocol of ``task``: the suite's ``[protocol.eval]`` (with any ``--set eval.*``) under the task's
    own ``eval`` keys. Equal to ``suite.eval`` for a task that sets none."""
    if not task.eval:
        return suite.eval
    return protocol_section(EvalConfig, {**suite.eval.to_dict(), **task.eval}, "eval",
                            f"suite {suite.name!r} [tasks.{task.name}]")


def validate_suite(suite: Suite) -> None:
    """Every name resolves, every stage is supported and every resolved config is valid; raises SuiteError."""
    from methods import MethodError, get_method_class

    where = f"suite {suite.name!r}"

    def method_class(name: str, context: str):
        try:
            return get_method_class(name)
        except MethodError as err:
            raise SuiteError(f"{where} {context}: {err}") from None

    for spec in suite.ancestries.values():  # teacher chains must end: a -> b -> a would never start
        chain, current = [spec.name], spec.teacher
        while current is not None and current in suite.ancestries:
            if current in chain:
                raise SuiteError(f"{where}: ancestry teachers form a cycle: {' -> '.join(chain + [current])}")
            chain.append(current)
            current = suite.ancestries[current].teacher
    for spec in suite.ancestries.values():
        cls = method_class(spec.method, f"ancestry {spec.name!r}")
        _check_options(cls, spec.options, f"{where} ancestry {spec.name!r}")
        if "ancestry" not in cls.stages:
            raise SuiteError(f"{where} ancestry {spec.name!r}: method {spec.method!r} has no ancestry stage")
        if spec.teacher is not None:
            if spec.teacher not in suite.ancestries:
                raise SuiteError(f"{where} ancestry {spec.name!r}: unknown teacher {spec.teacher!r} "
                                 f"(defined: {sorted(suite.ancestries)})")
            teacher_method = suite.ancestries[spec.teacher].method
            if teacher_method not in cls.teacher_methods:
                raise SuiteError(f"{where} ancestry {spec.name!r}: method {spec.method!r} cannot learn from a "
                                 f"{teacher_method!r} teacher (accepts: {list(cls.teacher_methods) or 'none'})")
    seen = set()
    for spec in suite.methods:
        cls = method_class(spec.name, f"method {spec.name!r}")
        if (spec.name, spec.variant) in seen:
            raise SuiteError(f"{where}: method {spec.name!r} variant {spec.variant!r} is listed twice")
        seen.add((spec.name, spec.variant))
        if spec.ancestry is not None and spec.ancestry not in suite.ancestries:
            raise SuiteError(f"{where} method {spec.name!r}: unknown ancestry {spec.ancestry!r} "
                             f"(defined: {sorted(suite.ancestries)})")
        if spec.ancestry is not None and suite.ancestries[spec.ancestry].method not in cls.ancestry_methods:
            raise SuiteError(f"{where} method {spec.name!r} cannot build from ancestry {spec.ancestry!r} of method "
                             f"{suite.ancestries[spec.ancestry].method!r} (accepts: "
                             f"{list(cls.ancestry_methods) or 'no ancestry'})")
        _check_options(cls, spec.options, f"{where} method {spec.name!r} variant {spec.variant!r}")
        if spec.ancestry is None and cls.ancestry_methods:
            raise SuiteError(f"{where} method {spec.name!r} needs an ancestry (one of methods "
                             f"{list(cls.ancestry_methods)})")
        for task in spec.tasks:
            if task not in suite.tasks:
                raise SuiteError(f"{where} method {spec.name!r}: unknown task {task!r} "
                                 f"(defined: {sorted(suite.tasks)})")
            stage = suite.tasks[task].stage
            if stage not in cls.stages:
                raise SuiteError(f"{where} method {spec.name!r} does not support the {stage!r} stage of task {task!r}")
    for arch in suite.archs:  # every resolved training config must be a valid RunConfig
        for spec in suite.ancestries.values():
            _check_config(resolve_config(suite, {"model": {"arch": spec.arch or arch}}, spec.overrides), where)
        for task in suite.tasks.values():
            _check_config(resolve_config(suite, {"model": {"arch": arch}}, task.overrides), where)


def _check_options(cls: type, options: dict[str, Any], where: str) -> None:
    """A method's options are checked by building its ``Config`` at load, not when its job starts hours later."""
    from methods import MethodError

    try:
        cls.Config.from_dict(options)
    except (MethodError, ValueError, TypeError) as err:
        raise SuiteError(f"{where}: {err}") from None


def resolve_config(suite: Suite, *layers: dict[str, Any]) -> dict[str, Any]:
    """Suite defaults, then each override layer in order (a training config: no sampling or metric settings)."""
    data = copy.deepcopy(suite.defaults)
    for layer in layers:
        data = deep_merge(data, layer)
    return data


def _check_config(data: dict[str, Any], where: str) -> RunConfig:
    try:
        return from_dict(data)
    except ConfigError as err:
        raise SuiteError(f"{where}: {err}") from None
