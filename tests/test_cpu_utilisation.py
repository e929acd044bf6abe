"""benchmarks/cpu_utilisation.py: the embedded training step's model FLOP/s against a matmul peak of the same run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from trainrun import REPO


def test_the_table_names_a_peak_and_a_utilisation_per_precision(tmp_path):
    out = tmp_path / "cpu.md"
    done = subprocess.run([sys.executable, "benchmarks/cpu_utilisation.py", "--batches", "2", "--steps", "1",
                           "--repeats", "1", "--before", "DiT-T/2@32:2", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    used_peaks = {}
    for precision in ("fp32", "bf16"):
        peak = re.search(rf"\| matmul peak \| {precision} \| 2048³: ([\d.]+) GFLOP/s", text)
        step = re.search(rf"\| training step, batch 2, eager \| {precision} \| ([\d.]+) img/s = ([\d.]+) GFLOP/s"
                         rf"(?: \([\d.]+x before\))? \| ([\d.]+) % \| ([\d.]+) \|", text)
        assert peak and step, text
        images, gflops, percent, used_peak = map(float, step.groups())
        used_peaks[precision] = used_peak
        assert images > 0 and 0 < percent <= 100 and used_peak >= float(peak.group(1))
        # utilisation is the model FLOP/s over that peak, up to the table's rounding of all three numbers
        rounding = 0.05 + 100 * (0.005 / used_peak + gflops * 0.05 / used_peak ** 2)
        assert abs(100 * gflops / used_peak - percent) <= rounding
    # a CPU without bf16 instructions computes bf16 layers in fp32: that is its bound
    assert used_peaks["bf16"] >= used_peaks["fp32"]
    before = re.search(r"\| before: DiT-T/2 at 32 px, batch 2, eager \| fp32 \| [\d.]+ img/s = ([\d.]+) GFLOP/s", text)
    after = re.search(r"\| training step, batch 2, eager \| fp32 \| [\d.]+ img/s = ([\d.]+) GFLOP/s "
                      r"\(([\d.]+)x before\)", text)
    assert before and after, text
    assert abs(float(after.group(1)) / float(before.group(1)) - float(after.group(2))) < 0.06  # the ratio is theirs


@pytest.mark.slow
def test_the_compiled_step_has_its_own_row(tmp_path):
    out = tmp_path / "cpu.md"
    done = subprocess.run([sys.executable, "benchmarks/cpu_utilisation.py", "--batches", "2", "--steps", "1",
                           "--repeats", "1", "--compile", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    timed = re.search(r"\| training step, batch 2, compiled \(torch.compile\) \| fp32 \| ([\d.]+) img/s", text)
    # Inductor compiles C++ with the machine's own toolchain; where that cannot load into torch the row must say so
    # (the failure itself is tested below), so either outcome is a row, never a lost table.
    failed = re.search(r"\| training step, batch 2, compiled \(torch.compile\) \| fp32 \| not measured: "
                       r"torch.compile failed on this machine \(\w+", text)
    assert (timed and float(timed.group(1)) > 0) or failed, text


@pytest.mark.slow
def test_a_compiler_that_fails_gives_a_row_that_says_why(tmp_path):
    out = tmp_path / "cpu.md"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    done = subprocess.run([sys.executable, "benchmarks/cpu_utilisation.py", "--batches", "2", "--steps", "1",
                           "--repeats", "1", "--compile", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| training step, batch 2, eager | fp32 |" in text  # the eager rows are kept
    assert re.search(r"compiled \(torch.compile\) \| fp32 \| not measured: torch.compile failed on this machine "
                     r"\(InvalidCxxCompiler: No working C\+\+ compiler", text), text
