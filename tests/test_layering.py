"""The layers of docs/harness.md §8: import-linter's contracts from pyproject.toml, plus an independent static scan so
the main rule (the harness reaches ``kind``/``baselines`` only through the registry's strings) holds even if the
import-linter configuration were wrong."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config.toml import tomllib

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
METHOD_PACKAGES = {"kind", "baselines"}


def run_lint_imports(*args: str) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"lint-imports not found at {LINT_IMPORTS}: install the 'test' extra (import-linter)")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_import_linter_contracts_are_kept():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 4
    proc = run_lint_imports()
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    for contract in contracts:
        assert f"{contract['name']} KEPT" in report, report
    assert f"{len(contracts)} kept, 0 broken" in report, report


def test_import_linter_sees_real_imports(tmp_path):
    """Guard against vacuous passes: a contract that the code does break must be reported broken."""
    config = tmp_path / "broken.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["bench", "methods", "kind", "baselines"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "train must not use config (deliberately false)"\n'
                      'type = "forbidden"\nsource_modules = ["bench.run.train"]\n'
                      'forbidden_modules = ["bench.config.schema"]\n')
    proc = run_lint_imports("--config", str(config))
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout + proc.stderr


# ---- independent static scan -------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement (or a literal ``importlib.import_module``/``__import__`` call) names."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return {m for m in found if m}


def method_imports(package: str) -> dict[str, set[str]]:
    offenders = {}
    for path in sorted((REPO / package).rglob("*.py")):
        module = module_name(path)
        names = imported_modules(path.read_text(), module, is_package=path.name == "__init__.py")
        bad = {m for m in names if m.split(".")[0] in METHOD_PACKAGES}
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    return offenders


@pytest.mark.parametrize("package", ["bench", "methods"])
def test_harness_never_imports_method_packages(package):
    assert (REPO / package / "__init__.py").is_file()
    assert method_imports(package) == {}


def test_scan_detects_every_import_form():
    source = "\n".join([
        "import kind.gates",
        "from baselines import lora",
        "from baselines.peft_adapter import LoraMethod",
        "import importlib",
        "importlib.import_module('kind.recombine')",
        "__import__('baselines')",
        "from ...kind import x",  # relative import from bench/sub/mod.py climbs to the root
        "def late():",
        "    import kind",
        "import torch",
        "from bench.config.schema import RunConfig",
        "from .sibling import y",
    ])
    found = imported_modules(source, "bench.sub.mod")
    assert {"kind.gates", "baselines", "baselines.peft_adapter", "kind.recombine", "kind", "torch",
            "bench.config.schema", "bench.sub.sibling"} <= found
    assert {m for m in found if m.split(".")[0] in METHOD_PACKAGES} >= {"kind.gates", "baselines.lora",
                                                                        "kind.recombine", "kind"}


def test_scan_resolves_relative_imports_in_packages():
    assert "bench.models.dit" in imported_modules("from .models import dit", "bench", is_package=True)
    assert "bench.models" in imported_modules("from .. import models", "bench.data.synthetic")


def test_ruff_check_is_clean():
    """The lint rules of pyproject.toml hold over the whole tree (CI also runs ``ruff check`` on its own)."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.is_file():
        pytest.fail(f"ruff not found at {ruff}: install the 'test' extra")
    proc = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
