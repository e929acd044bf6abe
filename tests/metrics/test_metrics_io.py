"""Sample I/O in the ADM contract: docs/metrics.md §16 T22, plus PNG folders, the writer and reader edge cases."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from bench.metrics.sample_io import (
    NpzSamples,
    PngFolderSamples,
    open_samples,
    png_folder_to_npz,
    validate_images,
    write_samples_npz,
)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (7, 256, 256, 3), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_t22_roundtrip_dit_style_npz(tmp_path, images, compressed):
    path = tmp_path / "samples.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images)
    src = open_samples(path, image_size=256)
    assert isinstance(src, NpzSamples) and src.compressed == compressed
    assert len(src) == 7 and src.shape == (7, 256, 256, 3)
    got = np.concatenate([b for _, b in src.batches(3)])
    assert np.array_equal(got, images)
    assert [a for a, _ in src.batches(3)] == [0, 3, 6]
    # random access, including going backwards in a compressed stream
    assert np.array_equal(src.read(5, 7), images[5:7])
    assert np.array_equal(src.read(1, 2), images[1:2])
    src.close()


def test_t22_rejects_bad_arrays(tmp_path, images):
    cases = {
        "float": (images.astype(np.float32) / 255, "must be uint8"),
        "gray": (images[..., :1], "3 channels"),
        "nchw": (images.transpose(0, 3, 1, 2), "3 channels"),
    }
    for name, (arr, msg) in cases.items():
        np.savez(tmp_path / f"{name}.npz", arr_0=arr)
        with pytest.raises(ValueError, match=msg):
            open_samples(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "small.npz", arr_0=images[:, :128, :128])
    with pytest.raises(ValueError, match="must be 256x256"):
        open_samples(tmp_path / "small.npz", image_size=256)
    np.savez(tmp_path / "nokey.npz", samples=images)
    with pytest.raises(ValueError, match="no array 'arr_0'"):
        open_samples(tmp_path / "nokey.npz")
    with pytest.raises(FileNotFoundError):
        open_samples(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="ADM-style"):
        (tmp_path / "x.txt").write_text("x")
        open_samples(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="must be uint8"):
        validate_images(np.zeros((1, 4, 4, 3), np.int16))


def test_writer_matches_np_savez(tmp_path, images):
    ours = write_samples_npz(tmp_path / "ours.npz", (images[i:i + 2] for i in range(0, 7, 2)), 7)
    np.savez(tmp_path / "theirs.npz", arr_0=images)
    with np.load(ours) as a, np.load(tmp_path / "theirs.npz") as b:
        assert a.files == ["arr_0"] and np.array_equal(a["arr_0"], b["arr_0"])
    with zipfile.ZipFile(ours) as zf:
        assert zf.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED  # memory-mappable
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="expected 8"):
        write_samples_npz(tmp_path / "short.npz", iter([images]), 8)
    assert not (tmp_path / "short.npz").exists() and not list(tmp_path.glob("*.tmp"))


def test_png_folder_reader_and_conversion(tmp_path, images):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, img in enumerate(images[:5]):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    src = open_samples(folder)
    assert isinstance(src, PngFolderSamples) and len(src) == 5
    assert np.array_equal(src.read(0, 5), images[:5])
    out = png_folder_to_npz(folder, tmp_path / "from_png.npz")
    with np.load(out) as data:
        assert np.array_equal(data["arr_0"], images[:5])
    (folder / "000002.png").unlink()
    with pytest.raises(ValueError, match="not exactly 0..3"):
        PngFolderSamples(folder)
    Image.fromarray(images[0]).convert("L").save(folder / "000002.png")
    with pytest.raises(ValueError, match="PNG mode L"):
        PngFolderSamples(folder).read(2, 3)


def test_reader_is_picklable_for_workers(tmp_path, images):
    np.savez(tmp_path / "s.npz", arr_0=images)
    src = NpzSamples(tmp_path / "s.npz")
    clone = pickle.loads(pickle.dumps(src))
    assert np.array_equal(clone.read(2, 4), images[2:4])
    assert np.array_equal(src.fresh().read(0, 1), images[:1])
