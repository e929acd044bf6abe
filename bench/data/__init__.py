"""Data: the embedded synthetic dataset, ImageFolder subsets with class-list files, the VAE latent cache, grids."""

from bench.data.grid import make_grid, save_grid
from bench.data.imagefolder import (
    ImageFolderDataset,
    MergedClass,
    center_crop_arr,
    read_class_list,
    resolve_class_list,
)
from bench.data.latents import LatentDataset, build_latent_cache, finalize_latent_cache, read_manifest
from bench.data.synthetic import (
    NUM_SYNTHETIC_CLASSES,
    SYNTHETIC_DOMAINS,
    SYNTHETIC_SPLITS,
    SyntheticImages,
    class_name,
    render_images,
    synthetic_split,
)

__all__ = [
    "NUM_SYNTHETIC_CLASSES",
    "SYNTHETIC_DOMAINS",
    "SYNTHETIC_SPLITS",
    "ImageFolderDataset",
    "LatentDataset",
    "MergedClass",
    "SyntheticImages",
    "build_latent_cache",
    "center_crop_arr",
    "class_name",
    "finalize_latent_cache",
    "make_grid",
    "read_class_list",
    "read_manifest",
    "render_images",
    "resolve_class_list",
    "save_grid",
    "synthetic_split",
]
