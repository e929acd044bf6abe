"""Reference statistics: ADM crop, ImageFolder sources, building, preparing and loading references, CLI helpers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import DINO_ARCH
from PIL import Image

from bench.metrics.cli import main
from bench.metrics.reference.statistics import ImageFolderSource, center_crop_arr, load_reference, save_reference
from bench.metrics.scores.stats import moments_of

INCEPTION = "inception/pt_inception-2015-12-05-6726825d.pth"


def test_center_crop_arr_follows_adm():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (600, 1100, 3), dtype=np.uint8))
    out = center_crop_arr(im, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    halved = im.resize((550, 300), resample=Image.BOX)  # 600 >= 512: one BOX halving; 300 < 512 stops
    scaled = np.asarray(halved.resize((round(550 * 256 / 300), 256), resample=Image.BICUBIC))
    left = (scaled.shape[1] - 256) // 2
    assert np.array_equal(out, scaled[:, left:left + 256])
    small = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    assert center_crop_arr(small, 256).shape == (256, 256, 3)  # upsampled, never halved


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(1)
    for cls in ("n01", "n02"):
        (root / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, (rng.integers(200, 400), rng.integers(200, 400), 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / (f"{i}.png" if i % 2 else f"{i}.JPEG"))
    (root / "n02" / "notes.txt").write_text("ignored")
    return root


def test_image_folder_source(image_folder):
    src = ImageFolderSource(image_folder, image_size=64)
    assert len(src) == 6 and src.files[0] == "n01/0.JPEG"
    assert src.read(0, 6).shape == (6, 64, 64, 3)
    sub = ImageFolderSource(image_folder, image_size=64, num=4, seed=3)
    assert len(sub) == 4 and sub.files == sorted(sub.files)
    assert sub.list_sha256() == ImageFolderSource(image_folder, image_size=64, num=4, seed=3).list_sha256()
    assert sub.list_sha256() != src.list_sha256()
    empty = image_folder.parent / "empty_folder"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(empty)


def test_save_and_load_reference_roundtrip(tmp_path):
    feats = np.random.default_rng(2).standard_normal((50, 8))
    m = moments_of(feats)
    digest = save_reference(tmp_path / "ref.npz", {"pool": m, "spatial": moments_of(feats[:, :4])},
                            {"source": "unit test"}, ref_pool=feats[:10])
    ref = load_reference(tmp_path / "ref.npz")
    assert ref.sha256 == digest and set(ref.moments) == {"pool", "spatial"}
    assert np.array_equal(ref.moments["pool"].sigma, m.sigma) and ref.moments["pool"].n == 50
    assert ref.ref_pool.shape == (10, 8) and ref.provenance["source"] == "unit test"
    with np.load(tmp_path / "ref.npz") as raw:  # ADM's evaluator can read it: the same key names
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(raw.files)
    with pytest.raises(ValueError, match="exactly one main feature space"):
        save_reference(tmp_path / "bad.npz", {"pool": m, "dinov2": m}, {})


def test_build_fdd_reference_from_image_folder(image_folder, weights_dir, tmp_path):
    wd = tmp_path / "weights"
    (wd / "dinov2").mkdir(parents=True)
    os.symlink(weights_dir / "dinov2/dinov2_vits14_pretrain.pth", wd / "dinov2/dinov2_vits14_pretrain.pth")
    out = wd / "refs" / "fdd_folder.npz"
    assert main(["build-ref", "--images", str(image_folder), "--extractor", "dinov2", "--fdd-arch", DINO_ARCH,
                 "--image-size", "64", "--out", str(out), "--weights-dir", str(wd), "--batch-size", "4"]) == 0
    ref = load_reference(out)
    prov = ref.provenance
    assert set(ref.moments) == {"dinov2"} and ref.moments["dinov2"].n == 6 and ref.moments["dinov2"].dim == 384
    assert prov["extractor"] == f"dinov2:{DINO_ARCH}" and prov["crop"] == "adm_center_crop_arr"
    assert prov["pos_embed"] == "dinov2_offset0.1" and prov["fdd_resize"] == "pil_bicubic_uint8"
    assert len(prov["image_list_sha256"]) == 64 and len(prov["dinov2_sha256"]) == 64
    manifest = json.loads((wd / "MANIFEST.json").read_text())
    assert manifest["refs/fdd_folder.npz"]["sha256"] == ref.sha256  # versioned: pinned like the weights


def test_to_npz_cli(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    imgs = np.random.default_rng(3).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    assert main(["to-npz", str(folder), str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as data:
        assert np.array_equal(data["arr_0"], imgs)


@pytest.mark.slow
def test_inception_reference_with_cached_pool_is_used_by_evaluate(image_folder, weights_dir, tmp_path):
    from bench.metrics.acceptance import fixtures

    wd = tmp_path / "weights"
    (wd / "inception").mkdir(parents=True)
    os.symlink(weights_dir / INCEPTION, wd / INCEPTION)
    out = wd / "refs" / "folder_ref.npz"
    assert main(["build-ref", "--images", str(image_folder), "--extractor", "inception", "--image-size", "64",
                 "--out", str(out), "--weights-dir", str(wd), "--batch-size", "4"]) == 0
    ref = load_reference(out)
    assert set(ref.moments) == {"pool", "spatial"} and ref.ref_pool.shape == (6, 2048)
    assert ref.provenance["inception_sha256"] == json.loads((wd / "MANIFEST.json").read_text())[INCEPTION]["sha256"]
    samples = fixtures.write_synthetic_samples(tmp_path / "s.npz", n=6, size=64)
    rec_path = tmp_path / "rec.json"
    assert main(["evaluate", str(samples), "--ref", str(out), "--weights-dir", str(wd), "--fdd", "off",
                 "--batch-size", "4", "--out", str(rec_path)]) == 0
    rec = json.loads(rec_path.read_text())
    assert rec["diagnostics"]["ref_pool_origin"] == "cached ref_pool" and rec["n_ref_pr"] == 6


@pytest.mark.slow
def test_prepare_ref_and_make_fixtures(tmp_path):
    assert main(["make-fixtures", str(tmp_path / "fx")]) == 0
    fx = tmp_path / "fx"
    adm = fx / "refs" / "VIRTUAL_synthetic.npz"
    out = fx / "refs" / "adm_imagenet256_stats.npz"
    assert main(["prepare-ref", "--adm-ref", str(adm), "--weights-dir", str(fx), "--batch-size", "16"]) == 0
    derived, original = load_reference(out), load_reference(adm)
    assert np.array_equal(derived.moments["pool"].sigma, original.moments["pool"].sigma)
    assert derived.ref_pool.shape == (64, 2048) and derived.provenance["source_sha256"] == original.sha256
