"""Ranks matched to a trainable-parameter budget (docs/methods.md §6.4), computed from builds, never typed in.

Every PEFT baseline is reported twice: at its standard rank (r = 16) and at the rank whose trainable-parameter count
matches KIND's. The count is measured, not derived from a formula: the method is built exactly as a run builds it
(ancestry, new class table, adapters, ``mark_trainable``) on the meta device, where no weights are allocated, so
counting DiT-L/2 takes a fraction of a second.

    >>> target = kind_trainable_count(ArchSpec("DiT-B/2"), num_classes=150)
    >>> matched_rank("lora", ArchSpec("DiT-B/2"), 150, target)          # largest r with count(r) <= target

``python -m methods.budget --arch DiT-B/2 --num-classes 150`` prints KIND's count and every matched rank.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from methods import get_method
from methods.base import ArchSpec, Export, Method, MethodError, Task

#: What a method with a ``rank_option`` implements for ``matched_rank`` (``Method.rank_option`` documents them).
BUDGET_HOOKS = ("adapted_linears", "rank_candidates", "budget_options")


def build_for_count(method: Method, arch: ArchSpec, num_classes: int, stage: str = "transfer",
                    device: str = "meta") -> torch.nn.Module:
    """``method``'s model for a ``stage`` task on ``device`` (meta: shapes only), built from an ancestry that the
    method itself pre-trains (same options, so structural options such as KIND's ``decompose_adaln`` agree) or,
    for a method without an ancestry stage, one of its first accepted ancestry method (a dense DiT). Ancestry and
    task share ``num_classes`` (only the class table depends on it)."""
    with torch.device(device):
        ancestry = None
        if method.ancestry_methods:
            if "ancestry" in method.stages and method.name in method.ancestry_methods:
                source_name, source_method = method.name, method
            else:
                source_name = method.ancestry_methods[0]
                source_method = get_method(source_name)
            source = source_method.build_ancestry(arch, num_classes)
            ancestry = Export(method=source_name, arch=arch, num_classes=num_classes, state=source.state_dict())
        model = method.build(arch, Task("budget", num_classes, stage=stage), ancestry)
    method.mark_trainable(model)
    return model


def trainable_count(method_name: str, arch: ArchSpec, num_classes: int, options: dict | None = None,
                    stage: str = "transfer") -> int:
    """Trainable parameters of ``method_name`` (with ``options``) built for a ``stage`` task on ``arch``: adapters,
    new class embeddings and fully trained modules alike, exactly what the optimizer would receive."""
    method = get_method(method_name, options)
    model = build_for_count(method, arch, num_classes, stage)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kind_trainable_count(arch: ArchSpec, num_classes: int, options: dict | None = None) -> int:
    """KIND's trainable parameters in the ``transfer`` stage for ``arch`` (default config unless ``options``),
    built through the registry (the baselines never import ``kind`` directly)."""
    try:
        return trainable_count("kind", arch, num_classes, options)
    except ImportError as err:
        raise MethodError(f"the kind method cannot be imported ({err}); pass KIND's trainable count as a number to "
                          f"matched_rank instead") from None


def matched_rank(method_name: str, arch: ArchSpec, num_classes: int, target_trainable: int,
                 options: dict | None = None, *, strict: bool = True) -> int:
    """The largest value of ``method_name``'s rank option (``rank``; OFT/BOFT: ``block_size``) whose trainable count
    does not exceed ``target_trainable``, searched over the method's meaningful values by bisection (every count is
    non-decreasing in the rank).

    Errors (``MethodError``): the method has no rank option; even the smallest rank exceeds the target; or, with
    ``strict``, the target is unreachable (the largest meaningful rank still trains fewer parameters; VeRA and LoKr,
    whose counts grow slowly or saturate). ``strict=False`` returns that largest rank instead.
    """
    if isinstance(target_trainable, bool) or not isinstance(target_trainable, int) or target_trainable < 1:
        raise MethodError(f"target_trainable must be a positive int, got {target_trainable!r}")
    options = dict(options or {})
    method = get_method(method_name, options)
    option = getattr(type(method), "rank_option", None)
    if option is None:
        raise MethodError(f"method {method_name!r} has no rank option to match a parameter budget with")
    lacking = [hook for hook in BUDGET_HOOKS if not callable(getattr(method, hook, None))]
    if lacking:
        raise MethodError(f"method {method_name!r} declares rank_option {option!r} but does not implement "
                          f"{', '.join(lacking)} (methods.base.Method.rank_option)")
    probe = arch.build(num_classes, device="meta")
    shapes = [(probe.get_submodule(n).out_features, probe.get_submodule(n).in_features)
              for n in method.adapted_linears(probe)]
    candidates = method.rank_candidates(shapes)
    count = _memoised(lambda value: trainable_count(method_name, arch, num_classes,
                                                    {**options, **method.budget_options(value)}))
    smallest, largest = candidates[0], candidates[-1]
    if count(smallest) > target_trainable:
        raise MethodError(f"{method_name} with {option} = {smallest} already trains {count(smallest):,} parameters, "
                          f"more than the budget {target_trainable:,}")
    if count(largest) <= target_trainable:
        if strict:
            raise MethodError(f"{method_name} cannot reach the budget {target_trainable:,}: its largest meaningful "
                              f"{option} = {largest} trains {count(largest):,} parameters")
        return largest
    low, high = 0, len(candidates) - 1  # invariant: count(low) <= target < count(high)
    while high - low > 1:
        middle = (low + high) // 2
        if count(candidates[middle]) <= target_trainable:
            low = middle
        else:
            high = middle
    return candidates[low]


def kind_matched_rank(method_name: str, arch: ArchSpec, num_classes: int, options: dict | None = None,
                      kind_options: dict | None = None, *, strict: bool = True) -> int:
    """``matched_rank`` against KIND's own trainable count for the same arch and label space."""
    target = kind_trainable_count(arch, num_classes, kind_options)
    return matched_rank(method_name, arch, num_classes, target, options, strict=strict)


def _memoised(function: Callable[[int], int]) -> Callable[[int], int]:
    cache: dict[int, int] = {}

    def wrapper(value: int) -> int:
        if value not in cache:
            cache[value] = function(value)
        return cache[value]

    return wrapper


# --------------------------------------------------------------------------------------------------------------
#                                                    CLI
# --------------------------------------------------------------------------------------------------------------

def ranked_methods() -> list[str]:
    """Registered methods that declare a ``rank_option`` (the ones a parameter budget can be matched for)."""
    from methods.registry import get_method_class, list_methods

    return [name for name in list_methods() if get_method_class(name).rank_option]


def _report(arch: ArchSpec, num_classes: int, adaln: bool) -> list[str]:
    kind_options = {"decompose_adaln": True} if adaln else None
    target = kind_trainable_count(arch, num_classes, kind_options)
    lines = [f"{arch.name}, {num_classes} classes, adaLN {'adapted' if adaln else 'frozen'}: KIND trains "
             f"{target:,} parameters", "", "| method | option | standard | count | KIND-matched | count |",
             "|---|---|---|---|---|---|"]
    for name in ranked_methods():
        options = {"targets": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")} if adaln else {}
        method = get_method(name, options)
        option = type(method).rank_option
        standard = getattr(method.config, option)
        try:
            standard_count = f"{trainable_count(name, arch, num_classes, options):,}"
        except MethodError as err:  # e.g. BOFT with butterfly factors where its CUDA extension cannot be built
            lines.append(f"| {name} | {option} | {standard} | - | - | {err} |")
            continue
        try:
            rank = matched_rank(name, arch, num_classes, target, options)
            count = trainable_count(name, arch, num_classes, {**options, **method.budget_options(rank)})
            matched = f"{rank} | {count:,}"
        except MethodError as err:
            matched = f"- | {err}"
        lines.append(f"| {name} | {option} | {standard} | {standard_count} | {matched} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KIND's trainable count and the PEFT ranks matched to it.")
    parser.add_argument("--arch", default="DiT-B/2", help="DiT flavour (default DiT-B/2)")
    parser.add_argument("--num-classes", type=int, default=150, help="classes of the downstream task")
    parser.add_argument("--adaln", action="store_true", help="adapt adaLN too (KIND: decompose_adaln)")
    args = parser.parse_args(argv)
    print("\n".join(_report(ArchSpec(args.arch), args.num_classes, args.adaln)))


if __name__ == "__main__":
    main()
