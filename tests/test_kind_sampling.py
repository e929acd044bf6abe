"""KIND's models as the sampler runs them (``KindMethod.sampling_model`` through ``bench.run.sample.load_run_model``).

A gated ancestry is sampled unmerged, each sample through its own class's tailors (the null label's under
classifier-free guidance): every sample must equal what DiT models merged for that sample's class and for the null
class produce. An ungated downstream model at the ``paper`` rank preset samples factorised (cheaper than the merged
DiT) and one at full rank samples merged; both compute what the merged DiT computes.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.config.schema import RunConfig, from_dict  # noqa: E402
from bench.diffusion import GaussianDiffusion  # noqa: E402
from bench.diffusion.sampling import sample  # noqa: E402
from bench.models.dit import DiT  # noqa: E402
from bench.run.rundir import RunDir  # noqa: E402
from bench.run.sample import load_run_model  # noqa: E402
from kind.layers import gate_table, kind_layers  # noqa: E402
from methods import ArchSpec, Task, get_method  # noqa: E402
from methods.transfer import load_export, save_export  # noqa: E402

TINY = ArchSpec(name="DiT-T/2", input_size=8, in_channels=4)
CLASSES = 10
NULL = CLASSES


def _perturbed(model: nn.Module, seed: int = 3) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def _write_run(root, name: str, model: nn.Module, stage: str, options: dict, num_classes: int,
               ancestry: str = "") -> RunDir:
    run = RunDir(root / name)
    run.path.mkdir(parents=True)
    cfg = from_dict({"model": {"arch": TINY.name, "input_size": 8, "in_channels": 4},
                     "method": {"name": "kind", "stage": stage, "options": options},
                     "run": {"name": name, "out_dir": str(root), "ancestry": ancestry}})
    assert isinstance(cfg, RunConfig)
    run.config.write_text(json.dumps(cfg.to_dict()))
    save_export(run.export, model.state_dict(), method="kind", arch=TINY, num_classes=num_classes,
                meta={"stage": stage, "method_options": get_method("kind", options).config.to_dict()})
    return run


class _PerClassMerged(nn.Module):
    """Reference: each sample through the DiT merged for its own label's gate (class id or the null class)."""

    def __init__(self, gated: nn.Module, labels: list[int]):
        super().__init__()
        self.merged = nn.ModuleDict({str(c): get_method("kind").merge(copy.deepcopy(gated),
                                                                      gate="null" if c == NULL else c)
                                     for c in sorted(set(labels) | {NULL})})
        first = next(iter(self.merged.values()))
        self.num_classes, self.in_channels, self.learn_sigma = first.num_classes, first.in_channels, first.learn_sigma

    def forward(self, x, t, y):
        return torch.cat([self.merged[str(int(label))](x[i:i + 1], t[i:i + 1], y[i:i + 1])
                          for i, label in enumerate(y)])

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        return DiT.forward_with_cfg(self, x, t, y, cfg_scale, guide_channels)


def _draw(model, labels, cfg_scale):
    generators = [torch.Generator().manual_seed(100 + i) for i in range(len(labels))]
    return sample(model, torch.tensor(labels), shape=(4, 8, 8), scheduler="ddpm", num_steps=4, cfg_scale=cfg_scale,
                  generators=generators, diffusion=GaussianDiffusion(1000, "linear", True))


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_a_gated_ancestry_samples_every_class_through_its_own_tailors(tmp_path, cfg_scale):
    torch.manual_seed(0)
    ancestry = _perturbed(get_method("kind").build_ancestry(TINY, CLASSES)).eval()
    run = _write_run(tmp_path, "ancestry-kind", ancestry, "ancestry", {}, CLASSES)

    model, _, _ = load_run_model(run.path)
    assert gate_table(model) is not None and kind_layers(model)  # sampled as trained: gated, not merged
    labels = [1, 6, 1, 3, 9, 0]
    together = _draw(model, labels, cfg_scale)

    reference = _PerClassMerged(ancestry, labels).eval()
    for i, label in enumerate(labels):
        generators = [torch.Generator().manual_seed(100 + i)]
        alone = sample(reference, torch.tensor([label]), shape=(4, 8, 8), scheduler="ddpm", num_steps=4,
                       cfg_scale=cfg_scale, generators=generators, diffusion=GaussianDiffusion(1000, "linear", True))
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-4)
    # the gate matters: the same noise under another class's tailors is another image
    other = _draw(model, [6, 6, 1, 3, 9, 0], cfg_scale)
    assert (other[0] - together[0]).abs().max() > 1e-3


@pytest.mark.parametrize(("ranks", "factorised"), [("paper", True), ("full", False)])
def test_an_ungated_transfer_samples_factorised_only_where_that_is_cheaper(tmp_path, ranks, factorised):
    torch.manual_seed(1)
    options = {"ranks": ranks}
    ancestry = _perturbed(get_method("kind", options).build_ancestry(TINY, CLASSES))
    parent = _write_run(tmp_path, "ancestry-kind", ancestry, "ancestry", options, CLASSES)
    torch.manual_seed(2)
    method = get_method("kind", options)
    transfer = _perturbed(method.build(TINY, Task("novel", 6, "transfer"), load_export(parent.export)))
    run = _write_run(tmp_path, "novel", transfer, "transfer", options, 6, ancestry=str(parent.export))

    model, _, _ = load_run_model(run.path)
    assert bool(kind_layers(model)) == factorised
    accounting, summary = method.count(transfer), method.summary(transfer)
    assert (accounting.gmacs_fwd_sampled < summary["gmacs_fwd_merged"]) == factorised
    cheaper = min(accounting.gmacs_fwd_trained, summary["gmacs_fwd_merged"])
    assert accounting.gmacs_fwd_sampled == pytest.approx(cheaper)
    merged = method.merge(copy.deepcopy(transfer)).eval()
    labels = [0, 5, 2, 2]
    torch.testing.assert_close(_draw(model, labels, 1.5), _draw(merged, labels, 1.5), rtol=0, atol=1e-4)
