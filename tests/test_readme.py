"""The README's test command is what CI runs (the developers' guide requires .ci/run to call it)."""

import re

from trainrun import REPO


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)
    commands = [b.strip() for b in blocks if "pytest" in b]
    assert commands, "the README quick start must show the test command"
    return commands[0]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert _readme_test_command() in ci_lines


def test_ci_installs_with_the_torch_pins():
    pins = (REPO / ".ci/constraints.txt").read_text()
    assert re.search(r"^torch==\S+$", pins, flags=re.M) and re.search(r"^torchvision==\S+$", pins, flags=re.M)
    assert "-c .ci/constraints.txt" in _readme_test_command()
