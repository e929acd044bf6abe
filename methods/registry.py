"""Method registry: name -> ``"package.module:Class"``, imported lazily (lm-eval's ``MODEL_MAPPING``).

The harness never imports ``kind`` or ``baselines``; it asks the registry by name, so a heavy or broken method
package costs nothing until that method is used. To add a method: write it, add one line to ``_BUILTIN`` (or call
``register_method`` from a plugin), add contract-test rows.
"""

from __future__ import annotations

import difflib
import importlib
import re
import threading

from methods.base import Method, MethodError

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

_lock = threading.Lock()
_entries: dict[str, str | type[Method]] = dict(_BUILTIN)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_method(name: str, target: str | type[Method]) -> None:
    """Register ``name`` -> a Method class or a lazy ``"module:Class"`` string. Names are lowercase words."""
    if not _NAME.match(name):
        raise MethodError(f"method name {name!r} must be a lowercase word (letters, digits, underscore)")
    if isinstance(target, str) and ":" not in target:
        raise MethodError(f"lazy target {target!r} must look like 'package.module:Class'")
    with _lock:
        if name in _entries and _entries[name] != target:
            raise MethodError(f"method {name!r} is already registered as {_entries[name]!r}")
        _entries[name] = target


def list_methods() -> list[str]:
    """Every registered method name, sorted."""
    return sorted(_entries)


def get_method_class(name: str) -> type[Method]:
    """The Method class registered under ``name``, importing its module on first use."""
    with _lock:
        target = _entries.get(name)
    if target is None:
        close = difflib.get_close_matches(name, list(_entries), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; registered: {', '.join(list_methods())}"
        raise MethodError(f"unknown method {name!r}{hint}")
    if isinstance(target, str):
        module_name, _, class_name = target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise MethodError(f"registry entry {name!r} -> {target!r} is not a Method subclass")
        if cls.name != name:
            raise MethodError(f"registry entry {name!r} points to a class named {cls.name!r}")
        with _lock:
            _entries[name] = cls
        target = cls
    return target


def get_method(name: str, options: dict | None = None) -> Method:
    """An instance of method ``name`` with its Config built from ``options`` (unknown options are errors)."""
    return get_method_class(name)(options)


def method_module(name: str) -> str:
    """The module that defines method ``name`` (its code fingerprint starts there), without importing it."""
    with _lock:
        target = _entries.get(name)
    if target is None:
        get_method_class(name)  # raises the did-you-mean error
    if isinstance(target, str):
        return target.partition(":")[0]
    return target.__module__
