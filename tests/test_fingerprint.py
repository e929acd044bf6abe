"""Code fingerprints hash behaviour: prose (docstrings, field docstrings, comments, layout) leaves them unchanged,
any change to what the code computes changes them."""

from __future__ import annotations

import textwrap

from bench.records import fingerprint

BASE = '''
"""Module docstring."""
from dataclasses import dataclass


@dataclass
class Options:
    """Class docstring."""

    rank: int = 4
    """Field docstring."""

    def scaled(self) -> int:
        """Method docstring."""
        return self.rank * 2  # a comment
'''


def digest(tmp_path, text: str, name: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return fingerprint._source_digest(path, path.stat().st_mtime_ns)


def test_prose_does_not_change_the_fingerprint(tmp_path):
    base = digest(tmp_path, BASE, "base")
    prose = (BASE.replace("Module docstring.", "Another module text.")
             .replace("Field docstring.", "The rank of the adapter (see docs/methods.md).")
             .replace("Method docstring.", "Twice the rank.").replace("# a comment", "# why: doubling"))
    assert digest(tmp_path, prose, "prose") == base
    assert digest(tmp_path, BASE.replace('    """Field docstring."""\n', ""), "nofield") == base


def test_code_changes_change_the_fingerprint(tmp_path):
    base = digest(tmp_path, BASE, "base")
    assert digest(tmp_path, BASE.replace("rank: int = 4", "rank: int = 8"), "default") != base
    assert digest(tmp_path, BASE.replace("self.rank * 2", "self.rank * 3"), "body") != base
    assert digest(tmp_path, BASE.replace('"""Field docstring."""', 'FIELD = "Field docstring."'), "assign") != base


def test_training_jobs_do_not_depend_on_the_samplers_and_sampling_jobs_do():
    """A sampler fix (DDIM's clipped epsilon) must not make every trained model stale: training never samples."""
    for method in ("scratch", "kind", "lora"):
        training = fingerprint.module_closure(fingerprint.step_roots("train", method))
        sampling = fingerprint.module_closure(fingerprint.step_roots("sample", method))
        assert "bench.diffusion.process" in training and "bench.diffusion.sampling" not in training
        assert "bench.diffusion.sampling" in sampling
