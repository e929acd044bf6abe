"""benchmarks/sample_batch.py: seconds per image at each sampling batch, and the same images at every batch."""

from __future__ import annotations

import re
import subprocess
import sys

from trainrun import REPO


def test_every_batch_has_a_row_a_ratio_and_the_reference_batchs_images(tmp_path):
    out = tmp_path / "batch.md"
    done = subprocess.run([sys.executable, "benchmarks/sample_batch.py", "--batches", "3,8", "--reference", "8",
                           "--samples", "8", "--steps", "2", "--rounds", "1", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = re.compile(r"^\| (\d+)(?: \(reference\))? \| ([\d.]+) \| [\d.]+ - [\d.]+ \| \*\*([\d.]+)x\*\* \| "
                     r"([\d.e+-]+) \|$", re.M)
    rows = {int(m.group(1)): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in row.finditer(out.read_text())}
    assert sorted(rows) == [3, 8], out.read_text()
    assert rows[8][1] == 1.0 and rows[3][0] > 0 and rows[3][1] > 0
    # each sample's noise comes from its own generator: a batch of 3 draws the reference batch's images
    assert rows[3][2] < 1e-4 and rows[8][2] == 0
