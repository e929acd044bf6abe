"""Build the training dataset a run config asks for (synthetic, ImageFolder or a VAE latent cache).

Datasets here return unaugmented items: the trainer applies horizontal flips itself from per-sample draws
(``bench.run.batching``), so augmentation is reproducible across world sizes and restarts.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from bench.config.schema import DataConfig, ModelConfig


def _path(text: str, key: str) -> Path:
    if not text:
        raise FileNotFoundError(f"data.{key} is empty: set it in the config or with --data.{key}=PATH")
    return Path(os.path.expandvars(text)).expanduser()


def build_dataset(data: DataConfig, model: ModelConfig) -> Dataset:
    """The dataset of ``data`` with a ``num_classes`` attribute; checks it matches the model's input geometry."""
    if data.source == "synthetic":
        from bench.data.synthetic import SyntheticImages, synthetic_split

        dataset = SyntheticImages(synthetic_split(data.split), image_size=data.image_size, per_class=data.per_class,
                                  domain=data.domain, seed=data.seed)
        expected = (3, data.image_size)
    elif data.source == "imagefolder":
        from bench.data.imagefolder import ImageFolderDataset

        root = _path(data.root, "root")
        dataset = ImageFolderDataset(root, _path(data.class_list, "class_list"), image_size=data.image_size)
        expected = (3, data.image_size)
    else:
        from bench.data.latents import LatentDataset

        directory = _path(data.latent_dir, "latent_dir")
        dataset = LatentDataset(directory, random_flip=False, seed=data.seed)
        expected = (dataset.latent_channels, dataset.latent_size)
    if (model.in_channels, model.input_size) != expected:
        raise ValueError(f"data ({data.source}) gives {expected[0]}-channel {expected[1]}px inputs but the model "
                         f"expects model.in_channels={model.in_channels}, model.input_size={model.input_size}")
    if data.subset_fraction < 1.0:
        from bench.data.subset import ClassBalancedSubset

        dataset = ClassBalancedSubset(dataset, data.subset_fraction)
    return dataset
