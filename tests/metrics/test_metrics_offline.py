"""Offline guard and weights manifest: docs/metrics.md §16 T27-T28."""

from __future__ import annotations

import json
import socket
import time

import pytest

from bench.metrics.cli import main
from bench.metrics.networks import weights as W
from bench.records.hashing import file_sha256


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect raises, and is counted."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


ENTRY_POINTS = [
    ["evaluate", "{samples}"],
    ["weights", "verify"],
    ["prepare-ref"],
    ["build-ref", "--images", "{samples}", "--extractor", "inception", "--out", "{tmp}/ref.npz"],
    ["build-ref", "--images", "{samples}", "--extractor", "dinov2", "--out", "{tmp}/ref.npz"],
    ["acceptance", "a1", "--samples", "{samples}"],
    ["acceptance", "a3", "--samples", "{samples}"],
]


@pytest.mark.parametrize("argv", ENTRY_POINTS, ids=lambda a: "-".join(a[:2]))
def test_t27_every_entry_point_fails_fast_offline(tmp_path, monkeypatch, capsys, no_network, argv):
    import numpy as np

    for var in W.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "weights"
    empty.mkdir()
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    argv = [a.format(samples=samples, tmp=tmp_path) for a in argv]
    for extra in ([], ["--weights-dir", str(empty)]):
        start = time.monotonic()
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert time.monotonic() - start < 20
        assert "expected under" in err
        expected_name = "dinov2_vitl14_pretrain.pth" if "dinov2" in argv or "a3" in argv else \
            "pt_inception-2015-12-05-6726825d.pth"
        assert expected_name in err and "https://" in err  # names the file and where to get it
    assert no_network == []


def test_t27_env_var_and_flag_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("KINDBENCH_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("METRICS_WEIGHTS_DIR", str(tmp_path))
    assert W.resolve_weights_dir().root == tmp_path.resolve()
    other = tmp_path / "flag"
    other.mkdir()
    monkeypatch.setenv("KINDBENCH_WEIGHTS_DIR", str(tmp_path))
    assert W.resolve_weights_dir(other).root == other.resolve()  # flag beats the environment
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TORCH_HOME"].startswith(str(other.resolve()))
    with pytest.raises(W.MissingWeightsError, match="does not exist"):
        W.resolve_weights_dir(tmp_path / "nope")


def test_t28_manifest_pins_and_detects_modification(tmp_path):
    f = tmp_path / "inception" / "pt_inception-2015-12-05-6726825d.pth"
    f.parent.mkdir()
    f.write_bytes(b"dummy weights" * 1000)
    wd = W.WeightsDir(tmp_path)
    first = wd.verified("inception")
    assert first.pinned_now and first.official is False  # pinned on first use; not the published file
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert manifest[first.relpath]["sha256"] == file_sha256(f) and manifest[first.relpath]["bytes"] == 13000
    again = wd.verified("inception")
    assert not again.pinned_now and again.sha256 == first.sha256
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(W.WeightsMismatchError, match="differs from the pinned"):
        wd.verified("inception")
    report = {r["key"]: r for r in wd.verify_all(pin=False)}
    assert report["inception"]["status"] == "MISMATCH" and report["adm_ref"]["status"] == "missing"
    assert [r["status"] for r in wd.verify_all(pin=False, repin=True) if r["key"] == "inception"] == ["pinned"]
    assert wd.verified("inception").sha256 == file_sha256(f)


def test_t28_verify_cli(tmp_path, capsys):
    f = tmp_path / "inception" / "pt_inception-2015-12-05-6726825d.pth"
    f.parent.mkdir()
    f.write_bytes(b"x" * 10)
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "adm_imagenet256_stats.npz").write_bytes(b"ref")
    assert main(["weights", "verify", "--weights-dir", str(tmp_path)]) == 0
    assert "unpinned" in capsys.readouterr().out
    assert main(["weights", "verify", "--pin", "--weights-dir", str(tmp_path)]) == 0
    assert "pinned" in capsys.readouterr().out
    f.write_bytes(b"y" * 10)
    assert main(["weights", "verify", "--weights-dir", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
