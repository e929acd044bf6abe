"""``kindbench latents``: encode an ImageFolder dataset once into a VAE latent cache (the ImageNet suites' data).

    kindbench latents --root /path/to/imagenet/train --class-list lists/kind_pretrain150.txt \\
        --vae $KINDBENCH_VAE_DIR --out $KINDBENCH_LATENTS/pretrain150 --image-size 256
    torchrun --nproc_per_node 8 -m bench.data.encode ...        # shards split over ranks; resumable

Posterior moments of the image and of its mirror image are stored (bench.data.latents), so training draws a
fresh posterior sample and a real flip every step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.config.schema import EngineConfig
from bench.run.engine import init_distributed, shutdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kindbench latents", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="ImageFolder root (one folder per class/wnid)")
    parser.add_argument("--class-list", required=True, help="class-list file (bench/data/classlists/README.md)")
    parser.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory ($KINDBENCH_VAE_DIR)")
    parser.add_argument("--out", required=True, type=Path, help="latent cache directory")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    from bench.data.imagefolder import ImageFolderDataset
    from bench.data.latents import build_latent_cache

    ctx = init_distributed(EngineConfig(backend="ddp"))
    try:
        dataset = ImageFolderDataset(args.root, args.class_list, image_size=args.image_size)
        build_latent_cache(dataset, args.vae, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                           device=ctx.device, storage_dtype=args.storage_dtype)  # writes the manifest too
    except (FileNotFoundError, ValueError) as err:
        print(f"kindbench latents: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print(f"kindbench latents: {len(dataset)} images of {dataset.num_classes} classes -> {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
