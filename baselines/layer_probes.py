"""Per-block statistics of a dense DiT, measured on a synthetic probe: what Heur-LG and Auto-LG rank blocks by.

Both learngene papers rank the ancestry's layers on data (Heur-LG: gradients over several tasks; Auto-LG:
similarity to a briefly fine-tuned pseudo-descendant). ``Method.build`` gets no data, so we measure on a
deterministic **synthetic probe** instead [ours]: seeded N(0, 1) "latents" as x0 in the ancestry's input geometry,
uniform random labels of the ancestry's label space, uniform random timesteps and noise, scored with DiT's own
training loss (``bench.diffusion.GaussianDiffusion``: epsilon MSE plus the learned-variance VB term). Every probe is
drawn from its own ``torch.Generator``, so a build is reproducible and does not depend on the global RNG. A ranking
computed offline on real data can be passed to the methods instead (their ``blocks`` option).

The model is probed in ``eval`` mode: DiT's only stochastic layer is label dropout, which would draw from the
global RNG.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bench.diffusion.process import GaussianDiffusion
from bench.models.dit import DiT


@dataclass(frozen=True)
class Probe:
    """One synthetic batch: clean inputs, labels, timesteps and the noise that forms x_t."""

    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


def make_probes(model: DiT, count: int, batch: int, seed: int, diffusion: GaussianDiffusion) -> list[Probe]:
    """``count`` probe batches of ``batch`` samples for ``model``'s geometry and label space, all from ``seed``.

    Each batch stands for one "task" of Heur-LG's several tasks: its own inputs and its own labels.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    device = next(model.parameters()).device
    probes = []
    for _ in range(count):
        x0 = torch.randn(shape, generator=generator)
        y = torch.randint(0, model.num_classes, (batch,), generator=generator)
        t = diffusion.sample_timesteps(batch, generator=generator)
        noise = torch.randn(shape, generator=generator)
        probes.append(Probe(x0.to(device), y.to(device), t.to(device), noise.to(device)))
    return probes


def probe_loss(model: DiT, probe: Probe, diffusion: GaussianDiffusion) -> torch.Tensor:
    """DiT's mean training loss on one probe batch."""
    losses = diffusion.training_losses(model, probe.x0, probe.t, {"y": probe.y}, noise=probe.noise)
    return losses["loss"].mean()


def diffusion_for(model: DiT) -> GaussianDiffusion:
    """DiT's diffusion process (1000 linear-beta steps) with the model's own variance setting."""
    return GaussianDiffusion(num_timesteps=1000, beta_schedule="linear", learn_sigma=model.learn_sigma)


# --------------------------------------------------------------------------------------------------------------
#                                   Heur-LG: gradient statistics per block
# --------------------------------------------------------------------------------------------------------------


def block_gradient_scores(model: DiT, probes: list[Probe]) -> torch.Tensor:
    """(depth,) mean over probes of ||dL/d theta_b|| / ||theta_b|| for each block b (float64).

    The gradient norm is normalised by the block's parameter norm so blocks of different scale compare; a small
    score is a block the loss barely pulls on, the "stable" layers Heur-LG takes as the learngene. Gradients are
    taken with ``torch.autograd.grad``, so hooks registered on the parameters apply and ``.grad`` is left alone.
    """
    model.eval()
    diffusion = diffusion_for(model)
    blocks = [[p for p in block.parameters()] for block in model.blocks]
    flat = [p for params in blocks for p in params]
    with torch.no_grad():
        weight_norms = torch.stack([torch.sqrt(sum(p.double().square().sum() for p in params)) for params in blocks])
    scores = torch.zeros(len(blocks), dtype=torch.float64)
    for probe in probes:
        grads = torch.autograd.grad(probe_loss(model, probe, diffusion), flat, allow_unused=True)
        position = 0
        for index, params in enumerate(blocks):
            own = grads[position:position + len(params)]
            position += len(params)
            norm = torch.sqrt(sum(g.double().square().sum() for g in own if g is not None))
            scores[index] += (norm / weight_norms[index].clamp_min(1e-12)).cpu()
    return scores / max(len(probes), 1)


# --------------------------------------------------------------------------------------------------------------
#                          Auto-LG: a pseudo-descendant and CKA of block outputs
# --------------------------------------------------------------------------------------------------------------


def pseudo_descendant(model: DiT, probes: list[Probe], steps: int, lr: float) -> DiT:
    """A copy of ``model`` fine-tuned for ``steps`` AdamW steps (no weight decay) on the probe batches in turn."""
    student = copy.deepcopy(model).eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    diffusion = diffusion_for(student)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        probe_loss(student, probes[step % len(probes)], diffusion).backward()
        optimizer.step()
    return student


@torch.no_grad()
def block_outputs(model: DiT, probe: Probe) -> list[torch.Tensor]:
    """Each block's output tokens on the probe's noised inputs, flattened to (batch * tokens, width)."""
    model.eval()
    x_t = diffusion_for(model).q_sample(probe.x0, probe.t, probe.noise)
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out.reshape(-1, out.shape[-1])))
             for block in model.blocks]
    try:
        model(x_t, probe.t, probe.y)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two (samples, features) matrices: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F
    ||Yc^T Yc||_F), columns centred; 1 for representations equal up to rotation and isotropic scale."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).square().sum()
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denominator.clamp_min(1e-30))


def block_cka_scores(ancestor: nn.Module, descendant: nn.Module, probe: Probe) -> torch.Tensor:
    """(depth,) linear CKA between the ancestor's and the descendant's output of each block on the same probe."""
    pairs = zip(block_outputs(ancestor, probe), block_outputs(descendant, probe))
    return torch.tensor([linear_cka(a, d) for a, d in pairs], dtype=torch.float64)
