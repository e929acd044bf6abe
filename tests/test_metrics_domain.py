"""The synthetic suite's domain feature extractor and the metrics computed in its space
(bench.metrics.networks.domain*).

The module fixture trains the real extractor once (default recipe) into a temporary cache; the cache, corruption
and determinism tests use a reduced recipe that trains in a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data.synthetic import SyntheticImages
from bench.metrics import domain_eval
from bench.metrics.domain_eval import build_domain_reference, evaluate_domain
from bench.metrics.networks import domain as dm
from bench.metrics.sample_io import write_samples_npz
from bench.metrics.scores.frechet import frechet_distance
from bench.metrics.scores.precision_recall import precision_hits, precision_recall_bruteforce
from bench.metrics.scores.stats import moments_of
from bench.records.hashing import file_sha256

REPO = Path(__file__).resolve().parents[1]
TINY = dm.DomainRecipe(train_per_class=((16, 2),), holdout_per_class=((16, 1),), epochs=1, batch_size=32)
SAMPLING = {"cfg_scale": 1.5, "sampler": "ddim", "num_steps": 25, "clip_denoised": False}
SIZE = 16  # the tiny suite's resolution


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return dm.load_domain_extractor(tmp_path_factory.mktemp("extractors"))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny-extractors")
    dm.load_domain_extractor(cache, recipe=TINY)
    return cache


def _render(classes=None, per_class=8, first_index=200, domain="natural") -> np.ndarray:
    return SyntheticImages(classes, image_size=SIZE, per_class=per_class, first_index=first_index,
                           domain=domain).images_uint8()


@pytest.fixture(scope="module")
def scored(extractor, tmp_path_factory):
    """Reference of 512 real images; records of several sample sets scored against it."""
    root = tmp_path_factory.mktemp("domain-eval")
    ref_images = _render(first_index=100)
    ref_info = build_domain_reference(ref_images, root / "ref.npz", extractor,
                                      meta={"task": "all", "domain": "natural"})
    sets = {
        "heldout": _render(),
        "self": ref_images,
        "sketch": _render(domain="sketch"),
        "noise": np.random.default_rng(0).integers(0, 256, (512, SIZE, SIZE, 3), dtype=np.uint8),
        "one_class": _render([5], per_class=256),
    }
    records = {}
    for name, images in sets.items():
        path = write_samples_npz(root / f"{name}.npz", [images], len(images))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # N vs d warnings are not under test here
            records[name] = evaluate_domain(path, root / "ref.npz", extractor, protocol=dict(SAMPLING),
                                            out=root / f"{name}.eval.json")
    return {"root": root, "ref_info": ref_info, "records": records}


# --------------------------------------------------------------------------------------------------------------------
# The trained extractor
# --------------------------------------------------------------------------------------------------------------------


def test_heldout_accuracy_far_above_chance(extractor):
    # measured 0.91 overall (natural 0.96, sketch 0.84, xray 0.93; 16 px 0.82); chance is 1/64
    assert extractor.accuracy > 0.8
    for domain in ("natural", "sketch", "xray"):
        assert extractor.accuracy_by[f"domain={domain}"] > 0.7
    for size in (16, 32, 64):
        assert extractor.accuracy_by[f"size={size}"] > 0.7


def test_extractor_identity(extractor):
    assert extractor.name == "kindbench-synthetic-cnn-v1"
    assert extractor.sha256 == file_sha256(extractor.path)
    assert extractor.path.name.startswith("kindbench-synthetic-cnn-v1-")
    assert extractor.feature_dim == 128 and extractor.num_classes == 64
    params = sum(p.numel() for p in extractor.model.parameters())
    assert 50_000 < params < 500_000
    assert extractor.metadata["torch"] == torch.__version__
    assert extractor.train_info["train_wall_s"] > 0


def test_features_shapes_and_batch_independence(extractor):
    images = _render(per_class=2)
    feats, logits = extractor.features(images)
    assert feats.shape == (128, 128) and logits.shape == (128, 64)
    assert feats.dtype == np.float64 and logits.dtype == np.float64
    feats7, logits7 = extractor.features(images, batch_size=7)
    np.testing.assert_allclose(feats7, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits7, logits, rtol=1e-5, atol=1e-5)


def test_classifies_fresh_images_at_every_suite_resolution(extractor):
    labels = np.repeat(np.arange(64), 2)
    for size in (16, 32, 64):
        images = SyntheticImages(None, image_size=size, per_class=2, first_index=300).images_uint8()
        _, logits = extractor.features(images)
        assert (logits.argmax(1) == labels).mean() > 0.75, size


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((2, 16, 16, 3), np.float32), ValueError, "uint8"),
    (np.zeros((2, 3, 16, 16), np.uint8), ValueError, "NHWC"),
    (np.zeros((2, 16, 12, 3), np.uint8), ValueError, "square"),
    (np.zeros((2, 4, 4, 3), np.uint8), ValueError, "at least 8"),
    (np.zeros((0, 16, 16, 3), np.uint8), ValueError, "empty"),
    ([[0]], TypeError, "numpy array"),
])
def test_bad_input_is_a_clear_error(extractor, bad, error, match):
    with pytest.raises(error, match=match):
        extractor.features(bad)


# --------------------------------------------------------------------------------------------------------------------
# Metrics in the extractor's space
# --------------------------------------------------------------------------------------------------------------------


def test_fid_separates_real_shifted_and_noise(scored):
    fid = {name: rec["fid"] for name, rec in scored["records"].items()}
    # measured at 16 px: held-out 0.7, sketch 50, one class 113, noise 207
    assert abs(fid["self"]) < 1e-6
    assert fid["heldout"] < 3.0
    assert fid["sketch"] > 10 * fid["heldout"]
    assert fid["noise"] > 10 * fid["heldout"]
    assert fid["noise"] > fid["sketch"]


def test_inception_score_semantics(scored):
    is_ = {name: rec["is"] for name, rec in scored["records"].items()}
    # measured: real 29, one class 1.13, noise 1.5
    assert is_["one_class"] < 1.5
    assert is_["heldout"] > 10 * is_["one_class"]
    rec = scored["records"]["heldout"]
    assert rec["protocol"]["is_num_splits"] == 1 and "single split" in rec["protocol"]["is_note"]


def test_precision_recall(scored):
    recs = scored["records"]
    # measured: held-out 0.94 / 0.92, noise 0 / 0, one class 0.95 / 0.016
    assert recs["self"]["precision"] == 1.0 and recs["self"]["recall"] == 1.0
    assert recs["heldout"]["precision"] > 0.8 and recs["heldout"]["recall"] > 0.8
    assert recs["noise"]["precision"] < 0.02 and recs["noise"]["recall"] < 0.02
    assert recs["one_class"]["precision"] > 0.8 and recs["one_class"]["recall"] < 0.1


def test_reference_file_and_provenance(scored, extractor):
    info = scored["ref_info"]
    assert info["sha256"] == file_sha256(info["path"])
    assert info["n"] == info["n_pr"] == 512 and info["image_size"] == SIZE
    assert info["extractor"] == extractor.name and info["extractor_sha256"] == extractor.sha256
    assert info["reference_id"].startswith("images-")
    with np.load(info["path"]) as data:
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (128, 128)
        assert data["ref_pool"].shape == (512, 128)
        prov = json.loads(str(data["provenance"]))
    assert prov["source"] == {"task": "all", "domain": "natural"} and prov["space"] == "domain"


def test_pr_reference_is_capped_with_a_seeded_subset(extractor, tmp_path):
    images = _render(per_class=1)
    with pytest.warns(UserWarning, match="rank-deficient"):  # 64 images in a 128-d space
        info = build_domain_reference(images, tmp_path / "ref.npz", extractor, meta={"reference_id": "tiny-ref"},
                                      max_pr_features=20)
    assert info["n"] == 64 and info["n_pr"] == 20 and info["reference_id"] == "tiny-ref"
    assert "seeded_random" in info["provenance"]["pr_subset"]


def test_record_shape_matches_the_run_record(scored, extractor):
    from bench.records.store import REQUIRED

    rec = scored["records"]["heldout"]
    assert set(rec["metrics"]) == {"fid", "is", "precision", "recall"}
    assert {m: v["higher_is_better"] for m, v in rec["metrics"].items()} == {
        "fid": False, "is": True, "precision": True, "recall": True}
    assert rec["metrics"]["fid"]["value"] == rec["fid"]
    proto = rec["protocol"]
    assert set(REQUIRED["protocol"]) <= set(proto)
    assert proto["extractor"] == "kindbench-synthetic-cnn-v1" and proto["extractor_sha256"] == extractor.sha256
    assert proto["reference_sha256"] == scored["ref_info"]["sha256"]
    assert proto["reference_id"] == scored["ref_info"]["reference_id"]
    assert proto["n_samples"] == 512 and proto["cfg_scale"] == 1.5 and proto["resize"] == dm.RESIZE_RULE
    assert rec["env"]["torch"] == torch.__version__
    written = json.loads((scored["root"] / "heldout.eval.json").read_text())
    assert written["metrics"] == rec["metrics"] and written["protocol"] == proto


def test_eval_info_passes_the_store_validation(scored):
    from bench.records.store import metric, new_record, new_run_info

    rec = scored["records"]["heldout"]
    info = new_run_info(job_id="kind--novel-a--DiT-T-2--s0--3f9a1c2e--evaluate", run_id="kind--novel-a--DiT-T-2--s0",
                        step="evaluate", suite="tiny", benchmark="novel-a--DiT-T-2", task="novel-a", arch="DiT-T/2",
                        method="kind", family="learngene", variant="default", seed=0, config={},
                        config_hash="3f9a1c2e", git={"git_sha": "0" * 40, "git_dirty": False})
    eval_info = {"metrics": {k: metric(m["value"], m["higher_is_better"]) for k, m in rec["metrics"].items()},
                 "protocol": rec["protocol"]}
    new_record(info, eval_info=eval_info, meta_info={})  # raises if the block does not follow the schema


def test_records_are_not_overwritten(scored, extractor):
    root = scored["root"]
    with pytest.raises(FileExistsError, match="already exists"):
        evaluate_domain(root / "heldout.npz", root / "ref.npz", extractor, protocol=dict(SAMPLING),
                        out=root / "heldout.eval.json")


def test_protocol_fields_of_the_evaluator_cannot_be_passed(scored, extractor):
    root = scored["root"]
    with pytest.raises(ValueError, match="extractor"):
        evaluate_domain(root / "heldout.npz", root / "ref.npz", extractor, protocol={"extractor": "inception"})


def test_reference_of_other_weights_or_size_is_refused(scored, extractor, tiny_cache, tmp_path):
    root = scored["root"]
    other = dm.load_domain_extractor(tiny_cache, recipe=TINY, train_if_missing=False)
    with pytest.raises(ValueError, match="rebuild the reference"):
        evaluate_domain(root / "heldout.npz", root / "ref.npz", other, protocol=dict(SAMPLING))
    big = SyntheticImages([0, 1], image_size=32, per_class=4).images_uint8()
    path = write_samples_npz(tmp_path / "big.npz", [big], len(big))
    with pytest.raises(ValueError, match="resolution"):
        evaluate_domain(path, root / "ref.npz", extractor, protocol=dict(SAMPLING))


# --------------------------------------------------------------------------------------------------------------------
# Cache, determinism, corruption, concurrency (reduced recipe)
# --------------------------------------------------------------------------------------------------------------------


def test_training_is_deterministic_and_leaves_the_caller_state_alone(tiny_cache, tmp_path):
    first = dm.load_domain_extractor(tiny_cache, recipe=TINY, train_if_missing=False)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    second = dm.load_domain_extractor(tmp_path, recipe=TINY)
    assert torch.equal(torch.rand(3), expected_draw)  # training forked the RNG
    assert torch.get_num_threads() == threads
    assert second.sha256 == first.sha256


@pytest.mark.slow
def test_default_recipe_is_deterministic(extractor, tmp_path):
    assert dm.load_domain_extractor(tmp_path).sha256 == extractor.sha256


def test_cache_hit_does_not_retrain(extractor, monkeypatch):
    def fail(recipe):
        raise AssertionError("cache hit must not retrain")

    monkeypatch.setattr(dm, "train_domain_cnn", fail)
    again = dm.load_domain_extractor(extractor.path.parent)
    assert again.sha256 == extractor.sha256


def test_cache_miss_without_training_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        dm.load_domain_extractor(tmp_path, recipe=TINY, train_if_missing=False)


def test_cache_key_covers_the_recipe_but_not_the_torch_version(monkeypatch):
    key = dm.cache_key(TINY)
    assert dm.cache_key(dm.DomainRecipe(train_per_class=((16, 2),), holdout_per_class=((16, 1),), epochs=2,
                                        batch_size=32)) != key
    assert dm.cache_key(dm.DomainRecipe()) != key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert dm.cache_key(TINY) == key


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("KINDBENCH_CACHE_DIR", str(tmp_path / "env"))
    assert dm.resolve_cache_dir() == tmp_path / "env" / "extractors"
    assert dm.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("KINDBENCH_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.resolve_cache_dir() == tmp_path / "home" / ".cache" / "kindbench" / "extractors"


def _corrupt_copy(tiny_cache: Path, dst: Path, how: str) -> Path:
    src = dm.cache_path(tiny_cache, TINY)
    path = dst / src.name
    data = bytearray(src.read_bytes())
    if how == "flip":
        data[-100] ^= 0xFF  # inside the last tensor's bytes
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_cache_is_an_error_without_training(tiny_cache, tmp_path, how):
    _corrupt_copy(tiny_cache, tmp_path, how)
    with pytest.raises(dm.CorruptExtractorError, match="cached domain extractor"):
        dm.load_domain_extractor(tmp_path, recipe=TINY, train_if_missing=False)


def test_corrupt_cache_is_retrained(tiny_cache, tmp_path):
    good = dm.load_domain_extractor(tiny_cache, recipe=TINY, train_if_missing=False)
    path = _corrupt_copy(tiny_cache, tmp_path, "flip")
    with pytest.warns(UserWarning, match="retraining"):
        fixed = dm.load_domain_extractor(tmp_path, recipe=TINY)
    assert fixed.path == path and fixed.sha256 == good.sha256


def test_concurrent_processes_share_one_intact_cache_file(tmp_path):
    code = ("import sys; from bench.metrics.networks import domain as dm; from tests_recipe import TINY; "
            "print(dm.load_domain_extractor(sys.argv[1], recipe=TINY).sha256)")
    (tmp_path / "tests_recipe.py").write_text(
        "from bench.metrics.networks.domain import DomainRecipe\n"
        "TINY = DomainRecipe(train_per_class=((16, 2),), holdout_per_class=((16, 1),), epochs=1, batch_size=32)\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    shas = {out.strip() for out, _ in outs}
    files = sorted(p.name for p in cache.iterdir())
    assert len(shas) == 1 and shas == {file_sha256(dm.cache_path(cache, TINY))}
    assert [f for f in files if f.endswith(".safetensors")] == [dm.cache_path(cache, TINY).name]
    assert not [f for f in files if ".tmp" in f]


def test_warm_cache_entry_point(extractor, capsys, tmp_path):
    dm.main(["--cache-dir", str(extractor.path.parent), "--no-train"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == extractor.name and shown["sha256"] == extractor.sha256
    with pytest.raises(FileNotFoundError, match="not cached"):
        dm.main(["--cache-dir", str(tmp_path), "--no-train"])


# --------------------------------------------------------------------------------------------------------------------
# Class-conditional accuracy and intervals over samples
# --------------------------------------------------------------------------------------------------------------------


def test_class_hits_restricts_the_logits_to_the_tasks_classes():
    # three extractor classes; the task uses extractor classes 2 and 0 as its labels 0 and 1
    logits = np.array([[0.0, 9.0, 1.0],    # class 1 is outside the task: label 0 (class 2) beats label 1 (class 0)
                       [3.0, 0.0, 1.0],    # class 0 -> label 1
                       [0.0, 0.0, 5.0]])   # class 2 -> label 0
    hits = domain_eval.class_hits(logits, np.array([0, 1, 1]), [2, 0])
    assert hits.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="labels must lie"):
        domain_eval.class_hits(logits, np.array([0, 2, 1]), [2, 0])
    with pytest.raises(ValueError, match="one label per image"):
        domain_eval.class_hits(logits, np.array([0, 1]), [2, 0])


def test_class_accuracy_of_real_samples_matches_the_references_ceiling_and_shuffled_labels_fall_to_chance(
        extractor, tmp_path):
    classes = [3, 17, 40, 58]
    ref = SyntheticImages(classes, image_size=SIZE, per_class=32, first_index=100)
    build_domain_reference(ref.images_uint8(), tmp_path / "ref.npz", extractor, labels=ref.labels, class_ids=classes)
    held = SyntheticImages(classes, image_size=SIZE, per_class=64, first_index=300)
    scores = {}
    for name, labels in (("true", held.labels), ("shuffled", np.random.default_rng(0).permutation(held.labels))):
        path = tmp_path / name / "samples.npz"
        path.parent.mkdir()
        write_samples_npz(path, [held.images_uint8()], len(held))
        np.save(path.parent / "labels.npy", labels)  # where the sampler writes them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores[name] = evaluate_domain(path, tmp_path / "ref.npz", extractor, protocol=dict(SAMPLING))
    true, shuffled = scores["true"], scores["shuffled"]
    assert true["class_acc_real"] > 0.85  # 4 easy classes
    assert abs(true["class_acc"] - true["class_acc_real"]) < 0.1
    assert shuffled["class_acc"] < 0.45  # chance is 0.25
    assert true["metrics"]["class_acc"]["higher_is_better"] is True
    for record in (true, shuffled):
        for name in ("class_acc", "precision"):
            low, high = record["sample_intervals"][name]
            assert low <= record[name] <= high
    low, high = shuffled["sample_intervals"]["class_acc"]
    assert high - low > 0.05  # 256 samples at about 25 %: a few points either side
    fid_low, fid_high = true["sample_intervals"]["fid"]
    assert fid_low < fid_high


def test_no_class_accuracy_without_labels_or_class_ids(scored):
    record = scored["records"]["heldout"]  # a reference without class ids, samples without labels
    assert "class_acc" not in record["metrics"] and record["class_acc_real"] is None
    assert set(record["sample_intervals"]) >= {"fid", "precision", "method", "level"}


def test_sample_intervals_are_seeded_and_narrow_with_more_samples(extractor):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(400, 8))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    widths = []
    for n in (50, 800):
        feats = rng.normal(size=(n, 8))
        hits = rng.random(n) < 0.7
        m = moments_of(feats)
        fid = frechet_distance(m.mu, m.sigma, mu, sigma).value
        a = domain_eval.sample_intervals(feats, fid, mu, sigma, {"class_acc": hits}, n_boot=100)
        assert a == domain_eval.sample_intervals(feats, fid, mu, sigma, {"class_acc": hits}, n_boot=100)
        assert a["class_acc"][0] < hits.mean() < a["class_acc"][1]
        assert a["fid"][0] < fid < a["fid"][1]  # resampled FIDs are biased upward: the interval must hold the estimate
        widths.append(a["class_acc"][1] - a["class_acc"][0])
    assert widths[1] < widths[0] / 2


def test_precision_hits_are_the_per_sample_terms_of_precision():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(120, 6)), rng.normal(0.7, 1.0, size=(90, 6))
    hits = precision_hits(real, fake, 3)
    assert hits.shape == (90,) and hits.dtype == bool
    assert 0 < hits.sum() < 90  # a shifted cloud: some samples inside the real manifold, some outside
    assert hits.mean() == pytest.approx(precision_recall_bruteforce(real, fake, 3)[0])
