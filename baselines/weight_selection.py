"""Weight Selection ("IMwLM"; Xu et al., "Initializing Models with Larger Ones", ICLR 2024, arXiv 2311.18823).

A smaller DiT is initialised by selecting a subset of a larger pre-trained DiT's weights, then trained in full.
Layer selection: the first N blocks (the paper's best; ``layer_selection = "even"`` spreads them). Element
selection: for every tensor the same evenly spaced indices along each dimension (``element_selection``), chosen
once per space so the residual stream stays aligned across layers (docs/methods.md §5.9):

* residual channels R (d_src -> d_tgt): every weight reading or writing the residual stream or the conditioning
  vector c (patch embedder, timestep MLP output, class table, q/k/v inputs, attention and MLP outputs, adaLN
  modulation in and out, final layer);
* attention heads keep their size (the variant keeps the flavour's head size): evenly spaced *heads* are kept with
  all their channels, the same heads for q, k and v [ours; the official code spaces the fused dimension uniformly,
  which would cut heads apart];
* MLP hidden units M (4 d_src -> 4 d_tgt);
* adaLN outputs are 6 (blocks) or 2 (final layer) stacked d-vectors: R is taken inside each of them.

Evenly spaced as in the official code: i * (n / m) when m divides n, else round(linspace(0, n - 1, m)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from baselines.common import DenseMethod
from baselines.inheritance import check_size_ancestry, copy_prefix, param_names_under
from bench.models.dit import DiT, DiTFlavour
from methods.base import ArchSpec, Export, MethodConfig, MethodError, Task
from methods.surgery import check_reinit_names
from methods.transfer import DENSE_METHODS

_LAYER_SELECTIONS = ("first", "even")
_ELEMENT_SELECTIONS = ("uniform", "leading")
_POS_EMBED = ("select", "fresh")


@dataclass
class WeightSelectionConfig(MethodConfig):
    """Weight Selection options; ``targets`` does not apply (every tensor is selected)."""

    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules drawn fresh instead of selected: ``y_embedder`` (new label space), optionally ``final_layer``."""
    layer_selection: str = "first"
    """Which ancestry blocks start the descendant's blocks: ``first`` N (paper's best) or ``even`` (evenly spaced)."""
    element_selection: str = "uniform"
    """Indices kept along each dimension: ``uniform`` (evenly spaced, paper's default) or ``leading`` (first m)."""
    pos_embed: str = "select"
    """The frozen position table: ``select`` the ancestry's channels R (consistent with the selected patch
    embedder) [ours] or ``fresh`` (DiT's sin-cos table at the new width)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets:
            raise MethodError("weight_selection selects every tensor: 'targets' does not apply")
        check_reinit_names(self.reinit)
        for name, valid in (("layer_selection", _LAYER_SELECTIONS), ("element_selection", _ELEMENT_SELECTIONS),
                            ("pos_embed", _POS_EMBED)):
            if getattr(self, name) not in valid:
                raise MethodError(f"weight_selection {name} must be one of {valid}, got {getattr(self, name)!r}")


def spaced(n: int, m: int, how: str = "uniform") -> torch.Tensor:
    """m of the indices 0..n-1: evenly spaced (``uniform``) or the first m (``leading``)."""
    if not 1 <= m <= n:
        raise MethodError(f"cannot select {m} of {n} indices")
    if how == "leading":
        return torch.arange(m)
    if n % m == 0:
        return torch.arange(m) * (n // m)
    return torch.linspace(0, n - 1, m, dtype=torch.float64).round().long()


@dataclass(frozen=True)
class Selection:
    """The index sets of one source -> target selection (each a LongTensor of source indices)."""

    blocks: torch.Tensor
    residual: torch.Tensor
    heads: torch.Tensor
    mlp: torch.Tensor
    head_size: int
    source_width: int

    @property
    def attention(self) -> torch.Tensor:
        """Source channels of the kept heads (all channels of each), in one of q, k or v."""
        offsets = torch.arange(self.head_size)
        return torch.cat([h * self.head_size + offsets for h in self.heads.tolist()])

    def stacked(self, index: torch.Tensor, copies: int) -> torch.Tensor:
        """``index`` inside each of ``copies`` stacked source_width-long vectors (q/k/v, adaLN chunks)."""
        return torch.cat([c * self.source_width + index for c in range(copies)])


def make_selection(source: DiTFlavour, target: DiTFlavour, config: WeightSelectionConfig, mlp_ratio: float = 4.0) \
        -> Selection:
    how = config.element_selection
    if config.layer_selection == "first":
        blocks = torch.arange(target.depth)
    else:
        blocks = spaced(source.depth, target.depth)
    return Selection(blocks=blocks, residual=spaced(source.hidden_size, target.hidden_size, how),
                     heads=spaced(source.num_heads, target.num_heads, how),
                     mlp=spaced(int(source.hidden_size * mlp_ratio), int(target.hidden_size * mlp_ratio), how),
                     head_size=source.hidden_size // source.num_heads, source_width=source.hidden_size)


def rule_for(key: str, sel: Selection) -> list[torch.Tensor | None]:
    """Per-dimension source indices for the tensor named ``key`` (a DiT state-dict suffix); None keeps a dim."""
    R, all_ = sel.residual, None
    rules: dict[str, list[torch.Tensor | None]] = {
        "x_embedder.proj.weight": [R, all_, all_, all_], "x_embedder.proj.bias": [R],
        "t_embedder.mlp.0.weight": [R, all_], "t_embedder.mlp.0.bias": [R],
        "t_embedder.mlp.2.weight": [R, R], "t_embedder.mlp.2.bias": [R],
        "y_embedder.embedding_table.weight": [all_, R],
        "pos_embed": [all_, all_, R],
        "attn.qkv.weight": [sel.stacked(sel.attention, 3), R], "attn.qkv.bias": [sel.stacked(sel.attention, 3)],
        "attn.proj.weight": [R, sel.attention], "attn.proj.bias": [R],
        "mlp.fc1.weight": [sel.mlp, R], "mlp.fc1.bias": [sel.mlp],
        "mlp.fc2.weight": [R, sel.mlp], "mlp.fc2.bias": [R],
        "final_layer.adaLN_modulation.1.weight": [sel.stacked(R, 2), R],
        "final_layer.adaLN_modulation.1.bias": [sel.stacked(R, 2)],
        "final_layer.linear.weight": [all_, R], "final_layer.linear.bias": [all_],
    }
    block_key = re.sub(r"^blocks\.\d+\.", "", key)
    if block_key != key and block_key.startswith("adaLN_modulation.1."):
        return [sel.stacked(R, 6), R] if block_key.endswith("weight") else [sel.stacked(R, 6)]
    rule = rules.get(block_key if block_key != key else key)
    if rule is None:
        raise MethodError(f"weight_selection has no selection rule for the DiT tensor {key!r}")
    return rule


def select(tensor: torch.Tensor, rule: list[torch.Tensor | None]) -> torch.Tensor:
    """``tensor`` restricted to the indices of ``rule`` along each dimension."""
    if len(rule) != tensor.ndim:
        raise MethodError(f"selection rule of {len(rule)} dims for a tensor of shape {tuple(tensor.shape)}")
    for dim, index in enumerate(rule):
        if index is not None:
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor


class WeightSelectionMethod(DenseMethod):
    """Initialise a smaller DiT (fewer blocks, narrower) from a subset of a dense ancestry's weights."""

    family = "init"

    name = "weight_selection"
    Config = WeightSelectionConfig
    # Same size is the identity selection (full fine-tuning); the method exists for smaller descendants.
    stages = frozenset({"descend"})
    ancestry_methods = DENSE_METHODS

    def build(self, arch: ArchSpec, task: Task, ancestry: Export | None) -> DiT:
        ancestry, source, target = check_size_ancestry(self, ancestry, arch, task, same_width=False)
        if target.depth > source.depth or target.hidden_size > source.hidden_size:
            raise MethodError(f"weight_selection initialises a smaller model: {arch.name} (depth {target.depth}, "
                              f"width {target.hidden_size}) is larger than {ancestry.arch.name} (depth "
                              f"{source.depth}, width {source.hidden_size})")
        cfg = self.config
        model = arch.build(task.num_classes)
        sel = make_selection(source, target, cfg, mlp_ratio=model.blocks[0].mlp.fc1.out_features / target.hidden_size)
        self.selection = sel

        def selector(prefix: str):
            return lambda suffix, tensor: select(tensor, rule_for(f"{prefix}.{suffix}" if suffix else prefix, sel))

        for slot, block in enumerate(sel.blocks.tolist()):
            copy_prefix(model, ancestry.state, f"blocks.{block}", f"blocks.{slot}", selector(f"blocks.{slot}"))
        outer = [m for m in ("x_embedder", "t_embedder", "y_embedder", "final_layer") if m not in cfg.reinit]
        outer += ["pos_embed"] if cfg.pos_embed == "select" else []
        for module in outer:
            copy_prefix(model, ancestry.state, module, module, selector(module))
        return model

    def new_param_names(self, model: nn.Module) -> set[str]:
        fresh = list(self.config.reinit) + (["pos_embed"] if self.config.pos_embed == "fresh" else [])
        return param_names_under(model, fresh)
