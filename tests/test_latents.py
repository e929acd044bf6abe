"""VAE loading (local directories only) and the sharded latent cache, with a tiny random diffusers AutoencoderKL."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from bench.data.latents import (
    MANIFEST_FILE,
    LatentDataset,
    build_latent_cache,
    file_sha256,
    finalize_latent_cache,
    shard_file_name,
)
from bench.data.synthetic import SyntheticImages
from bench.models.vae import VAE_DIR_ENV, decode, encode_moments, load_vae, resolve_vae_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARD_SIZE = 5  # 12 images -> shards of 5, 5 and 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny VAE's convolutions take milliseconds on one thread but can take a second on two threads when other
    # processes share the cores (OpenMP barriers); restore the setting for the rest of the session.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images():
    return SyntheticImages([0, 21, 50], image_size=16, per_class=4, seed=3)


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, images, vae_dir):
    out = tmp_path_factory.mktemp("cache")
    result = build_latent_cache(images, vae_dir, out, batch_size=3, shard_size=SHARD_SIZE)
    assert result.written == [0, 1, 2] and result.skipped == [] and result.manifest == out / MANIFEST_FILE
    return out


def _stack(dataset, indices):
    return torch.stack([dataset[i][0] for i in indices])


def _shard_hashes(directory):
    return {p.name: file_sha256(p) for p in sorted(directory.glob("shard_*.safetensors"))}


# --------------------------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------------------------


def test_load_vae_reads_a_local_directory_and_decodes_to_image_range(vae, images):
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    mean, std = encode_moments(vae, _stack(images, range(2)))
    assert mean.shape == (2, 4, 8, 8) and std.shape == (2, 4, 8, 8) and (std > 0).all()
    out = decode(vae, mean * 0.18215)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match=r"expected images \(N, 3, H, W\)"):
        encode_moments(vae, torch.zeros(3, 16, 16))


def test_missing_vae_files_give_errors_that_say_what_and_where(tmp_path, vae_dir, monkeypatch):
    expected = r"does not exist \(expected config.json and .*safetensors.*sd-vae-ft-ema"
    with pytest.raises(FileNotFoundError, match=expected):
        load_vae(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_vae(partial)
    shutil.copy(vae_dir / "config.json", partial / "config.json")
    with pytest.raises(FileNotFoundError, match="has no weights file .*diffusion_pytorch_model.safetensors"):
        load_vae(partial)
    monkeypatch.delenv(VAE_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"{VAE_DIR_ENV} is not set"):
        resolve_vae_dir(None)
    monkeypatch.setenv(VAE_DIR_ENV, str(vae_dir))
    assert resolve_vae_dir(None) == vae_dir


# --------------------------------------------------------------------------------------------------------------------
# Cache round trip
# --------------------------------------------------------------------------------------------------------------------


def test_cache_holds_the_moments_of_a_direct_encode_for_both_flips(cache_dir, images, vae):
    dataset = LatentDataset(cache_dir, sample_posterior=False, random_flip=False)
    assert len(dataset) == 12 and dataset.num_classes == 3
    assert dataset.latent_shape == (4, 8, 8) and dataset.latent_channels == 4 and dataset.latent_size == 8
    assert dataset.labels.tolist() == images.labels.tolist()
    batch = _stack(images, range(12))
    mean, std = encode_moments(vae, batch)
    mean_flip, std_flip = encode_moments(vae, torch.flip(batch, dims=[-1]))
    for i in range(12):
        latent, label = dataset[i]
        assert label == images[i][1]
        torch.testing.assert_close(latent, mean[i] * 0.18215, atol=1e-5, rtol=1e-4)
        cached_mean, cached_std = dataset.moments(i, flipped=True)
        torch.testing.assert_close(cached_mean, mean_flip[i] * 0.18215, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached_std, std_flip[i] * 0.18215, atol=1e-5, rtol=1e-4)
    # encoding the mirror is not the same as mirroring the latent: the flip pass is really a second encode
    assert not torch.allclose(mean_flip[0], torch.flip(mean[0], dims=[-1]), atol=1e-3)


def test_random_flip_picks_one_of_the_two_encodes(cache_dir, images, vae):
    dataset = LatentDataset(cache_dir, sample_posterior=False, random_flip=True, seed=1)
    batch = _stack(images, range(12))
    plain = encode_moments(vae, batch)[0] * 0.18215
    flipped = encode_moments(vae, torch.flip(batch, dims=[-1]))[0] * 0.18215
    choices = []
    for i in range(12):
        latent = dataset[i][0]
        is_plain = torch.allclose(latent, plain[i], atol=1e-5, rtol=1e-4)
        is_flipped = torch.allclose(latent, flipped[i], atol=1e-5, rtol=1e-4)
        assert is_plain != is_flipped
        choices.append(is_flipped)
    assert 0 < sum(choices) < 12


def test_posterior_samples_are_deterministic_per_seed_index_and_epoch(cache_dir):
    dataset = LatentDataset(cache_dir, sample_posterior=True, random_flip=False, seed=5)
    first = _stack(dataset, range(12))
    torch.testing.assert_close(_stack(dataset, range(12)), first, rtol=0, atol=0)  # same draw on re-access (resume)
    again = LatentDataset(cache_dir, sample_posterior=True, random_flip=False, seed=5, verify="size")
    torch.testing.assert_close(again[7][0], first[7], rtol=0, atol=0)
    dataset.set_epoch(1)
    assert not torch.allclose(dataset[7][0], first[7])
    revived = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker gets (no open file handles)
    torch.testing.assert_close(revived[7][0], dataset[7][0], rtol=0, atol=0)
    other_seed = LatentDataset(cache_dir, sample_posterior=True, random_flip=False, seed=6)
    assert not torch.allclose(other_seed[7][0], first[7])
    # the draw is mean + std * eps with eps ~ N(0, 1)
    mean_only = LatentDataset(cache_dir, sample_posterior=False, random_flip=False)
    eps = torch.stack([(first[i] - dataset.moments(i)[0]) / dataset.moments(i)[1] for i in range(12)])
    assert (first - _stack(mean_only, range(12))).abs().max() > 0
    assert abs(eps.mean().item()) < 0.1 and 0.9 < eps.std().item() < 1.1


def test_manifest_records_provenance_hashes_and_latent_stats(cache_dir, vae_dir, images, vae):
    manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
    assert manifest["count"] == 12 and manifest["latent_shape"] == [4, 8, 8] and manifest["flips"] is True
    assert manifest["scale_factor"] == pytest.approx(0.18215) and manifest["storage_dtype"] == "float32"
    assert manifest["vae"]["weights_sha256"] == file_sha256(vae_dir / "diffusion_pytorch_model.safetensors")
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 5), (5, 10), (10, 12)]
    for shard in manifest["shards"]:
        assert shard["sha256"] == file_sha256(cache_dir / shard["file"])
    scaled = encode_moments(vae, _stack(images, range(12)))[0].double() * 0.18215
    expected_mean = scaled.mean(dim=(0, 2, 3))
    expected_std = scaled.permute(1, 0, 2, 3).reshape(4, -1).std(dim=1, unbiased=False)
    stats = LatentDataset(cache_dir, random_flip=False).latent_stats
    torch.testing.assert_close(stats[0].double(), expected_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats[1].double(), expected_std, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Resume, ranks, damage
# --------------------------------------------------------------------------------------------------------------------


def test_resume_rewrites_only_the_missing_shard_with_identical_content(tmp_path, cache_dir, images, vae_dir):
    work = tmp_path / "cache"
    shutil.copytree(cache_dir, work)
    before = _shard_hashes(work)
    untouched = (work / shard_file_name(0)).stat().st_mtime_ns
    (work / shard_file_name(1)).unlink()
    result = build_latent_cache(images, vae_dir, work, batch_size=3, shard_size=SHARD_SIZE)
    assert result.written == [1] and result.skipped == [0, 2]
    assert _shard_hashes(work) == before
    assert (work / shard_file_name(0)).stat().st_mtime_ns == untouched
    LatentDataset(work)  # the rewritten manifest validates

    rerun = build_latent_cache(images, vae_dir, work, batch_size=3, shard_size=SHARD_SIZE)
    assert rerun.written == [] and rerun.skipped == [0, 1, 2]
    other_settings = build_latent_cache(images, vae_dir, work, batch_size=3, shard_size=SHARD_SIZE, flips=False)
    assert other_settings.written == [0, 1, 2]  # stale shards (built with flips) are rebuilt, not reused
    with pytest.raises(ValueError, match="flips=False"):
        LatentDataset(work, random_flip=True)


def test_two_ranks_split_the_shards_and_match_a_single_process_build(tmp_path, cache_dir, images, vae_dir):
    out = tmp_path / "two_ranks"
    r0 = build_latent_cache(images, vae_dir, out, batch_size=3, shard_size=SHARD_SIZE, rank=0, world_size=2)
    assert r0.written == [0, 2] and r0.manifest is None
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing \['shard_00001.safetensors'\] of 3 shards"):
        finalize_latent_cache(out)
    r1 = build_latent_cache(images, vae_dir, out, batch_size=3, shard_size=SHARD_SIZE, rank=1, world_size=2)
    assert r1.written == [1] and r1.manifest is None
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        LatentDataset(out)
    finalize_latent_cache(out)
    assert _shard_hashes(out) == _shard_hashes(cache_dir)
    with pytest.raises(ValueError, match="rank < world_size"):
        build_latent_cache(images, vae_dir, out, rank=2, world_size=2)


def test_damaged_or_missing_shards_are_reported(tmp_path, cache_dir):
    work = tmp_path / "cache"
    shutil.copytree(cache_dir, work)
    shard = work / shard_file_name(1)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the tensor data: same size, different hash
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard_00001.safetensors is corrupt: sha256 differs"):
        LatentDataset(work)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match=r"shard_00001.safetensors is corrupt: \d+ bytes, manifest says \d+"):
        LatentDataset(work, verify="size")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard .*shard_00001.safetensors is missing"):
        LatentDataset(work)


def test_finalize_rejects_shards_from_a_different_build(tmp_path, cache_dir, vae_dir):
    work = tmp_path / "cache"
    shutil.copytree(cache_dir, work)
    other = SyntheticImages([1], image_size=16, per_class=12, seed=0)  # same count, other content, other shard size
    build_latent_cache(other, vae_dir, tmp_path / "other", shard_size=4)
    shutil.copy(tmp_path / "other" / shard_file_name(1), work / shard_file_name(1))
    with pytest.raises(ValueError, match="shard_size"):
        finalize_latent_cache(work)


def test_bfloat16_storage_and_input_range_check(tmp_path, cache_dir, images, vae_dir, vae):
    result = build_latent_cache(images, vae_dir, tmp_path / "bf16", shard_size=SHARD_SIZE, storage_dtype="bfloat16")
    assert result.manifest is not None
    dataset = LatentDataset(tmp_path / "bf16", sample_posterior=False, random_flip=False)
    expected = encode_moments(vae, _stack(images, range(12)))[0] * 0.18215
    torch.testing.assert_close(_stack(dataset, range(12)), expected, atol=2e-3, rtol=1e-2)  # bf16: 8 mantissa bits
    half = (tmp_path / "bf16" / shard_file_name(0)).stat().st_size
    assert half < 0.6 * (cache_dir / shard_file_name(0)).stat().st_size
    with pytest.raises(ValueError, match="storage_dtype"):
        build_latent_cache(images, vae_dir, tmp_path / "x", storage_dtype="int8")

    class Uint8Range(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, idx):
            return torch.full((3, 16, 16), 255.0), 0

    with pytest.raises(ValueError, match=r"images must be floats in \[-1, 1\]"):
        build_latent_cache(Uint8Range(), vae_dir, tmp_path / "bad")


def _two_process_worker(rank, init_file, vae_dir, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dataset = SyntheticImages([0, 21, 50], image_size=16, per_class=4, seed=3)
        result = build_latent_cache(dataset, vae_dir, out_dir, batch_size=3, shard_size=SHARD_SIZE)
        assert result.written == ([0, 2] if rank == 0 else [1])
        assert (out_dir / MANIFEST_FILE).is_file()  # both ranks return after rank 0 wrote it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_two_process_gloo_build(tmp_path, cache_dir, vae_dir):
    import torch.multiprocessing as mp

    out = tmp_path / "gloo"
    mp.spawn(_two_process_worker, args=(tmp_path / "init", vae_dir, out), nprocs=2, join=True)
    assert _shard_hashes(out) == _shard_hashes(cache_dir)
    LatentDataset(out)
