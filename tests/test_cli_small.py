"""Small CLI and plumbing checks: cluster env file vs suites, the tomllib shim, ``--version``, ``train --help``, and
the progress bars of the metric pipeline."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import io
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import bench.progress
from bench.config.toml import tomllib

REPO = Path(__file__).resolve().parent.parent
SUITES = REPO / "bench" / "suites"
EXAMPLE_ENV = REPO / "slurm" / "clusters" / "example.env"
SOURCE_PACKAGES = ("bench", "methods", "kind", "baselines")


# ---------------------------------------------------------------------------------------------------- example.env

def env_file_vars(path: Path) -> dict[str, str]:
    """``NAME=value`` assignments of a bash-sourced env file (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).split("#", 1)[0].strip().strip('"')
    return out


def suite_vars() -> set[str]:
    """Every ``KINDBENCH_*`` variable the shipped suites expand (``${X}``/``$X``) or list in their headers."""
    names = set()
    for path in SUITES.rglob("*.toml"):
        names |= set(re.findall(r"\b(KINDBENCH_[A-Z0-9_]+)", path.read_text()))
    return names


def test_example_env_sets_exactly_what_the_suites_read():
    expanded = set()
    for path in SUITES.rglob("*.toml"):
        expanded |= set(re.findall(r"\$\{?(KINDBENCH_[A-Z0-9_]+)", path.read_text()))
    assert {"KINDBENCH_LATENTS", "KINDBENCH_REFS"} <= expanded  # the scan sees the suites' expansions
    env = env_file_vars(EXAMPLE_ENV)
    kb = {name for name in env if name.startswith("KINDBENCH_")}
    wanted = suite_vars() | {"KINDBENCH_VAE_DIR", "KINDBENCH_WEIGHTS_DIR"}
    assert wanted - kb == set(), "suite variables example.env does not set"
    assert kb - wanted == set(), "example.env sets KINDBENCH_ variables no suite reads"
    assert all(env[name] for name in kb), "every variable has a placeholder path"


def test_no_stale_variable_names_in_docs_and_code():
    stale = re.compile(r"KINDBENCH_(ADM_REF|IMAGENET)\b")
    files = [REPO / "README.md", *(REPO / "bench").rglob("*"), *(REPO / "slurm").rglob("*")]
    hits = [str(p.relative_to(REPO)) for p in files
            if p.is_file() and p.suffix in {".md", ".py", ".toml", ".env", ".sh", ""} and stale.search(p.read_text())]
    assert hits == []


# ------------------------------------------------------------------------------------------------------ tomllib

def test_tomlcompat_falls_back_to_tomli(monkeypatch):
    pytest.importorskip("tomli")
    import bench.config.toml as compat

    monkeypatch.setitem(sys.modules, "tomllib", None)  # what Python 3.10 looks like: no stdlib tomllib
    try:
        importlib.reload(compat)
        assert compat.tomllib.__name__ == "tomli"
        assert compat.tomllib.loads('a = 1\n[b]\nc = "x"')["b"]["c"] == "x"
        with pytest.raises(compat.tomllib.TOMLDecodeError):
            compat.tomllib.loads("a = ")
    finally:
        monkeypatch.undo()
        importlib.reload(compat)
    assert compat.tomllib.loads("a = 2") == {"a": 2}


def test_no_bare_tomllib_import():
    bare = re.compile(r"^\s*(import\s+tomllib\b|from\s+tomllib\s+import\b)", re.MULTILINE)
    offenders = []
    for package in (*SOURCE_PACKAGES, "tests"):
        for path in (REPO / package).rglob("*.py"):
            if path != REPO / "bench" / "config" / "toml.py" and bare.search(path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], "use `from bench.config.toml import tomllib` (Python 3.10 has no tomllib)"


# ---------------------------------------------------------------------------------------------------- --version

def pyproject_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag(flag, capsys):
    from bench.cli import main

    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out == f"kindbench {importlib.metadata.version('kindbench')}\n"


def test_version_falls_back_to_pyproject(monkeypatch, capsys):
    from bench import cli

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.importlib.metadata, "version", not_installed)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"kindbench {pyproject_version()}\n"


# ------------------------------------------------------------------------------------------------- train --help

def test_train_help_lists_every_config_key(capsys):
    from bench.config.schema import RunConfig
    from bench.run.train import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "bench/config/schema.py" in out
    assert f"--optim.lr={RunConfig().optim.lr}" in out
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):  # from the dataclass, so a removed or added section is followed
        assert f"[{section.name}]" in out
        for key in dataclasses.fields(getattr(defaults, section.name)):
            assert f"--{section.name}.{key.name}=" in out


def test_train_parse_args_unchanged():
    from bench.run.train import parse_args

    assert parse_args(["--config", "run.toml", "--optim.lr=2e-4"]) == ("run.toml", ["--optim.lr=2e-4"])


# ----------------------------------------------------------------------------------------------------- progress

def recording_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=120, color_system=None), buf


def test_progress_bar_shows_description_in_a_log_file():
    console, buf = recording_console()
    with bench.progress.progress_bar(3, "features: samples.npz", console=console) as advance:
        for _ in range(3):
            advance(1)
    out = buf.getvalue()
    assert "features: samples.npz" in out
    assert "3/3" in out


def test_progress_bar_prints_status_lines_where_not_a_terminal(monkeypatch):
    monkeypatch.setattr(bench.progress, "LOG_INTERVAL_S", 0.0)
    console, buf = recording_console()
    with bench.progress.progress_bar(4, "features: ref.npz", console=console) as advance:
        for _ in range(4):
            advance(1)
    lines = [line for line in buf.getvalue().splitlines() if "features: ref.npz" in line]
    assert len(lines) >= 4 and "1/4" in lines[0]  # one per step here, then the final bar


def test_progress_bar_zero_total_is_free(monkeypatch):
    def no_console():
        raise AssertionError("a zero-total bar must not create a console")

    monkeypatch.setattr(bench.progress, "default_console", no_console)
    with bench.progress.progress_bar(0, "nothing") as advance:
        advance(5)


class _FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        x = images.float().mean(dim=(1, 2, 3))[:, None] * self.w
        return types.SimpleNamespace(pool=x.expand(-1, 2048), spatial=x.expand(-1, 2023),
                                     logits_unbiased=x.expand(-1, 1008))


def test_extract_features_shows_a_bar(tmp_path, monkeypatch):
    from bench.metrics.networks.features import extract_features

    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    console, buf = recording_console()
    monkeypatch.setattr(bench.progress, "_CONSOLE", console)
    feats = extract_features(tmp_path / "samples.npz", inception=_FakeInception(), batch_size=2)
    assert feats.n == 5 and feats.pool.shape == (5, 2048)
    out = buf.getvalue()
    assert "features: samples.npz" in out
    assert "5/5" in out
