"""benchmarks/gelu.py: both GELU forms timed in one run, as ratios, and how far apart they are."""

from __future__ import annotations

import re
import subprocess
import sys

from trainrun import REPO


def test_the_gelu_benchmark_times_both_forms_and_bounds_their_difference(tmp_path):
    out = tmp_path / "gelu.md"
    subprocess.run([sys.executable, "benchmarks/gelu.py", "--arch", "DiT-T/2-d2", "--input-size", "8",
                    "--train-batches", "4", "--sample-batch", "4", "--rounds", "2", "--steps", "1", "--warmup", "1",
                    "--out", str(out)], cwd=REPO, check=True, capture_output=True, text=True)
    text = out.read_text()
    difference = float(re.search(r"Largest \|exact - tanh\| over N\(0, 9\) inputs: (\d\.\d+e[+-]\d+)", text).group(1))
    assert 1e-5 < difference < 1e-3  # they differ, by less than a model at these sizes resolves
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)x\*\*", text, flags=re.M)
    assert [row[0].split(",")[0] for row in rows] == ["GELU op", "GELU op", "DiT-T/2-d2 training step",
                                                      "DiT-T/2-d2 guided sampling forward"]
    for _, tanh_ms, exact_ms, ratio in rows:
        assert float(tanh_ms) > 0 and float(exact_ms) > 0 and float(ratio) > 0
