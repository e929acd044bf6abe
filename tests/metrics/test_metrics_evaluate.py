"""End to end on random weights: ``kindbench evaluate`` → record (§8.13), recomputed independently; acceptance plumbing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from bench.metrics import fixtures
from bench.metrics.cli import main
from bench.metrics.frechet import frechet_distance
from bench.metrics.inception_score import inception_score
from bench.metrics.precision_recall import precision_recall
from bench.metrics.record import REQUIRED_KEYS
from bench.metrics.references import load_reference
from bench.metrics.sample_io import open_samples
from bench.metrics.stats import moments_of

from conftest import DINO_ARCH

INCEPTION = "inception/pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, weights_dir):
    """A private weights dir (links to the session's random weights + a clean-fid stand-in) and tiny batches."""
    root = tmp_path_factory.mktemp("eval")
    wd = root / "weights"
    for rel in (INCEPTION, "dinov2/dinov2_vits14_pretrain.pth"):
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(weights_dir / rel, wd / rel)
    fixtures.write_cleanfid_standin(wd / INCEPTION, wd / "inception/inception-2015-12-05.pt")
    ref = fixtures.write_synthetic_adm_reference(root / "VIRTUAL_tiny.npz", wd / INCEPTION, n=12, size=32, seed=1)
    fdd_ref = root / "fdd_tiny.npz"
    fixtures.write_synthetic_fdd_reference(fdd_ref, wd / "dinov2/dinov2_vits14_pretrain.pth", DINO_ARCH, n=12, size=32)
    samples = fixtures.write_synthetic_samples(root / "samples.npz", n=10, size=32, seed=2, shift=0.4)
    return {"root": root, "wd": wd, "ref": ref, "fdd_ref": fdd_ref, "samples": samples}


@pytest.fixture(scope="module")
def record(setup):
    out = setup["root"] / "record.json"
    argv = ["evaluate", str(setup["samples"]), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"]),
            "--fdd", "on", "--fdd-ref", str(setup["fdd_ref"]), "--fdd-arch", DINO_ARCH, "--extras", "clean-fid",
            "--batch-size", "4", "--out", str(out), "--save-stats", str(setup["root"] / "stats.npz")]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def direct_features(setup, inception_model):
    """Features computed here, straight from the network, for independent recomputation of every metric."""
    with torch.no_grad():
        samples = inception_model(torch.from_numpy(open_samples(setup["samples"]).read(0, 10)))
        ref = inception_model(torch.from_numpy(open_samples(setup["ref"]).read(0, 12)))
    return samples, ref


def test_record_has_every_protocol_field(record):
    assert all(k in record for k in REQUIRED_KEYS)
    for key in ("fid", "sfid", "is", "precision", "recall", "fdd", "clean_fid", "kid"):
        assert isinstance(record[key], float) and np.isfinite(record[key]), key
    assert record["metric_names"]["fid"] == "FID-10" and record["n_samples"] == 10 and record["n_ref_pr"] == 12
    assert record["protocol"] | {"inception_resize": "tf1_bilinear", "fdd_resize": "pil_bicubic_uint8",
                                 "pos_embed": "dinov2_offset0.1", "pr_distance": "fp32", "is_split_size": 5000,
                                 "is_shuffle_seed": None, "class_sampling": "random"} == record["protocol"]
    assert record["weights"]["inception"]["official"] is False  # random weights never pass as the real ones
    assert len(record["weights"]["inception_sha256"]) == 64 and len(record["weights"]["dinov2_sha256"]) == 64
    assert record["reference"]["fdd_ref_n"] == 12 and len(record["reference"]["adm_npz_sha256"]) == 64
    assert record["env"]["world_size"] == 1 and record["env"]["tf32_disabled"] is True
    diag = record["diagnostics"]
    assert diag["n_vs_d_ok"] == {"pool": False, "spatial": False, "dinov2": False}  # 10 samples < d
    assert diag["duplicates_found"] == 0 and diag["ref_pool_origin"] == "extracted from reference arr_0"
    assert set(diag["min_eig_sigma"]) == {"pool", "spatial", "dinov2"}


def test_metrics_match_independent_recomputation(setup, record, direct_features):
    samples, ref = direct_features
    stats = np.load(setup["root"] / "stats.npz")
    direct = moments_of(samples.pool.numpy())
    assert int(stats["n"]) == 10
    assert np.max(np.abs(stats["sigma"] - direct.sigma)) <= 1e-5 * np.max(np.abs(direct.sigma))
    adm = load_reference(setup["ref"]).moments
    assert record["fid"] == frechet_distance(stats["mu"], stats["sigma"], adm["pool"].mu, adm["pool"].sigma).value
    assert record["sfid"] == frechet_distance(stats["mu_s"], stats["sigma_s"], adm["spatial"].mu,
                                              adm["spatial"].sigma).value
    assert record["is"] == pytest.approx(inception_score(samples.logits_unbiased.numpy()).value, rel=1e-6)
    pr = precision_recall(ref.pool, samples.pool)
    assert (record["counts"]["precision"], record["counts"]["recall"]) == (pr.n_precision, pr.n_recall)


def test_clean_fid_columns_come_from_cleanfid(setup, record):
    from cleanfid import fid as cfid

    from bench.metrics import cleanfid_extras as cx

    assert record["clean_fid_details"]["errors"] == {} and record["metric_names"]["kid"] == "KID-10"
    model = cx.load_cleanfid_inception(setup["wd"] / "inception", "cpu")
    fs = cx.clean_features(model, open_samples(setup["samples"]), batch_size=4)
    fr = cx.clean_features(model, open_samples(setup["ref"]), batch_size=4)
    assert record["clean_fid"] == pytest.approx(float(cfid.fid_from_feats(fs, fr)), rel=1e-6)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    again = cx.clean_fid_and_kid(fs, fr)
    assert again["kid"] == pytest.approx(record["kid"], rel=1e-6)  # seeded subsets: reproducible
    assert np.array_equal(np.random.get_state()[1], state)  # and the caller's RNG is left alone


def test_records_are_immutable(setup, record, capsys):
    argv = ["evaluate", str(setup["samples"]), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"]),
            "--fdd", "off", "--out", str(setup["root"] / "record.json")]
    assert main(argv) == 2
    assert "record already exists" in capsys.readouterr().err


def test_evaluate_input_errors(setup, tmp_path, capsys):
    bad = tmp_path / "float.npz"
    np.savez(bad, arr_0=np.zeros((4, 32, 32, 3), np.float32))
    assert main(["evaluate", str(bad), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"])]) == 2
    assert "must be uint8" in capsys.readouterr().err
    np.savez(tmp_path / "notref.npz", x=np.zeros(3))
    assert main(["evaluate", str(setup["samples"]), "--ref", str(tmp_path / "notref.npz"),
                 "--weights-dir", str(setup["wd"])]) == 2
    assert "no reference statistics" in capsys.readouterr().err


def test_a3_fdd_parity_plumbing(setup, tmp_path):
    assert main(["acceptance", "a3", "--samples", str(setup["samples"]), "--weights-dir", str(setup["wd"]),
                 "--fdd-arch", DINO_ARCH, "--n", "6", "--fdd-ref", str(setup["fdd_ref"]),
                 "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "a3_report.json").read_text())
    variants = report["variants"]
    assert variants["ours"]["max_abs_err"] == 0.0 and variants["ours"]["delta_fdd"] == 0.0
    assert variants["timm_pos_embed"]["max_abs_err"] > 0 and variants["torch_antialias_resize"]["max_abs_err"] > 0
    assert report["hub_compared"] is False and report["n"] == 6


@pytest.mark.slow
def test_a1_plumbing_and_fp16_pr(setup, tmp_path, capsys):
    assert main(["acceptance", "a1", "--samples", str(setup["samples"]), "--ref", str(setup["ref"]),
                 "--weights-dir", str(setup["wd"]), "--plumbing", "--batch-size", "4",
                 "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "a1_report.json").read_text())
    assert [r["metric"] for r in report["rows"]] == ["fid", "sfid", "is", "precision", "recall"]
    assert report["pass"] is False and report["weights_official"] is False  # random weights cannot pass A1
    assert 0 <= report["pr_adm_fp16"]["precision"] <= 1
    assert "FAIL" in capsys.readouterr().out
    # without --plumbing the same run fails loudly
    assert main(["acceptance", "a1", "--samples", str(setup["samples"]), "--ref", str(setup["ref"]),
                 "--weights-dir", str(setup["wd"]), "--no-fp16-pr", "--batch-size", "4",
                 "--out-dir", str(tmp_path)]) == 1


@pytest.mark.slow
def test_png_folder_gives_the_same_record(setup, record, tmp_path):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(open_samples(setup["samples"]).read(0, 10)):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    out = tmp_path / "png.json"
    assert main(["evaluate", str(folder), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"]),
                 "--fdd", "off", "--batch-size", "4", "--out", str(out)]) == 0
    png = json.loads(out.read_text())
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert png[key] == record[key], key
