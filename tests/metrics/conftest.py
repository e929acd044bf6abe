"""Shared offline fixtures for the metrics tests: random weights in the real layout, written once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On the shared 2-core CI machine, 2 OpenMP threads under load spin-wait: an Inception forward measured 13 s with
# 2 threads against 1.7 s with 1. One thread keeps these tests fast whatever else runs.
torch.set_num_threads(1)

DINO_ARCH = "vit_small_patch14_dinov2"  # ViT-L is the real one; S keeps CPU tests fast with the same code path


@pytest.fixture(scope="session")
def inception_state():
    from bench.metrics.networks.inception import random_inception_state_dict

    return random_inception_state_dict(seed=0)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory, inception_state):
    """Random Inception + DINOv2-S weights under the docs/metrics.md §10 file names (no manifest yet)."""
    from bench.metrics.networks import dinov2 as dino
    from bench.metrics.networks.weights import DINOV2_FILES, LAYOUT

    root = tmp_path_factory.mktemp("weights")
    path = root / LAYOUT["inception"].paths[0]
    path.parent.mkdir(parents=True)
    torch.save(inception_state, path)
    dpath = root / "dinov2" / DINOV2_FILES[DINO_ARCH]
    dpath.parent.mkdir(parents=True)
    torch.save(dino.random_fb_checkpoint(DINO_ARCH, seed=0), dpath)
    return root


@pytest.fixture(scope="session")
def inception_model(weights_dir):
    from bench.metrics.networks.inception import load_inception

    return load_inception(weights_dir / "inception/pt_inception-2015-12-05-6726825d.pth")
