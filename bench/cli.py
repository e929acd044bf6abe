"""``kindbench``: the umbrella command. Each verb lives in its own module; this file only dispatches.

    kindbench run --suite tiny                           run a suite (local executor)
    kindbench plan --suite tiny                          its job graph and status
    kindbench train --config run.toml [--section.key=value ...]
    kindbench sample --run-dir runs/<run_id>
    kindbench leaderboard / plot                         derived results
    kindbench findings results/small                     the numbers a FINDINGS.md quotes
    kindbench evaluate SAMPLES.npz --ref REF [...]      (bench.metrics)
    kindbench metrics acceptance ...                     (bench.metrics)
    kindbench methods                                    list registered methods
    kindbench --version                                  the installed version
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

#: verb -> (module with a ``main(argv) -> int``, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "run": ("bench.pipeline.executor:run_main", "run a suite on this machine (default: tiny)"),
    "plan": ("bench.pipeline.executor:plan_main", "print a suite's job graph and what is done"),
    "train": ("bench.run.train", "train a DiT with a method (torchrun/srun compatible)"),
    "sample": ("bench.run.sample", "sample a trained run into an ADM-style .npz"),
    "latents": ("bench.data.encode", "encode an ImageFolder dataset into a VAE latent cache"),
    "leaderboard": ("bench.report.leaderboard", "records -> leaderboard CSV, Markdown, LaTeX"),
    "plot": ("bench.report.plots", "leaderboard CSVs -> plots (PNG + PDF)"),
    "findings": ("bench.report.findings", "a results folder -> the numbers its FINDINGS.md quotes (Markdown)"),
    "evaluate": ("bench.metrics.cli", "score an ADM-style .npz of samples against a reference"),
    "metrics": ("bench.metrics.cli", "metric utilities: reference building, acceptance procedures"),
    "methods": ("bench.cli", "list the registered methods"),
}


def list_methods_main(argv: list[str]) -> int:
    from methods import get_method_class, list_methods

    for name in list_methods():
        cls = get_method_class(name)
        rank = f"   rank option: {cls.rank_option}" if cls.rank_option else ""
        print(f"{name:18s} {cls.family:10s} stages: {', '.join(sorted(cls.stages))}{rank}")
    return 0


def version() -> str:
    """The installed distribution's version, else the one in pyproject.toml (a source tree that is not installed)."""
    try:
        return importlib.metadata.version("kindbench")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else "unknown"


def usage() -> str:
    lines = ["usage: kindbench <verb> [args] | --version", "", "verbs:"]
    lines += [f"  {verb:10s} {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0 if argv else 2
    if argv[0] in {"-V", "--version"}:
        print(f"kindbench {version()}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"kindbench: unknown verb {verb!r}\n{usage()}", file=sys.stderr)
        return 2
    if verb == "methods":
        return list_methods_main(rest)
    module_name, _, function = VERBS[verb][0].partition(":")
    module = importlib.import_module(module_name)
    if function:
        return getattr(module, function)(rest)
    # The metrics CLI takes its own verb ("evaluate ..." / "metrics ...") as the first argument.
    return module.main(argv if module.__name__ == "bench.metrics.cli" else rest)


if __name__ == "__main__":
    sys.exit(main())
