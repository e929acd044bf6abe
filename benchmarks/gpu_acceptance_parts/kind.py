"""Part (b): KIND's tailor computes ``masked`` vs ``grouped`` vs the dense DiT, training step.

bf16 autocast, batch 32, 150 classes, labels dropped at 10%, AdamW, at the paper rank preset and at full rank, DiT-B/2
and DiT-L/2; the step functions of ``benchmarks/kind_layer.py``, steps rotated between models in one process, medians
of per-round ratios to dense. The KIND models are built by ``get_method("kind", options)`` on the meta device and
materialised with random values (their SVD initialisation costs minutes on a CPU and does not change step time); the
gate table comes from the same method's build of a one-block model of the same width.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from gpu_acceptance_parts.common import PartContext

LABEL_DROP = 0.1  # kind_layer.py's step drops labels at this rate (shown in the table)


def kind_ranks(preset: str, width: int) -> tuple[int, int]:
    """(N_G, N_T) of KIND's rank preset for a DiT of hidden size ``width``: ``paper`` N_T = round(3d/32),
    N_G = round(23d/64) - N_T (272 + 96 on DiT-L/2, 204 + 72 on DiT-B/2); ``full`` N_G = N_T = d/2.

    ``kind.config``'s own presets when it has them (the option ``ranks``), else the same formulas here: the script
    passes explicit ``n_learngenes``/``n_tailors``, so it measures the same models whichever KIND it runs with."""
    try:
        from kind.config import full_ranks, paper_ranks
    except ImportError:
        paper_ranks = full_ranks = None
    if preset == "paper":
        if paper_ranks is not None:
            return paper_ranks(width)
        n_tailors = max(1, round(3 * width / 32))
        return max(1, round(23 * width / 64) - n_tailors), n_tailors
    if preset == "full":
        return full_ranks(width) if full_ranks is not None else (width // 2, width // 2)
    raise ValueError(f"unknown KIND rank preset {preset!r}; expected 'paper' or 'full'")


def build_kind_for_timing(arch: str, plan: dict[str, Any], options: dict[str, Any], device: str):
    """A KIND ancestry of ``options`` with random values on ``device``, without its SVD initialisation.

    The structure comes from ``get_method("kind", options).build_ancestry`` on the meta device; parameters are
    materialised on the device and filled with N(0, 0.02) (step time does not depend on the values); the only
    buffer, the class gate table, is taken from the same method's build of a one-block model of the same width
    (``<arch>-d1``: a few SVDs), so the gate the grouped compute sees is exactly the method's.
    """
    import torch

    from methods import ArchSpec, get_method

    method = get_method("kind", options)

    def spec(name: str) -> ArchSpec:
        return ArchSpec(name=name, input_size=plan["input_size"], in_channels=plan["in_channels"])

    with torch.device("meta"):
        model = method.build_ancestry(spec(arch), plan["num_classes"])
    model = model.to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    shallow = method.build_ancestry(spec(f"{arch}-d1"), plan["num_classes"])
    buffers, shallow_buffers = dict(model.named_buffers()), dict(shallow.named_buffers())
    if set(buffers) != set(shallow_buffers):
        raise RuntimeError(f"KIND buffers differ between {arch} and its one-block build: "
                           f"{sorted(set(buffers) ^ set(shallow_buffers))}; cannot materialise without the SVD init")
    with torch.no_grad():
        for name, buf in buffers.items():
            buf.copy_(shallow_buffers[name])
    method.mark_trainable(model)
    return model


def run(ctx: PartContext) -> list[dict[str, Any]]:
    """Dense, and KIND masked/grouped at the paper and full rank presets: one process, steps rotated per round."""
    import kind_layer
    import torch

    from bench.models.accounting import count_params, forward_gmacs
    from bench.models.dit import build_dit, parse_flavour
    from methods import ArchSpec, get_method

    plan = ctx.plan
    device = torch.device(ctx.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as kind_layer.py on CPU: random tiny factors would time denormal arithmetic
    rows: list[dict[str, Any]] = []
    for arch in plan["archs"]:
        if rows and ctx.time_left() < 0.6 * (ctx.plan["budget_s"] / len(plan["archs"])):
            ctx.note(f"{arch}: skipped, {ctx.time_left():.0f} s of the budget left")
            continue
        width = parse_flavour(arch).hidden_size
        cfg = dict(arch=arch, input_size=plan["input_size"], in_channels=plan["in_channels"],
                   num_classes=plan["num_classes"], batch_size=plan["batch"], precision=plan["precision"])
        torch.manual_seed(0)
        dense = build_dit(arch, input_size=plan["input_size"], in_channels=plan["in_channels"],
                          num_classes=plan["num_classes"], device=device)
        steps = {"dense": kind_layer.step_function(cfg, "train", dense, device)}
        meta = {"dense": dict(preset="-", n_g=None, n_t=None, mode="dense", gmacs=forward_gmacs(dense),
                              params=count_params(dense)["total"])}
        for preset in ("paper", "full"):
            n_g, n_t = kind_ranks(preset, width)
            options = {"n_learngenes": n_g, "n_tailors": n_t, "tailor_compute": "masked"}
            torch.manual_seed(0)
            model = build_kind_for_timing(arch, plan, options, ctx.device)
            step = kind_layer.step_function(cfg, "train", model, device)
            spec = ArchSpec(name=arch, input_size=plan["input_size"], in_channels=plan["in_channels"])
            with torch.device("meta"):  # what grouped computes for a class sample: N_G + K_act components, ungated
                as_class = get_method("kind", {"gate": "none", "n_learngenes": n_g, "n_tailors": max(1, n_t // 2)}
                                      ).build_ancestry(spec, plan["num_classes"])
            gmacs = {"masked": forward_gmacs(model), "grouped": forward_gmacs(as_class)}
            for mode in ("masked", "grouped"):
                name = f"{preset}-{mode}"
                steps[name] = kind_layer.with_tailor_compute(model, mode, step)
                meta[name] = dict(preset=preset, n_g=n_g, n_t=n_t, mode=mode, gmacs=gmacs[mode],
                                  params=count_params(model)["total"])
        names = list(steps)
        start = time.perf_counter()
        for _ in range(plan["warmup"]):
            for name in names:
                kind_layer.timed(steps[name], device)
        warm_s = time.perf_counter() - start
        per_round = warm_s / max(plan["warmup"], 1)
        times: dict[str, list[float]] = {name: [] for name in names}
        for index in range(plan["rounds"]):
            if index >= 2 and ctx.time_left() < 1.5 * per_round + 5:
                ctx.note(f"{arch}: stopped after {index} of {plan['rounds']} rounds (budget)")
                break
            round_start = time.perf_counter()
            for offset in range(len(names)):  # rotate the order so load drifts hit every model alike
                name = names[(index + offset) % len(names)]
                times[name].append(kind_layer.timed(steps[name], device)[0])
            per_round = time.perf_counter() - round_start
        ref = times["dense"]
        for name in names:
            ratios = [t / r for t, r in zip(times[name], ref)]
            median = statistics.median(times[name])
            rows.append(dict(arch=arch, batch=plan["batch"], precision=plan["precision"], **meta[name],
                             s_step=median, images_per_s=plan["batch"] / median, rounds=len(ratios),
                             ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                             dense_gmacs=meta["dense"]["gmacs"]))
        ctx.note(f"{arch}: " + ", ".join(f"{r['mode'] if r['preset'] == '-' else r['preset'] + '/' + r['mode']} "
                                         f"{r['ratio']:.2f}x" for r in rows if r["arch"] == arch))
        del steps, dense, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ctx.save(rows)
    return rows


def render(rows: list[dict], info: dict, plan: dict) -> list[str]:
    lines = [f"Setup: training step (forward with labels dropped at p = {LABEL_DROP} through `force_drop_ids`, MSE, "
             "backward, AdamW `foreach=False`: `benchmarks/kind_layer.py`'s step), "
             f"{plan['input_size']}x{plan['input_size']}x{plan['in_channels']} latents, "
             f"{plan['num_classes']} classes, batch {plan['batch']}, {plan['precision']}"
             f"{' autocast' if plan['precision'] == 'bf16' else ''}. KIND: "
             "q/k/v/o/fc1/fc2 decomposed, random class gate with K_act = N_T/2, null class = learngenes only; "
             "`masked` evaluates every tailor and masks it, `grouped` each gate group's active tailors only (same "
             "outputs and gradients; `kind.layers.set_tailor_compute` switches one model between them). Presets: "
             "`paper` N_T = round(3d/32), N_G = round(23d/64) - N_T; `full` N_G = N_T = d/2. KIND weights are random "
             "(structure from `get_method('kind', ...)`, no SVD init). All models in one process, steps rotated "
             f"per round, {plan['warmup']} warm-up round(s); ratio = median over rounds of KIND step / dense step of "
             "the same round. Fwd GMACs: masked = every tailor; grouped = a class sample (N_G + K_act components; a "
             "null sample needs N_G only). Target (KIND issue 5): training <= 1.3x dense.", "",
             "| model | preset | N_G + N_T | tailor compute | fwd GMACs/img | params | s/step (median) | img/s | "
             "**/ dense** (median, range, rounds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = "-" if r["n_g"] is None else f"{r['n_g']} + {r['n_t']}"
        lines.append(f"| {r['arch']} | {r['preset']} | {ranks} | {r['mode']} | {r['gmacs']:.4g} "
                     f"({r['gmacs'] / r['dense_gmacs']:.2f}x) | {r['params'] / 1e6:.1f}M | {r['s_step']:.4f} | "
                     f"{r['images_per_s']:.1f} | **{r['ratio']:.3f}x** ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}, "
                     f"{r['rounds']}) |")
    return lines
