"""benchmarks/sampler_steps.py: class accuracy of a finished run's samples per sampler, against the floor's."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from trainrun import REPO, train_tiny_run

NUMBER = r" \| ([\d.]+)"
ROW = re.compile(r"^\| (\S+) \| (\w+) \| (\d+) \| (\S+)" + NUMBER * 5 + r" \|", flags=re.M)


@pytest.fixture(scope="module")
def run_and_reference(tmp_path_factory):
    from bench.data.synthetic import SyntheticImages, synthetic_split
    from bench.metrics.domain_eval import build_domain_reference
    from bench.metrics.networks.domain import load_domain_extractor

    run_dir = train_tiny_run(tmp_path_factory.mktemp("runs"))
    classes = synthetic_split("pretrain")
    ref_dir = tmp_path_factory.mktemp("ref")
    real = SyntheticImages(classes, image_size=16, per_class=2, domain="natural", seed=0, first_index=64)
    build_domain_reference(real.images_uint8(), ref_dir / "reference.npz", load_domain_extractor(None),
                           labels=real.labels, class_ids=classes)
    floor = SyntheticImages(classes, image_size=16, per_class=1, domain="natural", seed=0, first_index=66)
    np.savez(ref_dir / "floor.npz", arr_0=floor.images_uint8(), labels=floor.labels)
    return run_dir, ref_dir / "reference.npz"


def _seed_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"^\| \S+ \| \w+ \| \d+ \| \d ", line)]


def _bench(run_dir, reference, out, *extra):
    args = [sys.executable, "benchmarks/sampler_steps.py", "--run-dir", str(run_dir), "--reference", str(reference),
            "--num-samples", "8", "--out", str(out), *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_one_row_per_batch_and_a_mean_per_setting_and_a_rerun_reuses_the_samples(run_and_reference, tmp_path):
    run_dir, reference = run_and_reference
    out = tmp_path / "steps.md"
    for _ in range(2):
        done = _bench(run_dir, reference, out, "--settings", "ddpm:2,ddim:3", "--seeds", "0,1")
        assert done.returncode == 0, done.stderr[-2000:]
    first, second = out.read_text().split("`python benchmarks/sampler_steps.py")[1:]
    rows = ROW.findall(first)
    assert [(r[1], r[2], r[3]) for r in rows] == [("ddpm", "2", "0"), ("ddpm", "2", "1"), ("ddpm", "2", "**mean**"),
                                                  ("ddim", "3", "0"), ("ddim", "3", "1"), ("ddim", "3", "**mean**")]
    for setting in (rows[:3], rows[3:]):
        for column in (4, 5, 6):  # FID, precision, class accuracy: the mean row is the seeds' mean
            assert abs(float(setting[2][column]) - (float(setting[0][column]) + float(setting[1][column])) / 2) < 0.006
    for r in rows:
        assert float(r[7]) > 0.8  # the ceiling: the classifier knows the held-out real images
        assert abs(float(r[6]) / float(r[7]) - float(r[8])) < 0.002
    # the second call finds each batch's folder (named by every setting) and scores the same samples, untimed
    assert [r[4:7] for r in ROW.findall(second)] == [r[4:7] for r in rows]
    assert all(re.search(r"\| \d+ \|$", line) for line in _seed_rows(first))
    assert all(line.endswith("| reused |") for line in _seed_rows(second))
    assert len(list((run_dir / "samples").iterdir())) == 4


def test_a_malformed_setting_is_a_one_line_error(run_and_reference, tmp_path):
    run_dir, reference = run_and_reference
    done = _bench(run_dir, reference, tmp_path / "steps.md", "--settings", "ddpm:many")
    assert done.returncode != 0
    assert "'ddpm:many' is not sampler:steps" in done.stderr
    assert not (tmp_path / "steps.md").exists()
