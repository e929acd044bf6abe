"""End to end on random weights: ``kindbench evaluate`` → record (docs/metrics.md §13), recomputed independently;
acceptance."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import DINO_ARCH
from test_metrics_frechet import nuclear_norm_fd  # the FD oracle for N < d

from bench.metrics.acceptance import fixtures
from bench.metrics.cli import main
from bench.metrics.networks.inception import load_inception
from bench.metrics.record import REQUIRED_KEYS
from bench.metrics.sample_io import open_samples
from bench.metrics.scores.frechet import frechet_from_features
from bench.metrics.scores.inception_score import inception_score
from bench.metrics.scores.precision_recall import precision_recall
from bench.metrics.scores.stats import moments_of

INCEPTION = "inception/pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, weights_dir):
    """A private weights dir (links to the session's random weights) and tiny batches."""
    root = tmp_path_factory.mktemp("eval")
    wd = root / "weights"
    for rel in (INCEPTION, "dinov2/dinov2_vits14_pretrain.pth"):
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(weights_dir / rel, wd / rel)
    ref = fixtures.write_synthetic_adm_reference(root / "VIRTUAL_tiny.npz", wd / INCEPTION, n=12, size=32, seed=1)
    fdd_ref = root / "fdd_tiny.npz"
    fixtures.write_synthetic_fdd_reference(fdd_ref, wd / "dinov2/dinov2_vits14_pretrain.pth", DINO_ARCH, n=12, size=32)
    samples = fixtures.write_synthetic_samples(root / "samples.npz", n=10, size=32, seed=2, shift=0.4)
    return {"root": root, "wd": wd, "ref": ref, "fdd_ref": fdd_ref, "samples": samples}


@pytest.fixture(scope="module")
def record(setup):
    out = setup["root"] / "record.json"
    argv = ["evaluate", str(setup["samples"]), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"]),
            "--fdd", "on", "--fdd-ref", str(setup["fdd_ref"]), "--fdd-arch", DINO_ARCH,
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
    for key in ("fid", "sfid", "is", "precision", "recall", "fdd"):
        assert isinstance(record[key], float) and np.isfinite(record[key]), key
        assert record["metrics"][key]["value"] == record[key]
    assert record["metrics"]["fid"]["higher_is_better"] is False and record["metrics"]["is"]["higher_is_better"]
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
    # N < d on both sides: an independent FD from the features, tr √(ΣxΣy) = ‖Xc Ycᵀ‖_* / √((n−1)(m−1))
    for key, x, y in (("fid", samples.pool, ref.pool), ("sfid", samples.spatial, ref.spatial)):
        assert record[key] == pytest.approx(nuclear_norm_fd(x.double().numpy(), y.double().numpy()), rel=1e-5), key
    assert record["is"] == pytest.approx(inception_score(samples.logits_unbiased.numpy()).value, rel=1e-6)
    pr = precision_recall(ref.pool, samples.pool)
    assert (record["counts"]["precision"], record["counts"]["recall"]) == (pr.n_precision, pr.n_recall)


def test_cleanfid_plumbing(setup, tmp_path):
    """clean-fid's own model wrapper, resizer, FID and KID on a TorchScript stand-in with our random weights."""
    from bench.metrics.scores import cleanfid_extras as cx

    standin = fixtures.write_cleanfid_standin(setup["wd"] / INCEPTION, tmp_path / "inception-2015-12-05.pt")
    model = cx.load_cleanfid_inception(standin.parent, "cpu")
    feats = cx.clean_features(model, open_samples(setup["samples"]), batch_size=3, limit=4)
    assert feats.shape == (4, 2048) and np.isfinite(feats).all()
    with torch.no_grad():  # 'clean' = PIL bicubic to 299 outside the network, then the same trunk
        from cleanfid.resize import build_resizer

        resized = np.stack([build_resizer("clean")(im) for im in open_samples(setup["samples"]).read(0, 4)])
        direct = load_inception(setup["wd"] / INCEPTION).trunk((torch.from_numpy(resized).permute(0, 3, 1, 2)
                                                                 - 128) / 128)[0]
    assert np.max(np.abs(feats - direct.numpy())) <= 1e-4 * np.max(np.abs(feats))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16)) + 0.5
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    first = cx.clean_fid_and_kid(a, b, kid_subsets=5, kid_subset_size=100)
    assert first["clean_fid"] == pytest.approx(frechet_from_features(a, b).value, rel=1e-8)
    assert cx.clean_fid_and_kid(a, b, kid_subsets=5, kid_subset_size=100)["kid"] == first["kid"]  # seeded
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's global RNG is left alone


@pytest.mark.slow
def test_clean_fid_columns_end_to_end(setup, tmp_path):
    from cleanfid import fid as cfid

    from bench.metrics.scores import cleanfid_extras as cx

    wd = setup["wd"]
    if not (wd / "inception/inception-2015-12-05.pt").exists():
        fixtures.write_cleanfid_standin(wd / INCEPTION, wd / "inception/inception-2015-12-05.pt")
    out = tmp_path / "clean.json"
    assert main(["evaluate", str(setup["samples"]), "--ref", str(setup["ref"]), "--weights-dir", str(wd),
                 "--fdd", "off", "--extras", "clean-fid", "--batch-size", "4", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["clean_fid_details"]["errors"] == {} and rec["metric_names"]["kid"] == "KID-10"
    model = cx.load_cleanfid_inception(wd / "inception", "cpu")
    fs = cx.clean_features(model, open_samples(setup["samples"]), batch_size=4)
    fr = cx.clean_features(model, open_samples(setup["ref"]), batch_size=4)
    assert rec["clean_fid"] == pytest.approx(float(cfid.fid_from_feats(fs, fr)), rel=1e-6)
    assert rec["kid"] == pytest.approx(cx.clean_fid_and_kid(fs, fr)["kid"], rel=1e-6)


def test_records_are_immutable(setup, record, capsys):
    argv = ["evaluate", str(setup["samples"]), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"]),
            "--fdd", "off", "--out", str(setup["root"] / "record.json")]
    before = (setup["root"] / "record.json").read_bytes()
    assert main(argv) == 2  # refused up front, before any feature extraction
    assert "record already exists" in capsys.readouterr().err
    assert (setup["root"] / "record.json").read_bytes() == before


def test_sorted_labels_refused_before_extraction(setup, tmp_path, capsys):
    samples = tmp_path / "sorted.npz"
    images = open_samples(setup["samples"]).read(0, 10)
    np.savez(samples, arr_0=images, labels=np.repeat(np.arange(5), 2))
    assert main(["evaluate", str(samples), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"]),
                 "--fdd", "off", "--is-split-size", "4"]) == 2
    assert "sorted by class" in capsys.readouterr().err


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


def test_samples_of_another_resolution_than_the_reference_are_refused(setup, capsys):
    samples = fixtures.write_synthetic_samples(setup["root"] / "samples_48.npz", n=10, size=48, seed=2)
    argv = ["evaluate", str(samples), "--ref", str(setup["ref"]), "--weights-dir", str(setup["wd"]), "--fdd", "off",
            "--batch-size", "4", "--out", str(setup["root"] / "mismatch.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "samples are (48, 48, 3) but the reference images are (32, 32, 3)" in err[-1]
    assert not (setup["root"] / "mismatch.json").exists()


def test_a_suite_evaluation_names_every_protocol_field_its_job_record_needs(record):
    """The evaluate step turns this record into a job record whose protocol the store validates: sample count,
    extractor and its weights' sha256 must be there (an ImageNet suite's evaluation could not be written before)."""
    from bench.pipeline.steps.scoring import INCEPTION_EXTRACTOR, inception_protocol
    from bench.records.store import REQUIRED

    protocol = inception_protocol(record)
    own = {"reference_id", "reference_sha256", "cfg_scale", "sampler", "num_steps", "clip_denoised"}  # the step's
    assert set(REQUIRED["protocol"]) - own <= set(protocol)
    assert protocol["n_samples"] == 10 and protocol["extractor"] == INCEPTION_EXTRACTOR
    assert protocol["extractor_sha256"] == record["weights"]["inception_sha256"]
    assert len(protocol["extractor_sha256"]) == 64
    assert protocol["fdd_extractor_sha256"] == record["weights"]["dinov2_sha256"]
