"""Methods from anywhere: a lab's method in its own distribution, found through the ``kindbench.methods`` entry
point group, benchmarked without touching this repository (docs/adding-a-method.md).

Each test builds a distribution at run time in a temporary folder, the way pip would lay it out: a package
``labmethod/`` plus ``labmethod-0.1.dist-info/`` with ``METADATA`` and ``entry_points.txt``. The folder goes on
``sys.path`` (in-process tests, then ``methods.registry.refresh_plugins``) or on ``PYTHONPATH`` (the end-to-end
test: ``kindbench run`` in a subprocess, as a user runs it). Every in-process test leaves the registry as it found it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainrun import REPO

from bench.config.toml import tomllib
from bench.records import fingerprint
from methods import MethodError, get_method, get_method_class, list_methods, registry

MINI = REPO / "tests" / "suites" / "mini.toml"
#: Top-level modules the tests create; forgotten again after each test.
PLUGIN_MODULES = {"labmethod", "labsolo", "ghost_missing"}


def _task_stage() -> str:
    """The stage of the mini suite's ``novel-a`` task: the stage the plugin method must support."""
    task = tomllib.loads(MINI.read_text())["tasks"]["novel-a"]
    return task.get("stage", "transfer")


#: A genuinely working method that imports only ``methods.*`` (never ``kind`` or ``baselines``): BitFit-like, it
#: trains every bias of a frozen dense DiT plus the re-initialised class table.
LAB_SOURCE = '''
"""A lab's own method: train every bias of a frozen dense DiT (plus the new class table)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.accounting import method_accounting
from methods.base import Method, MethodConfig, MethodError
from methods.surgery import check_reinit_names, freeze_all, module_param_names, reinit_modules, resolve_modules
from methods.transfer import DENSE_METHODS, check_ancestry, load_into


@dataclass
class LabConfig(MethodConfig):
    """No targets: every bias is trained."""

    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules re-initialised and trained in full (a new label space)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets:
            raise MethodError("labmethod trains every bias: 'targets' does not apply")
        check_reinit_names(self.reinit)


def helper():
    """Not a method (an entry point naming it is an error on use)."""


class LabMethod(Method):
    """Biases of a frozen dense DiT, plus the modules in ``reinit``."""

    name = "labmethod"
    family = "mylab"
    Config = LabConfig
    stages = frozenset({TASK_STAGE})
    ancestry_methods = DENSE_METHODS

    def build(self, arch, task, ancestry):
        self.require_stage(task.stage)
        ancestry = check_ancestry(self, ancestry, arch)
        model = arch.build(task.num_classes)
        load_into(model, ancestry.state, skip=self.config.reinit)
        reinit_modules(model, self.config.reinit)
        return model  # the harness marks what trains, once

    def mark_trainable(self, model):
        freeze_all(model)  # then unfreeze by layer type, never by parameter name
        biases = [m.bias for m in model.modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(m.bias, nn.Parameter)]
        fresh = [p for m in resolve_modules(model, self.config.reinit).values() for p in m.parameters()]
        params = list({id(p): p for p in biases + fresh}.values())
        for param in params:
            param.requires_grad_(True)
        return [{"name": "lab", "params": params, "lr_scale": 1.0}]

    def merge(self, model):
        return model  # trained in place: already a plain DiT

    def count(self, model):
        return method_accounting(self, model, module_param_names(model, self.config.reinit))
'''.replace("TASK_STAGE", repr(_task_stage()))


def write_distribution(root: Path, dist: str, entry_points: dict[str, str], files: dict[str, str]) -> Path:
    """``root`` laid out as pip installs ``dist``: its source files and a ``<dist>-0.1.dist-info`` folder."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[kindbench.methods]\n" + "".join(f"{name} = {value}\n" for name, value in entry_points.items()))
    return root


def lab_distribution(root: Path, entry_points: dict[str, str] | None = None) -> Path:
    return write_distribution(root, "labmethod", entry_points or {"labmethod": "labmethod:LabMethod"},
                              {"labmethod/__init__.py": LAB_SOURCE})


def _forget_plugin_modules() -> None:
    for module in [m for m in sys.modules if m.split(".")[0] in PLUGIN_MODULES]:
        del sys.modules[module]


@contextlib.contextmanager
def installed(*roots: Path):
    """``roots`` on ``sys.path`` and the registry re-scanned; afterwards the registry is as before."""
    paths = [str(root) for root in roots]
    sys.path[:0] = paths
    try:
        registry.refresh_plugins()
        yield
    finally:
        for path in paths:
            sys.path.remove(path)
        _forget_plugin_modules()
        fingerprint.clear_cache()
        registry.refresh_plugins()


@pytest.fixture
def lab(tmp_path):
    with installed(lab_distribution(tmp_path / "site")):
        yield tmp_path / "site"


# --------------------------------------------------------------------------------------------------------------
#                                     Discovery: lazy, deterministic, loud
# --------------------------------------------------------------------------------------------------------------


def test_plugin_is_listed_without_importing_it_and_loads_on_use(lab):
    assert "labmethod" in list_methods()
    assert registry.plugin_methods() == {"labmethod": ("labmethod:LabMethod", "labmethod")}
    assert registry.method_module("labmethod") == "labmethod"
    assert "labmethod" not in sys.modules  # listed and fingerprint-located, never imported
    cls = get_method_class("labmethod")
    assert "labmethod" in sys.modules and cls.__module__ == "labmethod"
    assert (cls.family, cls.rank_option, cls.ancestry_methods) == ("mylab", None, ("scratch", "full"))
    assert get_method("labmethod").config.reinit == ("y_embedder",)


def test_plugin_disappears_when_uninstalled(tmp_path):
    with installed(lab_distribution(tmp_path / "site")):
        assert "labmethod" in list_methods()
    assert "labmethod" not in list_methods() and registry.plugin_methods() == {}
    with pytest.raises(MethodError, match="unknown method 'labmethod'"):
        get_method_class("labmethod")


def test_plugin_named_like_a_builtin_is_an_error_naming_both_targets(tmp_path):
    site = lab_distribution(tmp_path / "site", {"full": "labmethod:LabMethod"})
    with pytest.raises(MethodError) as err, installed(site):
        pass
    message = str(err.value)
    assert "\n" not in message
    assert "'labmethod:LabMethod'" in message and "'baselines.full:FullMethod'" in message
    assert "distribution 'labmethod'" in message and "builtin" in message
    assert registry.method_module("full") == "baselines.full"  # the builtin was not overridden, and still works


def test_two_plugins_with_one_name_are_an_error_naming_both(tmp_path):
    one = lab_distribution(tmp_path / "one", {"twin": "labmethod:LabMethod"})
    two = write_distribution(tmp_path / "two", "labsolo", {"twin": "labsolo:SoloMethod"},
                             {"labsolo.py": "from labmethod import LabMethod as SoloMethod\n"})
    with pytest.raises(MethodError) as err, installed(one, two):
        pass
    message = str(err.value)
    assert "'labmethod:LabMethod'" in message and "'labsolo:SoloMethod'" in message
    assert "distribution 'labmethod'" in message and "distribution 'labsolo'" in message
    assert "twin" not in list_methods()


def test_a_plugin_not_fitting_the_contract_is_an_error_on_use(tmp_path):
    site = lab_distribution(tmp_path / "site", {"labmethod": "labmethod:LabMethod", "otherlab": "labmethod:LabMethod",
                                                "labhelper": "labmethod:helper", "labghost": "labmethod:Ghost"})
    with installed(site):
        assert {"otherlab", "labhelper", "labghost"} <= set(list_methods())  # listing alone checks nothing
        with pytest.raises(MethodError, match="'otherlab' points to a class named 'labmethod'"):
            get_method_class("otherlab")
        with pytest.raises(MethodError, match="'labhelper' -> 'labmethod:helper' is not a Method subclass"):
            get_method_class("labhelper")
        with pytest.raises(MethodError, match="module 'labmethod' has no 'Ghost'"):
            get_method_class("labghost")
        assert get_method_class("labmethod").family == "mylab"


def test_bad_entry_point_names_are_errors(tmp_path):
    site = lab_distribution(tmp_path / "site", {"Lab-Method": "labmethod:LabMethod"})
    with pytest.raises(MethodError, match="'Lab-Method'.*distribution 'labmethod'.*lowercase word"), installed(site):
        pass


def test_kindbench_methods_lists_the_plugin_with_its_family(lab, capsys):
    from bench.cli import list_methods_main

    assert list_methods_main([]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("labmethod "))
    assert line.split()[1] == "mylab" and _task_stage() in line


# --------------------------------------------------------------------------------------------------------------
#                                   Code fingerprints of code outside the repo
# --------------------------------------------------------------------------------------------------------------


def test_fingerprint_hashes_the_plugin_source(lab):
    code = fingerprint.code_fingerprint("sample", "labmethod")
    assert code["modules"].split(",")[-1] == "labmethod"
    closure = fingerprint.module_closure(("labmethod",), fingerprint.FIRST_PARTY + ("labmethod",))
    assert closure["labmethod"] == (lab / "labmethod" / "__init__.py").resolve()
    assert "methods.transfer" in closure  # the plugin's first-party imports count too

    source = lab / "labmethod" / "__init__.py"
    text = source.read_text()
    source.write_text(text + "\n# a comment is not behaviour\n")
    fingerprint.clear_cache()
    assert fingerprint.code_fingerprint("sample", "labmethod") == code
    source.write_text(text + "\n_EDITED = True\n")
    fingerprint.clear_cache()
    assert fingerprint.code_fingerprint("sample", "labmethod")["fingerprint"] != code["fingerprint"]
    assert "labmethod" not in sys.modules  # fingerprinting locates the source without importing it


def test_fingerprint_finds_a_single_file_plugin_module(tmp_path):
    site = lab_distribution(tmp_path / "site", {"labmethod": "labmethod:LabMethod"})
    (site / "labsolo.py").write_text("X = 1\n")
    with installed(site):
        assert fingerprint.module_file("labsolo") == (site / "labsolo.py").resolve()
        assert fingerprint.module_file("labsolo.X") is None  # an attribute, not a module


def test_a_plugin_module_without_source_is_an_error_not_an_empty_hash(tmp_path):
    site = write_distribution(tmp_path / "site", "ghost", {"ghost": "ghost_missing:Ghost"}, {})
    with installed(site):
        assert registry.method_module("ghost") == "ghost_missing"
        with pytest.raises(FileNotFoundError, match="'ghost_missing'"):
            fingerprint.code_fingerprint("sample", "ghost")
        assert fingerprint.code_fingerprint("evaluate", "ghost")  # a step that does not run the method's code


# --------------------------------------------------------------------------------------------------------------
#                                     End to end: a suite run with the plugin
# --------------------------------------------------------------------------------------------------------------


def plugin_suite(path: Path) -> Path:
    """The mini suite with its methods replaced: ``scratch`` and the plugin in ``full``'s place (same ancestry)."""
    text = MINI.read_text()
    head, *blocks = text.split("[[methods]]")
    kept = []
    for block in blocks:
        name = tomllib.loads(block)["name"]
        if name == "scratch":
            kept.append(block)
        elif name == "full":
            kept.append(block.replace('name = "full"', 'name = "labmethod"'))
    assert len(kept) == 2, "tests/suites/mini.toml no longer lists scratch and full"
    head = head.replace('name = "mini"', 'name = "plugin-mini"')
    path.write_text(head + "".join(f"[[methods]]{block}" for block in kept))
    suite = tomllib.loads(path.read_text())
    assert [m["name"] for m in suite["methods"]] == ["scratch", "labmethod"] and suite["name"] == "plugin-mini"
    return path


def test_a_suite_runs_a_plugin_method_end_to_end(tmp_path):
    site = lab_distribution(tmp_path / "site")
    suite = plugin_suite(tmp_path / "plugin-mini.toml")
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    # One job at a time, in the ``kindbench run`` process: it sees the plugin only through PYTHONPATH, as pool
    # workers and torchrun processes would (they inherit the environment), without each importing torch again.
    command = [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite), "--runs", str(runs), "--jobs", "1"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = runs / "results" / "plugin-mini"
    summary = json.loads((results / "last_run.json").read_text())
    assert summary["outcomes"]["failed"] == 0 and summary["outcomes"]["ran"] > 0, summary

    records = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    trained = [r for r in records if r["run_info"]["method"] == "labmethod" and "train_info" in r]
    assert len(trained) == 1, [r["run_info"]["job_id"] for r in records]
    info = trained[0]["run_info"]
    assert info["family"] == "mylab" and info["code"]["fingerprint"]
    assert info["code"]["modules"].split(",")[-1] == "labmethod"  # the plugin's own source is in the fingerprint
    assert trained[0]["train_info"]["method_options"]["reinit"] == ["y_embedder"]

    boards = sorted(results.glob("leaderboard/**/leaderboard.csv"))
    assert boards, f"no leaderboard CSV under {results}"
    with open(boards[0], newline="") as handle:
        rows = list(csv.DictReader(handle))
    families = {row["method"]: row["family"] for row in rows}
    assert families.get("labmethod") == "mylab" and families.get("scratch") == "pretrain", rows
    print(f"plugin suite: {seconds:.0f} s wall, {summary['outcomes']}")
