"""Module surgery on a stock DiT: find and replace target Linears, freeze, re-initialise whole modules.

A method never edits ``bench/models/dit.py``; it changes a built model through these helpers (composer's
``module_surgery``, peft's ``_create_and_replace``). Targets are module-name *suffixes* matched on whole dotted
components: ``attn.qkv`` matches ``blocks.3.attn.qkv``, ``fc1`` matches ``blocks.3.mlp.fc1``, but ``c1`` matches
nothing. A target that matches no Linear is an error that lists what could have been meant (torchtitan only warns;
we fail, docs/harness.md §9.4).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.base import MethodError

_BLOCK_INDEX = re.compile(r"^blocks\.\d+\.")


def matches_suffix(name: str, suffix: str) -> bool:
    """True when ``suffix`` equals the last dotted components of ``name`` (``attn.qkv`` vs ``blocks.0.attn.qkv``)."""
    return name == suffix or name.endswith("." + suffix)


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    for target in targets:
        if not isinstance(target, str) or not target or target.startswith(".") or target.endswith("."):
            raise MethodError(f"target {target!r} must be a dotted module-name suffix such as 'attn.qkv'")
    return targets


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` in ``model``, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _candidates(model: nn.Module) -> list[str]:
    # Block Linears repeat once per block; list each kind once (attn.qkv, not blocks.0.attn.qkv ... blocks.27...).
    seen: dict[str, None] = {}
    for name in linear_names(model):
        seen.setdefault(_BLOCK_INDEX.sub("", name), None)
    return list(seen)


def find_linears(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` whose qualified name ends with one of ``targets``, by name, in module order.

    Raises ``MethodError`` naming the first target that matches nothing and listing the Linear names it could be.
    """
    targets = _check_targets(targets)
    found: dict[str, nn.Linear] = {}
    hits = dict.fromkeys(targets, 0)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for target in targets:
            if matches_suffix(name, target):
                found[name] = module
                hits[target] += 1
    for target, count in hits.items():
        if count == 0:
            candidates = _candidates(model)
            close = difflib.get_close_matches(target, candidates, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MethodError(f"target {target!r} matches no nn.Linear in {type(model).__name__}{hint} "
                              f"(Linear names: {', '.join(candidates)})")
    return found


@dataclass
class SurgeryReport:
    """What ``replace_linears`` did: the replaced module names, grouped by the target that matched them."""

    replaced: list[str] = field(default_factory=list)
    by_target: dict[str, list[str]] = field(default_factory=dict)


@torch.no_grad()
def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out x in) and ``bias``: what a method's layer becomes when it
    is merged into a plain DiT (same device and dtype as ``weight``)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model`` (the parent must exist)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(model: nn.Module, targets: Iterable[str],
                    factory: Callable[[str, nn.Linear], nn.Module]) -> SurgeryReport:
    """Replace every Linear matched by ``targets`` with ``factory(name, linear)``, in place.

    All matches are collected before anything is replaced, so an unmatched target leaves the model untouched.
    """
    targets = _check_targets(targets)
    found = find_linears(model, targets)
    report = SurgeryReport(by_target={t: [n for n in found if matches_suffix(n, t)] for t in targets})
    for name, linear in found.items():
        replacement = factory(name, linear)
        if not isinstance(replacement, nn.Module):
            raise MethodError(f"surgery factory returned {type(replacement).__name__} for {name}, not an nn.Module")
        set_submodule(model, name, replacement)
        report.replaced.append(name)
    return report


def freeze_all(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter (the first half of every ``mark_trainable``)."""
    for param in model.parameters():
        param.requires_grad_(False)


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Modules at the exact dotted paths ``names`` (``y_embedder``, ``final_layer``); a missing path is an error."""
    resolved: dict[str, nn.Module] = {}
    for name in names:
        try:
            resolved[name] = model.get_submodule(name)
        except AttributeError:
            top = ", ".join(n for n, _ in model.named_children())
            raise MethodError(f"module {name!r} not found in {type(model).__name__} (top-level modules: {top})") \
                from None
    return resolved


# --------------------------------------------------------------------------------------------------------------
#                        Re-initialisation of whole modules for a new label space
# --------------------------------------------------------------------------------------------------------------


def _reinit_label_embedder(module: nn.Module) -> None:
    # DiT initialises the class table N(0, 0.02); the model was built with the task's num_classes (+1 null row),
    # so only the values are redrawn here.
    nn.init.normal_(module.embedding_table.weight, std=0.02)


def _reinit_final_layer(module: nn.Module) -> None:
    # DiT zero-initialises the output head (adaLN-Zero), so a re-initialised head starts by predicting zero.
    for linear in (module.adaLN_modulation[-1], module.linear):
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


#: Modules a method may list in ``reinit``, with DiT's own initialisation of each.
REINIT_INITIALISERS: dict[str, Callable[[nn.Module], None]] = {
    "y_embedder": _reinit_label_embedder,
    "final_layer": _reinit_final_layer,
}


def check_reinit_names(names: Iterable[str]) -> tuple[str, ...]:
    """Validate a ``reinit`` list against ``REINIT_INITIALISERS`` (used by Configs in ``__post_init__``)."""
    names = tuple(names)
    for name in names:
        if name not in REINIT_INITIALISERS:
            raise MethodError(f"cannot re-initialise {name!r}; supported modules: {', '.join(REINIT_INITIALISERS)}")
    if len(set(names)) != len(names):
        raise MethodError(f"reinit lists a module twice: {names}")
    return names


@torch.no_grad()
def reinit_modules(model: nn.Module, names: Iterable[str]) -> None:
    """Re-initialise the modules ``names`` with DiT's initialisation (``y_embedder`` N(0, 0.02), ``final_layer`` 0)."""
    names = check_reinit_names(names)
    for name, module in resolve_modules(model, names).items():
        REINIT_INITIALISERS[name](module)


def module_param_names(model: nn.Module, module_names: Iterable[str]) -> set[str]:
    """Qualified parameter names inside the modules at the exact paths ``module_names``."""
    names: set[str] = set()
    for prefix, module in resolve_modules(model, module_names).items():
        names.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
    return names
