"""Command line of the metrics: ``kindbench evaluate …`` and ``kindbench metrics …``.

``main(argv)`` takes the sub-command first::

    evaluate SAMPLES.npz [--ref REF] [--weights-dir DIR] [--out JSON] [--fdd auto|on|off] ...
    weights list|verify [--pin|--repin]
    prepare-ref --adm-ref VIRTUAL_imagenet256_labeled.npz [--out refs/adm_imagenet256_stats.npz]
    build-ref --images DIR_OR_NPZ --extractor inception|dinov2 --out REF.npz [--num N] [--image-size 256]
    acceptance a1|a2|a3 ...
    make-fixtures DIR            (random weights + synthetic batches, for offline plumbing runs)
    to-npz PNG_DIR OUT.npz       (DiT's sample folder → ADM npz)

Under torchrun (WORLD_SIZE > 1) the process group is initialised here: nccl on GPUs, gloo on CPU. The umbrella
CLI maps ``kindbench evaluate ARGS`` to ``main(["evaluate", *ARGS])`` and ``kindbench metrics ARGS`` to
``main(ARGS)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (a batch size of 0 would loop forever or divide by 0)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value

def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-dir", default=None,
                   help="offline weights/reference directory (default: $KINDBENCH_WEIGHTS_DIR)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="FID/sFID/IS/P/R/FDD of an ADM-style sample batch → JSON record")
    p.add_argument("samples", type=Path, help="ADM-style .npz (arr_0 uint8 NHWC) or a folder of NNNNNN.png")
    p.add_argument("--ref", type=Path, default=None,
                   help="reference batch (ADM VIRTUAL_*.npz or ours); default: refs/ in the weights dir")
    _add_weights(p)
    p.add_argument("--out", type=Path, default=None, help="record path (default: <samples>.eval.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing record")
    p.add_argument("--fdd", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--fdd-ref", type=Path, default=None)
    p.add_argument("--fdd-arch", default="vit_large_patch14_dinov2")
    p.add_argument("--fdd-resize", choices=("pil_bicubic_uint8", "torch_antialias"), default="pil_bicubic_uint8")
    p.add_argument("--pr-distance", choices=("fp32", "adm_fp16"), default="fp32")
    p.add_argument("--pr-k", type=int, default=3)
    p.add_argument("--n-ref-pr", type=int, default=10_000)
    p.add_argument("--is-split-size", type=int, default=5000)
    p.add_argument("--is-shuffle-seed", type=int, default=None)
    p.add_argument("--class-sampling", choices=("random", "balanced", "unknown"), default="random")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--extras", nargs="*", choices=("clean-fid",), default=[],
                   help="extra columns: clean-fid (clean_fid and kid through clean-fid's API)")
    p.add_argument("--frechet-method", choices=("cholesky", "eigh"), default="cholesky")
    p.add_argument("--save-stats", type=Path, default=None, help="also write the samples' float64 moments (npz)")


def _add_acceptance(sub) -> None:
    p = sub.add_parser("acceptance", help="acceptance procedures A1-A3 of docs/metrics.md §15")
    p.add_argument("procedure", choices=("a1", "a1-128", "a2", "a3"))
    p.add_argument("--samples", type=Path, required=True,
                   help="A1: admnet_guided_upsampled_imagenet256.npz; A2: DiT-XL/2 50k samples; A3: any samples")
    p.add_argument("--ref", type=Path, default=None, help="A1/A2: VIRTUAL_imagenet256_labeled.npz (or derived)")
    _add_weights(p)
    p.add_argument("--out-dir", type=Path, default=Path("results/acceptance"))
    p.add_argument("--plumbing", action="store_true", help="report comparisons without failing (CI, random weights)")
    p.add_argument("--no-fp16-pr", action="store_true", help="A1: skip the extra adm_fp16 P/R run")
    p.add_argument("--fdd", choices=("auto", "on", "off"), default="off")
    p.add_argument("--fdd-arch", default="vit_large_patch14_dinov2")
    p.add_argument("--fdd-ref", type=Path, default=None)
    p.add_argument("--dinov2-repo", default=None, help="A3: local clone of facebookresearch/dinov2 for torch.hub")
    p.add_argument("--n", type=int, default=5000, help="A3: number of images")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kindbench metrics", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_evaluate(sub)
    _add_acceptance(sub)
    p = sub.add_parser("weights", help="list or verify the offline weights directory")
    p.add_argument("action", choices=("list", "verify"))
    p.add_argument("--pin", action="store_true", help="pin sha256 of files not yet in MANIFEST.json")
    p.add_argument("--repin", action="store_true", help="forget all pins and pin the current files")
    _add_weights(p)
    p = sub.add_parser("prepare-ref", help="derived ADM reference: float64 stats + cached 10k pool features")
    p.add_argument("--adm-ref", type=Path, default=None, help="default: refs/VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--out", type=Path, default=None, help="default: refs/adm_imagenet256_stats.npz")
    _add_weights(p)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--device", default=None)
    p = sub.add_parser("build-ref", help="reference statistics for any image folder or npz")
    p.add_argument("--images", type=Path, required=True, help="image folder (ADM centre crop applied) or .npz")
    p.add_argument("--extractor", choices=("inception", "dinov2"), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num", type=int, default=None, help="seeded random subset of the folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--fdd-arch", default="vit_large_patch14_dinov2")
    p.add_argument("--fdd-resize", choices=("pil_bicubic_uint8", "torch_antialias"), default="pil_bicubic_uint8")
    _add_weights(p)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p = sub.add_parser("make-fixtures", help="random weights + synthetic reference/samples for offline plumbing")
    p.add_argument("dir", type=Path)
    p.add_argument("--dinov2-arch", default="vit_small_patch14_dinov2")
    p.add_argument("--clean-fid", action="store_true", help="also a TorchScript stand-in for clean-fid")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("to-npz", help="DiT sample folder (NNNNNN.png) → ADM-style npz")
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    return parser


def _init_distributed() -> bool:
    """Join the torchrun process group if there is one and nobody joined yet; returns True if we did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _cmd_evaluate(args) -> int:
    from bench.metrics.evaluate import EvalOptions, evaluate

    opts = EvalOptions(
        samples=args.samples, ref=args.ref, weights_dir=args.weights_dir, out=args.out, overwrite=args.overwrite,
        fdd=args.fdd, fdd_ref=args.fdd_ref, fdd_arch=args.fdd_arch, fdd_resize=args.fdd_resize,
        pr_distance=args.pr_distance, pr_k=args.pr_k, n_ref_pr=args.n_ref_pr, is_split_size=args.is_split_size,
        is_shuffle_seed=args.is_shuffle_seed, class_sampling=args.class_sampling, limit=args.limit,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, extras=tuple(args.extras),
        frechet_method=args.frechet_method, save_stats=args.save_stats)
    record = evaluate(opts)
    if "_written_to" in record:
        names = record["metric_names"]
        summary = {names[k]: record[k] for k in names if record.get(k) is not None}
        print(json.dumps(summary, indent=2))
        print(f"record: {record['_written_to']}")
    return 0


def _cmd_weights(args) -> int:
    from bench.metrics.networks.weights import expected_files_text, resolve_weights_dir

    wd = resolve_weights_dir(args.weights_dir)
    if args.action == "list":
        print(expected_files_text(wd.root))
        return 0
    report = wd.verify_all(pin=args.pin, repin=args.repin)
    for row in report:
        print(f"{row['status']:<9} {row['key']:<34} {row.get('path', ' or '.join(row.get('expected', [])))}")
    status = {r["key"]: r["status"] for r in report}
    if status["inception"] == "missing" or (status["adm_ref"] == "missing" and status["adm_ref_derived"] == "missing"):
        print("error: required files are missing\n" + expected_files_text(wd.root, ["inception", "adm_ref"]),
              file=sys.stderr)
        return 2
    return 1 if "MISMATCH" in status.values() else 0


def _device(value):
    from bench.metrics.evaluate import default_device

    return value or default_device()


def _cmd_prepare_ref(args) -> int:
    from bench.metrics.networks.inception import load_inception
    from bench.metrics.networks.weights import LAYOUT, resolve_weights_dir
    from bench.metrics.reference.build import prepare_adm_reference

    wd = resolve_weights_dir(args.weights_dir)
    weights = wd.verified("inception")
    adm = args.adm_ref or wd.verified("adm_ref").path
    out = args.out or wd.root / LAYOUT["adm_ref_derived"].paths[0]
    digest = prepare_adm_reference(adm, load_inception(weights.path, _device(args.device)), out,
                                   inception_sha256=weights.sha256, batch_size=args.batch_size)
    _report_written(wd, out, digest)
    return 0


def _cmd_build_ref(args) -> int:
    from bench.metrics.networks import dinov2 as dino
    from bench.metrics.networks.inception import load_inception
    from bench.metrics.networks.weights import resolve_weights_dir
    from bench.metrics.reference.build import build_fdd_reference, build_inception_reference
    from bench.metrics.reference.statistics import ImageFolderSource
    from bench.metrics.sample_io import open_samples

    wd = resolve_weights_dir(args.weights_dir)
    device = _device(args.device)
    if args.images.is_dir() and not any(args.images.glob("000000.png")):
        source = ImageFolderSource(args.images, args.image_size, args.num, args.seed)
        limit = None
    else:
        source, limit = open_samples(args.images), args.num
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, limit=limit)
    if args.extractor == "inception":
        weights = wd.verified("inception")
        digest = build_inception_reference(source, load_inception(weights.path, device), args.out,
                                           inception_sha256=weights.sha256, **common)
    else:
        weights = wd.verified(f"dinov2:{args.fdd_arch}")
        model = dino.build_dinov2(weights.path, args.fdd_arch, device=device)
        digest = build_fdd_reference(source, model, args.out, arch=args.fdd_arch, dinov2_sha256=weights.sha256,
                                     fdd_resize=args.fdd_resize, **common)
    _report_written(wd, args.out, digest)
    return 0


def _report_written(wd, out: Path, digest: str | None) -> None:
    """Print the new file's sha256 and pin it when it lives in the weights directory (references are versioned)."""
    if not digest:
        return  # not rank 0
    print(f"wrote {out} sha256 {digest}")
    try:
        v = wd.pin_file(out)
        print(f"pinned {v.relpath} in {wd.manifest_path}")
    except ValueError:
        pass  # outside the weights dir: the sha256 above is its version


def _cmd_acceptance(args) -> int:
    from bench.metrics.acceptance import procedures as acc
    from bench.metrics.evaluate import EvalOptions

    if args.procedure == "a3":
        acc.run_fdd_parity(args.samples, args.weights_dir, arch=args.fdd_arch, n=args.n, out_dir=args.out_dir,
                           dinov2_repo=args.dinov2_repo, fdd_ref=args.fdd_ref, device=_device(args.device))
        return 0
    targets = {"a1": acc.A1_TARGETS, "a1-128": acc.A1_TARGETS_128, "a2": acc.A2_TARGETS}[args.procedure]
    opts = EvalOptions(samples=args.samples, ref=args.ref, weights_dir=args.weights_dir, fdd=args.fdd,
                       fdd_arch=args.fdd_arch, fdd_ref=args.fdd_ref, batch_size=args.batch_size,
                       num_workers=args.num_workers, device=args.device)
    ok, _ = acc.run_metric_acceptance(args.procedure, opts, targets, args.out_dir, plumbing=args.plumbing,
                                      fp16_pr=args.procedure.startswith("a1") and not args.no_fp16_pr)
    return 0 if ok else 1


def _cmd_make_fixtures(args) -> int:
    from bench.metrics.acceptance import fixtures
    from bench.metrics.networks.weights import DINOV2_FILES

    root = args.dir
    fixtures.write_random_weights(root, seed=args.seed, dinov2_arch=args.dinov2_arch, clean_fid=args.clean_fid)
    refs = root / "refs"
    refs.mkdir(exist_ok=True)
    fixtures.write_synthetic_adm_reference(refs / "VIRTUAL_synthetic.npz",
                                           root / "inception/pt_inception-2015-12-05-6726825d.pth")
    dinov2_weights = root / "dinov2" / DINOV2_FILES[args.dinov2_arch]
    fixtures.write_synthetic_fdd_reference(refs / "fdd_synthetic.npz", dinov2_weights, args.dinov2_arch)
    fixtures.write_synthetic_samples(root / "samples_synthetic.npz")
    print(f"fixtures in {root}: weights (random), refs/VIRTUAL_synthetic.npz, refs/fdd_synthetic.npz, "
          "samples_synthetic.npz")
    return 0


def _cmd_to_npz(args) -> int:
    from bench.metrics.sample_io import png_folder_to_npz

    print(png_folder_to_npz(args.folder, args.out))
    return 0


COMMANDS = {"evaluate": _cmd_evaluate, "weights": _cmd_weights, "prepare-ref": _cmd_prepare_ref,
            "build-ref": _cmd_build_ref, "acceptance": _cmd_acceptance, "make-fixtures": _cmd_make_fixtures,
            "to-npz": _cmd_to_npz}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status. Errors in the inputs print one line and return 2."""
    from bench.metrics.networks.weights import MissingWeightsError, WeightsMismatchError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["metrics"]:  # `kindbench metrics <cmd> ...` arrives with its verb; `kindbench evaluate` too
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = _init_distributed()
    try:
        return COMMANDS[args.command](args)
    except MissingWeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, WeightsMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
