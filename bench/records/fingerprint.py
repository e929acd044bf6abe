"""Code fingerprints: which source made a record, so a result is never taken for the output of code it did not see.

A job's fingerprint hashes the source of every first-party module its step can execute: the step's own module
(``bench.pipeline.steps.<step>``), the method's module for steps that build the model, and everything those import,
transitively, including imports inside functions (the harness imports lazily). Editing ``baselines/boft.py`` thus
changes the fingerprint of BOFT's training and sampling jobs and of nothing else; editing a metric changes the
evaluation jobs only. What is hashed is each file's syntax tree without docstrings: comments, docstrings and layout
do not change what runs, so editing them leaves results current; any other edit, even one that could not change
a number, makes them stale (conservative: it re-runs too much, never too little). A module's name is part of the
hash, so moving a file changes it.

Job ids stay config-addressed; a record whose fingerprint differs from the checkout's is *stale*
(``bench.pipeline.status``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

#: First-party packages whose source counts; a method registered from another package adds its own top package.
FIRST_PARTY = ("bench", "methods", "kind", "baselines")

#: The module that carries out each job step (the dispatcher ``bench.pipeline.jobs`` only routes and writes records).
STEP_MODULES = {"prepare": "bench.pipeline.steps.prepare", "pretrain": "bench.pipeline.steps.training",
                 "train": "bench.pipeline.steps.training", "sample": "bench.pipeline.steps.sampling",
                 "evaluate": "bench.pipeline.steps.scoring", "aggregate": "bench.pipeline.steps.aggregation"}

#: Steps whose output depends on the method's code (they build the method's model).
MODEL_STEPS = frozenset({"pretrain", "train", "sample"})


@functools.cache
def _package_dir(top: str) -> tuple[Path, ...]:
    """Where top-level package ``top`` lives (every folder of a namespace package), or, for a top-level module
    (a plugin's ``labmethod.py``), its file; empty if it cannot be found. Found without importing it."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # ``__main__`` and other modules without a spec
        return ()
    if spec is None:
        return ()
    if spec.submodule_search_locations:
        return tuple(Path(location).resolve() for location in spec.submodule_search_locations)
    if spec.origin and spec.origin.endswith(".py") and Path(spec.origin).is_file():
        return (Path(spec.origin).resolve(),)
    return ()


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` of a first-party or plugin package (a package's ``__init__.py``, a
    top-level module's own file), or None if there is none."""
    top, _, rest = name.partition(".")
    for base in _package_dir(top):
        if base.is_file():  # a top-level module has no submodules
            return None if rest else base
        path = base.joinpath(*rest.split(".")) if rest else base
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _walk_runtime(tree: ast.AST):
    """``ast.walk`` minus ``if TYPE_CHECKING:`` blocks (imports for annotations only never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` (module ``module``) imports, anywhere in the file, as absolute dotted names."""
    return _imports_cached(path, module, path.stat().st_mtime_ns)


@functools.cache
def _imports_cached(path: Path, module: str, mtime_ns: int) -> frozenset[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk_runtime(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)  # ``from pkg import submodule``
    return frozenset(found)


def module_closure(roots: tuple[str, ...], packages: tuple[str, ...] = FIRST_PARTY) -> dict[str, Path]:
    """Module name -> file for ``roots`` and every first-party module they reach, with their parent packages."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in packages:
            continue
        path = module_file(name)
        if path is None:
            continue  # an attribute imported with ``from pkg import name``, not a module
        seen[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b.c runs a and a.b first
        todo.extend(_imports(path, name))
    return seen


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop every bare string statement: the docstrings of modules, classes and functions and the attribute
    docstrings under dataclass fields. They are prose, not behaviour (a string statement computes nothing)."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                            and isinstance(s.value.value, str))]
            if len(kept) != len(body):
                setattr(node, name, kept or [ast.Pass()])
    return tree


@functools.cache
def _source_digest(path: Path, mtime_ns: int) -> str:
    """Hash of what the file does: its syntax tree without docstrings (comments and layout are not in it)."""
    tree = _strip_docstrings(ast.parse(path.read_bytes(), str(path)))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


@functools.cache
def _fingerprint(roots: tuple[str, ...], packages: tuple[str, ...]) -> str:
    closure = module_closure(roots, packages)
    unseen = [root for root in roots if root not in closure]
    if unseen:  # never a fingerprint that silently leaves the method's own code out
        raise FileNotFoundError(f"code fingerprint: no Python source file found for module {unseen[0]!r} (a "
                                f"method's module, e.g. a plugin's, must be importable from a .py file)")
    digest = hashlib.sha256()
    for name, path in sorted(closure.items()):
        digest.update(f"{name}\0{_source_digest(path, path.stat().st_mtime_ns)}\n".encode())
    return digest.hexdigest()[:16]


def step_roots(step: str, method: str | None) -> tuple[str, ...]:
    """The modules whose closure makes the output of a ``step`` job of ``method``."""
    roots = [STEP_MODULES[step]]
    if step in MODEL_STEPS and method:
        from methods.registry import method_module

        roots.append(method_module(method))
    return tuple(roots)


def code_fingerprint(step: str, method: str | None = None) -> dict[str, str]:
    """``{"fingerprint", "modules"}`` of a ``step`` job of ``method`` in this checkout (cached per process)."""
    roots = step_roots(step, method)
    packages = tuple(sorted(set(FIRST_PARTY) | {r.split(".")[0] for r in roots}))
    return {"fingerprint": _fingerprint(roots, packages), "modules": ",".join(roots)}


def clear_cache() -> None:
    """Forget computed fingerprints (tests that edit source in place)."""
    _fingerprint.cache_clear()
    _package_dir.cache_clear()
    _imports_cached.cache_clear()
    _source_digest.cache_clear()
