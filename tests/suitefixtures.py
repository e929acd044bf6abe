"""Small suites for the plan, SLURM, WAVE and size-transfer tests (shared; tests/ is on sys.path).

Every test suite has the same head: one seed, 16 px synthetic images with 3 channels, 4 images a class, a global
batch of 8, 3 steps, 8 samples and the synthetic extractor. ``suite_toml`` writes that head and lets a test change
or add keys of it (``schedule``, ``sample``, ``evaluate``, an ``engine`` section, other seeds and archs); the body,
the ancestries, tasks and methods a test is about, is built from ``ancestry``, ``task`` and ``method`` entries.
The text is plain TOML, as a suite file is written by hand, so tests may still edit it with ``str.replace``::

    suite_toml("mini", ancestries=[DENSE], tasks=[NOVEL_A], methods=FULL_AND_LORA)

``mini_suite`` is the plan tests' suite (scratch, full and lora on a normal and a domain task) and ``suite_file``
writes a suite's text where a test can load it.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL = {"in_channels": 3, "input_size": 16}
DATA = {"image_size": 16, "per_class": 4}
SCHEDULE = {"global_batch": 8, "steps": 3}
SAMPLE = {"num_samples": 8}
EVALUATE = {"extractor": "synthetic"}


def _value(value) -> str:
    """``value`` as a TOML value: strings, numbers, booleans, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    return repr(value)


def _keys(keys: dict) -> str:
    """``key = value`` lines, None values left out."""
    return "".join(f"{k} = {_value(v)}\n" for k, v in keys.items() if v is not None)


def _table(header: str, keys: dict) -> str:
    """A ``[header]`` table (or ``[[header]]`` array entry, as ``header`` says) with its keys."""
    return f"{header}\n" + _keys(keys)


def _overrides(split: str, data: dict | None, sections: dict) -> dict:
    return {"data": {"split": split, **(data or {})}, **sections}


def ancestry(name: str, method: str, *, teacher: str | None = None, arch: str | None = None,
             options: dict | None = None, split: str = "pretrain", data: dict | None = None, **sections) -> str:
    """``[ancestries.<name>]``, trained on ``split``: ``data`` adds data overrides, ``sections`` other override
    sections (``schedule={...}``, ``model={...}``)."""
    return _table(f"[ancestries.{name}]", {"method": method, "teacher": teacher, "arch": arch, "options": options,
                                           "overrides": _overrides(split, data, sections)})


def task(name: str, *, stage: str | None = None, split: str = "novel-a", data: dict | None = None, **sections) -> str:
    """``[tasks.<name>]``: its ``stage`` where not the default, its data ``split`` and overrides as ``ancestry``."""
    return _table(f"[tasks.{name}]", {"stage": stage, "overrides": _overrides(split, data, sections)})


def method(name: str, *, variant: str | None = None, ancestry: str | None = None, options: dict | None = None) -> str:
    """A ``[[methods]]`` entry."""
    return _table("[[methods]]", {"name": name, "variant": variant, "ancestry": ancestry, "options": options})


#: The ancestry most suites start from: DiT trained from scratch on the pretraining split.
DENSE = ancestry("dense", "scratch")
#: A transfer task, and a domain task on the same classes.
NOVEL_A = task("novel-a")
SKETCH = task("sketch", stage="domain", data={"domain": "sketch"})
#: Full fine-tuning and LoRA (rank 2) from the dense ancestry.
FULL_AND_LORA = [method("full", ancestry="dense"), method("lora", ancestry="dense", options={"rank": 2})]


def suite_toml(name: str, *, ancestries: list[str], tasks: list[str], methods: list[str],
               seeds: list[int] | None = (0,), archs: list[str] = ("DiT-T/2",), engine: dict | None = None,
               schedule: dict | None = None, sample: dict | None = None, evaluate: dict | None = None) -> str:
    """A suite's TOML text: the common head, with ``schedule``, ``sample`` (``[protocol.sample]``) and ``evaluate``
    (``[protocol.eval]``) keys changed or added, an ``[defaults.engine]`` section when ``engine`` is given and no
    ``seeds`` line when ``seeds`` is None; then the ``ancestries``, ``tasks`` and ``methods`` entries in that order."""
    head = _keys({"name": name, "seeds": seeds, "archs": archs})
    defaults = [_table("[defaults.model]", MODEL), _table("[defaults.data]", DATA)]
    if engine is not None:
        defaults.append(_table("[defaults.engine]", engine))
    defaults.append(_table("[defaults.schedule]", {**SCHEDULE, **(schedule or {})}))
    protocol = [_table("[protocol.sample]", {**SAMPLE, **(sample or {})}),
                _table("[protocol.eval]", {**EVALUATE, **(evaluate or {})})]
    return "".join([head, *defaults, *protocol, *ancestries, *tasks, *methods])


def mini_suite(name: str, **dense_overrides) -> str:
    """The plan tests' suite: the dense ancestry (``dense_overrides`` as ``ancestry`` takes them), tasks ``novel-a``
    and ``sketch`` (a domain task), methods scratch, full and lora: 1 ancestry, 3 methods x 2 tasks."""
    return suite_toml(name, ancestries=[ancestry("dense", "scratch", **dense_overrides)], tasks=[NOVEL_A, SKETCH],
                      methods=[method("scratch"), *FULL_AND_LORA])


def suite_file(directory: Path, text: str, name: str = "suite.toml") -> str:
    """Writes ``text`` to ``directory/name`` and returns the path as a string (what ``load_suite`` and
    ``build_plan`` take)."""
    path = Path(directory) / name
    path.write_text(text)
    return str(path)
