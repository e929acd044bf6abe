"""Method registry: name -> ``"package.module:Class"``, imported lazily (lm-eval's ``MODEL_MAPPING``).

The harness never imports ``kind`` or ``baselines``; it asks the registry by name, so a heavy or broken method
package costs nothing until that method is used. Methods come from three places, one namespace:

* ``_BUILTIN``: the methods this repository ships;
* plugins: entry points of installed distributions in the group ``kindbench.methods`` (entry-point name = method
  name, value = ``"module:Class"``), found once per process on first use (``refresh_plugins`` scans again) and,
  like the builtins, imported only when the method is used;
* ``register_method`` calls at run time.

A name two of them define differently is a ``MethodError`` naming both targets, never a silent override.
To add a method (in this repository or in your own package): docs/adding-a-method.md.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import re
import threading

from methods.base import STAGES, Method, MethodError

#: Entry-point group a distribution declares its methods in (``[project.entry-points."kindbench.methods"]``).
ENTRY_POINT_GROUP = "kindbench.methods"

_BUILTIN: dict[str, str] = {
    "scratch": "baselines.scratch:ScratchMethod",
    "full": "baselines.full:FullMethod",
    "lora": "baselines.peft_adapter:LoraMethod",
    "dora": "baselines.peft_adapter:DoraMethod",
    "pissa": "baselines.peft_adapter:PissaMethod",
    "vera": "baselines.peft_adapter:VeraMethod",
    "oft": "baselines.peft_adapter:OftMethod",
    "boft": "baselines.boft:BoftMethod",
    "loha": "baselines.peft_adapter:LohaMethod",
    "lokr": "baselines.peft_adapter:LokrMethod",
    "svdiff": "baselines.svdiff:SvdiffMethod",
    "difffit": "baselines.difffit:DiffFitMethod",
    "bitfit": "baselines.difffit:BitFitMethod",
    "heur_lg": "baselines.learngene_layers:HeurLGMethod",
    "auto_lg": "baselines.learngene_layers:AutoLGMethod",
    "weight_selection": "baselines.weight_selection:WeightSelectionMethod",
    "kind": "kind.kind:KindMethod",
    "kind_nogate": "kind.kind:KindNoGateMethod",
    "kind_fulltransfer": "kind.kind:KindFullTransferMethod",
    "tleg": "baselines.tleg:TlegMethod",
    "sws": "baselines.sws:SwsMethod",
    "ligo": "baselines.ligo:LigoMethod",
    "wave": "baselines.wave:WaveMethod",
    "fine": "baselines.fine:FineMethod",
    "fine_nofactor": "baselines.fine_nofactor:FineNoFactorMethod",
}

_lock = threading.RLock()
_entries: dict[str, str | type[Method]] = dict(_BUILTIN)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_plugins: dict[str, tuple[str, str]] | None = None
"""name -> (target, distribution) of every entry-point method, once discovered (None: not scanned yet)."""


def _target_text(target: str | type[Method]) -> str:
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def _origin(name: str) -> str:
    """Where entry ``name`` came from, for error messages."""
    if name in _BUILTIN:
        return "builtin"
    if _plugins and name in _plugins:
        return f"plugin of distribution {_plugins[name][1]!r}"
    return "registered at run time"


def _scan_entry_points() -> dict[str, tuple[str, str]]:
    """name -> (``"module:Class"``, distribution) of every ``kindbench.methods`` entry point, in a fixed order.

    Two distributions declaring one name with different targets is an error naming both."""
    found: dict[str, tuple[str, str]] = {}
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    keyed = [(point, getattr(point.dist, "name", None) or "?") for point in points]
    for point, dist in sorted(keyed, key=lambda item: (item[0].name, item[0].value, item[1])):
        where = f"entry point {point.name!r} = {point.value!r} of distribution {dist!r} (group {ENTRY_POINT_GROUP})"
        if not _NAME.match(point.name):
            raise MethodError(f"{where}: a method name must be a lowercase word (letters, digits, underscore)")
        if not point.attr:
            raise MethodError(f"{where}: the value must look like 'package.module:Class'")
        target = f"{point.module}:{point.attr}"
        if point.name in found and found[point.name][0] != target:
            other, other_dist = found[point.name]
            raise MethodError(f"method {point.name!r} is declared by two plugins: {other!r} (distribution "
                              f"{other_dist!r}) and {target!r} (distribution {dist!r}); uninstall or rename one")
        found.setdefault(point.name, (target, dist))
    return found


def _ensure_plugins() -> None:
    """Discover the entry-point methods once per process (nothing is imported); a clash is an error every time."""
    global _plugins
    if _plugins is not None:
        return
    with _lock:
        if _plugins is not None:
            return
        found = _scan_entry_points()
        for name, (target, dist) in found.items():
            current = _entries.get(name)
            if current is not None and _target_text(current) != target:
                raise MethodError(f"plugin method {name!r} -> {target!r} (distribution {dist!r}) clashes with the "
                                  f"{_origin(name)} method {name!r} -> {_target_text(current)!r}; rename the entry "
                                  f"point")
        for name, (target, _) in found.items():
            _entries.setdefault(name, target)
        _plugins = found


def refresh_plugins() -> list[str]:
    """Forget the discovered entry points and scan again; returns the plugin method names.

    For a process that installs a distribution after its first registry call (a test that builds one in a
    temporary folder and puts it on ``sys.path``). Builtins and ``register_method`` entries stay; a plugin that is
    no longer installed disappears (its module, if imported, stays in ``sys.modules``)."""
    global _plugins
    importlib.invalidate_caches()  # new folders on sys.path, new .dist-info folders
    with _lock:
        for name in _plugins or {}:
            if name not in _BUILTIN:
                _entries.pop(name, None)
        _plugins = None
    _ensure_plugins()
    return sorted(_plugins or {})


def plugin_methods() -> dict[str, tuple[str, str]]:
    """name -> (``"module:Class"``, distribution) of every method an installed distribution declares."""
    _ensure_plugins()
    return dict(_plugins or {})


def register_method(name: str, target: str | type[Method]) -> None:
    """Register ``name`` -> a Method class or a lazy ``"module:Class"`` string. Names are lowercase words."""
    if not _NAME.match(name):
        raise MethodError(f"method name {name!r} must be a lowercase word (letters, digits, underscore)")
    if isinstance(target, str) and ":" not in target:
        raise MethodError(f"lazy target {target!r} must look like 'package.module:Class'")
    _ensure_plugins()
    with _lock:
        if name in _entries and _target_text(_entries[name]) != _target_text(target):
            raise MethodError(f"method {name!r} is already registered as {_target_text(_entries[name])!r} "
                              f"({_origin(name)})")
        if not isinstance(_entries.get(name), type):
            _entries[name] = target


def list_methods() -> list[str]:
    """Every registered method name (builtins, plugins, run-time registrations), sorted."""
    _ensure_plugins()
    return sorted(_entries)


def _check_class(name: str, target: str, cls: object) -> type[Method]:
    """The contract the harness relies on, checked once when a lazy entry is first imported."""
    where = f"method {name!r} -> {target!r} ({_origin(name)})"
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodError(f"registry entry {name!r} -> {target!r} is not a Method subclass ({_origin(name)})")
    if cls.name != name:
        raise MethodError(f"registry entry {name!r} points to a class named {cls.name!r} ({_origin(name)})")
    if not cls.family:
        raise MethodError(f"{where} declares no family (the leaderboard family of its rows, e.g. 'peft')")
    unknown = sorted(set(cls.stages) - set(STAGES))
    if not cls.stages or unknown:
        raise MethodError(f"{where} must declare stages, a non-empty subset of {STAGES}; got {sorted(cls.stages)}")
    return cls


def get_method_class(name: str) -> type[Method]:
    """The Method class registered under ``name``, importing its module on first use."""
    _ensure_plugins()
    with _lock:
        target = _entries.get(name)
    if target is None:
        close = difflib.get_close_matches(name, list(_entries), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; registered: {', '.join(list_methods())}"
        raise MethodError(f"unknown method {name!r}{hint}")
    if isinstance(target, str):
        module_name, _, class_name = target.partition(":")
        module = importlib.import_module(module_name)
        try:
            cls = getattr(module, class_name)
        except AttributeError:
            raise MethodError(f"registry entry {name!r} -> {target!r} ({_origin(name)}): module {module_name!r} "
                              f"has no {class_name!r}") from None
        cls = _check_class(name, target, cls)
        with _lock:
            _entries[name] = cls
        target = cls
    return target


def get_method(name: str, options: dict | None = None) -> Method:
    """An instance of method ``name`` with its Config built from ``options`` (unknown options are errors)."""
    return get_method_class(name)(options)


def method_module(name: str) -> str:
    """The module that defines method ``name`` (its code fingerprint starts there), without importing it."""
    _ensure_plugins()
    with _lock:
        target = _entries.get(name)
    if target is None:
        get_method_class(name)  # raises the did-you-mean error
    if isinstance(target, str):
        return target.partition(":")[0]
    return target.__module__
