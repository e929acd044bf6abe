"""Corrupt sample and reference files are errors naming the file, never scored (a flipped byte, a truncation)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from bench.metrics.reference.statistics import load_reference
from bench.metrics.sample_io import NpzSamples, open_samples, write_samples_npz


def _samples(tmp_path, n: int = 64):
    rng = np.random.default_rng(0)
    path = tmp_path / "samples.npz"
    write_samples_npz(path, [rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)], n)
    return path


def _flip_a_byte_inside_arr0(path):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    data = bytearray(path.read_bytes())
    at = info.header_offset + 30 + len(info.filename) + 200  # past the local header and the npy header
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_samples_open(tmp_path):
    source = open_samples(_samples(tmp_path))
    assert len(source) == 64 and source.read(0, 2).shape == (2, 16, 16, 3)


def test_a_flipped_byte_in_stored_samples_is_an_error(tmp_path):
    path = _samples(tmp_path)
    _flip_a_byte_inside_arr0(path)
    with pytest.raises(ValueError, match=r"samples\.npz: arr_0\.npy is corrupt"):
        open_samples(path)


def test_a_truncated_npz_names_the_file(tmp_path):
    path = _samples(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{path} is not a readable .npz"):
        NpzSamples(path)


def test_a_truncated_reference_names_the_file(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # inside mu's bytes: np.load's CRC check catches it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"reference {path} is not a readable .npz"):
        load_reference(path)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=f"reference {path} is not a readable .npz"):
        load_reference(path)


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_a_batch_size_below_one_is_a_usage_error(value, capsys):
    from bench.metrics.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--batch-size", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch-size" in err and "Traceback" not in err


def test_truncated_network_weights_name_the_file(tmp_path, weights_dir):
    from bench.metrics.networks.dinov2 import _read_state_dict
    from bench.metrics.networks.inception import load_inception

    inception = tmp_path / "pt_inception.pth"
    inception.write_bytes((weights_dir / "inception/pt_inception-2015-12-05-6726825d.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"Inception weights {inception} are unreadable"):
        load_inception(inception)
    dino = tmp_path / "dino.pth"
    dino.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=f"DINOv2 weights {dino} are unreadable"):
        _read_state_dict(dino)
