"""How much of a CPU the embedded suite's training step uses: model FLOP/s against the machine's matmul peak.

Both are measured in this run, in this process, with the same torch threads: the peak as the best of a few large
matmuls (2048 x 2048, fp32 and bf16) and of matmuls at the tiny model's own shapes (8192 x 64 by 64 x 256: batch 32
x 256 tokens through DiT-T's fc1); the training step as the embedded suite runs it (``tiny``: DiT-T/2, 16 px pixels,
3 channels, 64 classes) through ``benchmarks/train_step.py``'s eager step (AdamW, MSE), fp32 and bf16 autocast.
Model FLOP/s = images/s x 3 x 2 x forward GMACs (``bench.models.accounting``, DiT's convention); utilisation = model
FLOP/s / the peak of the same precision (for bf16, never below the fp32 peak: a CPU without bf16 instructions
computes the model's bf16 layers in fp32, faster than its own bf16 matmul).

    python benchmarks/cpu_utilisation.py                     # writes results/benchmarks/cpu_utilisation_cpu.md
    python benchmarks/cpu_utilisation.py --arch DiT-T/2-d4 --batches 32,64 --compile   # + the compiled fp32 step
    python benchmarks/cpu_utilisation.py --threads 1 --before DiT-T/2@16:8 --arch DiT-T/2-d4 --batches 32,64 \
        --compile --out results/benchmarks/cpu_utilisation_before_after_cpu.md   # the small suite's step vs before
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from torch._inductor.exc import InductorError  # noqa: E402
from train_step import build_model, plain_train_step  # noqa: E402

from bench.models.accounting import forward_gmacs_for_arch  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best FLOP/s of ``repeats`` timed (m x k) @ (k x n) products (after one warm-up)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def step_images_per_s(batch: int, precision: str, steps: int, arch: str, size: int, compiled: bool = False) -> float:
    """Median images/s of ``steps`` training steps of the embedded DiT (after two warm-up steps, which include
    ``torch.compile``'s compilation of the model when ``compiled``; the optimizer step stays eager)."""
    torch.manual_seed(0)
    model = build_model("ours", arch, size, 3, 64)
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    step = plain_train_step("ours", model, optimizer, PRECISIONS[precision])
    x, target = torch.randn(batch, 3, size, size), torch.randn(batch, 6, size, size)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, 64, (batch,))
    for _ in range(2):
        step(x, t, y, target)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, t, y, target)
        times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32,128")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", default="DiT-T/2")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also time the fp32 step with torch.compile(model)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the peak and the steps (default: torch's own, one per core); the "
                             "suites run one thread per job, a job per core")
    parser.add_argument("--before", default="", metavar="ARCH@PX:BATCH",
                        help="also time this configuration's fp32 eager step as the reference (e.g. DiT-T/2@16:8, the "
                             "tiny suite's step before the embedded benchmark was redesigned) and print each fp32 "
                             "row's model FLOP/s as a ratio to it")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "cpu_utilisation_cpu.md")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gmacs = forward_gmacs_for_arch(args.arch, input_size=args.image_size, in_channels=3, num_classes=64)
    peaks = {}
    rows = []
    for precision in PRECISIONS:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        large = matmul_flops(2048, 2048, 2048, dtype, args.repeats)
        own = matmul_flops(8192, 64, 256, dtype, args.repeats * 4)
        peaks[precision] = max(large, own)
        through = ""
        if precision != "fp32" and peaks["fp32"] > peaks[precision]:
            # A CPU without bf16 instructions runs torch.mm's bf16 kernel far below its fp32 one (seen on a CI
            # machine: 3 GFLOP/s), while the model's autocast layers reach fp32 speed by computing in fp32; a bf16
            # "peak" below the fp32 one is then no bound, so the fp32 matmul is the ceiling.
            peaks[precision] = peaks["fp32"]
            through = f"; below fp32, so the peak is fp32's {peaks['fp32'] / 1e9:.1f}"
        rows.append(f"| matmul peak | {precision} | 2048³: {large / 1e9:.1f} GFLOP/s; 8192x64x256: {own / 1e9:.1f} "
                    f"GFLOP/s{through} | | |")
    reference = None
    if args.before:
        arch, rest = args.before.split("@")
        size, batch = (int(part) for part in rest.split(":"))
        rate = step_images_per_s(batch, "fp32", args.steps, arch, size)
        reference = rate * 3 * 2 * forward_gmacs_for_arch(arch, input_size=size, in_channels=3, num_classes=64) * 1e9
        rows.append(f"| before: {arch} at {size} px, batch {batch}, eager | fp32 | {rate:.1f} img/s = "
                    f"{reference / 1e9:.2f} GFLOP/s | {100 * reference / peaks['fp32']:.1f} % | "
                    f"{peaks['fp32'] / 1e9:.1f} |")
    modes = [(precision, False) for precision in PRECISIONS] + [("fp32", True)] * args.compile
    for precision, compiled in modes:
        for batch in (int(b) for b in args.batches.split(",")):
            how = "compiled (torch.compile)" if compiled else "eager"
            try:
                rate = step_images_per_s(batch, precision, args.steps, args.arch, args.image_size, compiled)
            except InductorError as error:
                # Inductor builds C++ with the machine's own compiler and loads it into this process; where that
                # toolchain does not fit torch (seen on a CI machine: an undefined libstdc++ symbol), the row says
                # why it has no number rather than the whole table being lost.
                reason = str(error).strip().splitlines()[0][:200].replace("|", "/")
                rows.append(f"| training step, batch {batch}, {how} | {precision} | not measured: torch.compile "
                            f"failed on this machine ({reason}) | | |")
                continue
            flops = rate * 3 * 2 * gmacs * 1e9
            ratio = f" ({flops / reference:.1f}x before)" if reference and precision == "fp32" else ""
            rows.append(f"| training step, batch {batch}, {how} | {precision} | {rate:.1f} img/s = "
                        f"{flops / 1e9:.2f} GFLOP/s{ratio} | {100 * flops / peaks[precision]:.1f} % | "
                        f"{peaks[precision] / 1e9:.1f} |")
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    text = "\n".join([
        "# CPU utilisation of the embedded training step (cpu)", "",
        f"Command: `{command}`", "",
        f"- CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        f"- Model: {args.arch} at {args.image_size} px, 3 channels, 64 classes: {gmacs:.5f} forward GMACs per image; "
        "model FLOP/s = img/s x 3 x 2 x GMACs; utilisation = model FLOP/s / the best matmul of the same precision "
        "measured above in this run.", "",
        "| what | precision | measured | utilisation | peak GFLOP/s |", "|---|---|---|---:|---:|", *rows, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
