"""KIND's decomposed DiT: module surgery that turns target Linears into learngene + tailor components.

Every target Linear inside ``blocks.N`` becomes a ``KindLinear``: a ``methods.decomposed.DecomposedLinear`` with two
component groups, ``kind_learngene`` (components [0, N_G), the top-N_G SVD directions at init) and ``kind_tailor``
([N_G, N_G + N_T)), plus the dense bias. With ``split_qkv`` the fused ``attn.qkv`` becomes a
``SplitDecomposedLinear`` whose parts ``q``, ``k``, ``v`` are KindLinears, so every path keeps DiT's name
(``blocks.3.attn.qkv.q.kind_tailor_U``). ``install_gate`` adds the class gate (``kind.gate``); a model without one
runs every tailor for every sample. ``merge_to_dit`` folds everything back into a plain DiT for one gate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from kind.gate import GateContext, GateEmbedding, TailorGroups
from methods.base import MethodError
from methods.decomposed import DecomposedLinear, SplitDecomposedLinear
from methods.surgery import find_linears, set_submodule

LEARNGENE = "kind_learngene"
TAILOR = "kind_tailor"
QKV_PARTS = ("q", "k", "v")
QKV = "attn.qkv"
#: Where the class table lives in a DiT (the module ``GateEmbedding`` replaces).
CLASS_TABLE = "y_embedder.embedding_table"


class KindLinear(DecomposedLinear):
    """One decomposed matrix: learngenes always on, tailors scaled per sample by the class gate (if installed)."""

    def __init__(self, in_features: int, out_features: int, n_learngenes: int, n_tailors: int, *,
                 bias: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, {LEARNGENE: n_learngenes, TAILOR: n_tailors}, bias=bias,
                         device=device, dtype=dtype)
        self.kind_gate_context: GateContext | None = None

    @property
    def n_learngenes(self) -> int:
        return self.group_size(LEARNGENE)

    @property
    def n_tailors(self) -> int:
        return self.group_size(TAILOR)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = self.kind_gate_context
        if context is not None and mask is None and context.grouped(x):
            groups = context.tailor_groups(x, self.rank, self.n_learngenes)
            if groups is not None:
                return self._grouped_forward(x, groups)
        if context is not None:
            gate = context.rank_mask(x, self.rank)
            mask = gate if mask is None else gate * mask
        return super().forward(x, mask)

    def _grouped_forward(self, x: torch.Tensor, groups: TailorGroups) -> torch.Tensor:
        """The gated output computing only active tailors: (N_G + K_act)(m + n) MACs per token instead of r(m + n).

        The learngenes run once over the whole batch. The active tailor components of every group are gathered
        once per layer (one ``index_select`` per factor, split per group): the backward scatters into the full
        factors, so an inactive tailor gets an exact zero gradient, as under the mask. Each group's samples are
        projected through its own components only; the tailor outputs are stacked in batch order (zeros for
        samples with no active tailor) and added to the learngene output.
        """
        hidden = torch.matmul(x, self.kind_learngene_V)
        out = F.linear(hidden * self.kind_learngene_sigma.to(hidden.dtype), self.kind_learngene_U, self.bias)
        u, sigma, v = self.kind_tailor_U, self.kind_tailor_sigma, self.kind_tailor_V
        if not groups.sizes:
            # No sample uses a tailor. Keep them in the graph through empty slices (an exact 0.0) so that their
            # gradient is a zero tensor, as under the mask, not None: AdamW then still applies its momentum to
            # them, and DDP does not see unused parameters.
            return out + sum(p.view(-1)[:0].sum() for p in (u, sigma, v)).to(out.dtype)
        index = groups.tailor_index
        # One column gather per factor for all groups together (its backward is one index_add per factor, however
        # many groups there are), then split into per-group column blocks (views).
        v_cols = v.index_select(1, index).split(groups.sizes, dim=1)
        u_cols = u.index_select(1, index).split(groups.sizes, dim=1)
        scales = sigma.index_select(0, index).split(groups.sizes)
        # split/unbind/stack/cat rather than indexing: their backwards are one cat/stack each, where every
        # indexed view would allocate and accumulate a zero gradient of the whole activation.
        per_sample = x.split(1)
        tailored: list[torch.Tensor | None] = [None] * x.shape[0]
        for samples, v_k, u_k, s_k in zip(groups.samples, v_cols, u_cols, scales):
            # A group's samples share one matmul pair.
            xs = per_sample[samples[0]] if len(samples) == 1 else torch.cat([per_sample[i] for i in samples])
            projected = torch.matmul(xs, v_k)
            part = F.linear(projected * s_k.to(projected.dtype), u_k)
            for sample, row in zip(samples, part.unbind(0)):
                tailored[sample] = row
        if any(t is None for t in tailored):
            zero = out.new_zeros(out.shape[1:])
            tailored = [zero if t is None else t for t in tailored]
        return out + torch.stack(tailored).to(out.dtype)


# --------------------------------------------------------------------------------------------------------------
#                                                   Surgery
# --------------------------------------------------------------------------------------------------------------


def block_linears(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The Linears inside ``blocks.*`` matched by ``targets`` (suffixes). KIND decomposes only block matrices, so
    ``adaLN_modulation.1`` means the blocks' modulation, never the final layer's; a target matching no block
    Linear is an error."""
    targets = tuple(targets)
    found = find_linears(model, targets)  # raises for a target that matches nothing at all
    inside = {name: linear for name, linear in found.items() if name.startswith("blocks.")}
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in inside):
            raise MethodError(f"kind target {target!r} matches no Linear inside the DiT blocks; KIND decomposes "
                              f"block matrices only (attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1)")
    return inside


def decompose_dit(model: nn.Module, targets: Iterable[str], n_learngenes: int, n_tailors: int, *,
                  split_qkv: bool = True, svd_init: bool = True) -> list[str]:
    """Replace the target block Linears of ``model`` by KIND layers, in place; returns the replaced paths.

    ``svd_init`` initialises the factors from the SVD of each (freshly DiT-initialised) weight, components in
    descending singular value; without it the factors are zero and must be loaded afterwards (a downstream build
    that loads every component skips the SVDs).
    """
    linears = block_linears(model, targets)
    rank = n_learngenes + n_tailors
    for name, linear in linears.items():
        rows = linear.out_features // 3 if split_qkv and name.endswith(QKV) else linear.out_features
        if rank > min(rows, linear.in_features):
            raise MethodError(f"n_learngenes + n_tailors = {rank} exceeds the rank of {name} "
                              f"({rows} x {linear.in_features}); lower n_learngenes or n_tailors")
    for name, linear in linears.items():
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        if split_qkv and name.endswith(QKV):
            def make_part(n_in: int, n_out: int) -> KindLinear:
                # called by from_linear below, within this iteration: kw is this linear's
                return KindLinear(n_in, n_out, n_learngenes, n_tailors, bias=False, **kw)  # noqa: B023

            layer: nn.Module = SplitDecomposedLinear.from_linear(linear, QKV_PARTS, make_part, svd_init=svd_init)
        else:
            layer = KindLinear(linear.in_features, linear.out_features, n_learngenes, n_tailors,
                               bias=linear.bias is not None, **kw)
            if svd_init:
                layer.load_svd(linear.weight, linear.bias)
            elif linear.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(linear.bias)
        set_submodule(model, name, layer)
    return list(linears)


def kind_layers(model: nn.Module) -> dict[str, KindLinear]:
    """Every KindLinear (q/k/v parts included) by qualified name, found by type."""
    return {name: module for name, module in model.named_modules() if isinstance(module, KindLinear)}


def decomposed_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that replaced a DiT Linear (KindLinear or a split of KindLinears), by path."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside_split = any(name.startswith(prefix + ".") for prefix in found)
        if isinstance(module, SplitDecomposedLinear) or (isinstance(module, KindLinear) and not inside_split):
            found[name] = module
    return found


def kind_ranks(model: nn.Module) -> tuple[int, int]:
    """``(N_G, N_T)`` of a KIND model (the same in every layer); a model without KIND layers is an error."""
    layers = list(kind_layers(model).values())
    if not layers:
        raise MethodError(f"{type(model).__name__} has no KIND layers; build it with the kind method")
    ranks = {(layer.n_learngenes, layer.n_tailors) for layer in layers}
    if len(ranks) != 1:
        raise MethodError(f"KIND layers disagree on (N_G, N_T): {sorted(ranks)}")
    return ranks.pop()


# --------------------------------------------------------------------------------------------------------------
#                                                 Class gate
# --------------------------------------------------------------------------------------------------------------


def install_gate(model: nn.Module, table: torch.Tensor, tailor_compute: str | None = None) -> GateContext:
    """Gate ``model``'s KIND layers by class with the (rows, N_T) {0, 1} ``table``; returns the shared context.

    ``tailor_compute`` (``kind.gate.TAILOR_COMPUTE``) says how the layers evaluate tailors; every choice computes
    the same outputs and gradients (``set_tailor_compute`` changes it later). None keeps the choice of a gate
    already installed, else ``masked``."""
    n_learngenes, n_tailors = kind_ranks(model)
    if table.shape[1] != n_tailors:
        raise MethodError(f"gate table has {table.shape[1]} tailor columns but the model's layers have {n_tailors}")
    current = model.get_submodule(CLASS_TABLE)
    if tailor_compute is None:
        tailor_compute = current.context.tailor_compute if isinstance(current, GateEmbedding) else "auto"
    try:
        context = GateContext(tailor_compute)
    except ValueError as err:
        raise MethodError(f"kind {err}") from None
    plain = current.to_embedding() if isinstance(current, GateEmbedding) else current
    set_submodule(model, CLASS_TABLE, GateEmbedding(plain, table, n_learngenes, context))
    for layer in kind_layers(model).values():
        layer.kind_gate_context = context
    return context


def set_tailor_compute(model: nn.Module, tailor_compute: str) -> None:
    """Switch a gated model's tailor compute (``kind.gate.TAILOR_COMPUTE``); an ungated model is an error."""
    table = model.get_submodule(CLASS_TABLE)
    if not isinstance(table, GateEmbedding):
        raise MethodError("this KIND model has no class gate: every tailor is on for every sample, so there is no "
                          "tailor compute to choose")
    try:
        table.context.tailor_compute = tailor_compute
    except ValueError as err:
        raise MethodError(f"kind {err}") from None


def gate_table(model: nn.Module) -> torch.Tensor | None:
    """The installed (rows, N_T) gate table, or None when every tailor is always on."""
    table = model.get_submodule(CLASS_TABLE)
    return table.kind_gate if isinstance(table, GateEmbedding) else None


def remove_gate(model: nn.Module) -> None:
    """Undo ``install_gate``: a plain class table, and every tailor on for every sample."""
    table = model.get_submodule(CLASS_TABLE)
    if isinstance(table, GateEmbedding):
        set_submodule(model, CLASS_TABLE, table.to_embedding())
    for layer in kind_layers(model).values():
        layer.kind_gate_context = None


# --------------------------------------------------------------------------------------------------------------
#                                                   Merging
# --------------------------------------------------------------------------------------------------------------


def tailor_mask_for(model: nn.Module, gate: int | str | torch.Tensor | None) -> torch.Tensor | None:
    """The (N_T,) tailor mask a merge uses: None/'all' (every tailor), 'learngenes' (none), 'null' (the null
    class's row), a class id (its row) or an explicit {0, 1} tensor. A gated model needs an explicit choice."""
    table = gate_table(model)
    _, n_tailors = kind_ranks(model)
    if gate is None:
        if table is not None:
            raise MethodError("this KIND model applies a class gate, so merged weights are exact for one gate only: "
                              "pass gate=<class id>, 'null', 'all' or 'learngenes' (or sample it unmerged)")
        return None
    if isinstance(gate, torch.Tensor):
        if gate.shape != (n_tailors,):
            raise MethodError(f"a merge gate tensor must have shape ({n_tailors},), got {tuple(gate.shape)}")
        return gate.detach().float().cpu()
    if gate == "all":
        return None
    if gate == "learngenes":
        return torch.zeros(n_tailors)
    if table is None:
        raise MethodError(f"merge gate {gate!r} needs a gated model; this one runs every tailor for every class")
    if gate == "null":
        embedder = model.get_submodule("y_embedder")
        if table.shape[0] == embedder.num_classes:
            raise MethodError("the model has no null class (class_dropout_prob = 0)")
        return table[-1].detach().float().cpu()
    if isinstance(gate, bool) or not isinstance(gate, int) or not 0 <= gate < table.shape[0]:
        raise MethodError(f"merge gate must be a class id in [0, {table.shape[0]}), 'null', 'all', 'learngenes' or "
                          f"a tensor; got {gate!r}")
    return table[gate].detach().float().cpu()


@torch.no_grad()
def merge_to_dit(model: nn.Module, tailor_mask: torch.Tensor | None) -> nn.Module:
    """Fold every KIND layer into a plain nn.Linear under one (N_T,) ``tailor_mask`` (None: all on), in place."""
    n_learngenes, _ = kind_ranks(model)
    for name, module in decomposed_targets(model).items():
        first = module.parts()[0] if isinstance(module, SplitDecomposedLinear) else module
        mask = None
        if tailor_mask is not None:
            ref = first.kind_learngene_U
            mask = torch.cat([torch.ones(n_learngenes), tailor_mask]).to(device=ref.device, dtype=ref.dtype)
        set_submodule(model, name, module.to_linear(mask))
    remove_gate(model)
    return model
