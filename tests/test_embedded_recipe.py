"""benchmarks/embedded_recipe.py: a recipe's class accuracy of samples against the classifier's ceiling."""

from __future__ import annotations

import re
import subprocess
import sys

from trainrun import REPO


def test_each_checkpoint_and_guidance_scale_appends_one_row_with_its_ceiling(tmp_path):
    out = tmp_path / "recipe.md"
    args = [sys.executable, "benchmarks/embedded_recipe.py", "--arch", "DiT-T/2", "--steps", "4", "--checkpoints", "2",
            "--cfg", "1,3", "--samples", "16", "--sampling-steps", "2", "--batch", "8", "--out", str(out)]
    for _ in range(2):  # a second run appends below the first, under one header
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text.count("| arch | beta |") == 1
    rows = re.findall(r"^\| DiT-T/2 \| squaredcos_cap_v2 \| 0.005 \| 100 \| 8 \| 64 \| (\d+) \| ([\d.]+) \| "
                      r"([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text, flags=re.M)
    assert [(r[0], r[1]) for r in rows] == [("2", "1"), ("2", "3"), ("4", "1"), ("4", "3")] * 2
    for _, _, acc, ceiling, ratio in rows:
        assert 0 <= float(acc) <= 1 and float(ceiling) > 0.8  # the classifier knows real images of these classes
        assert abs(float(acc) / float(ceiling) - float(ratio)) < 0.006
