"""KIND's class gate: which tailor components each class switches on, and how each sample's gate reaches the layers.

The gate is a fixed binary table ``(rows, N_T)``: row ``c`` says which tailors class ``c`` uses; the last row is the
null class of classifier-free guidance when the DiT has one. Learngenes are always on. The table is shared by every
decomposed layer and matrix type (docs/methods.md §2.5, inferred from DivControl). Policies (our defaults, ibid.):

* ``random`` (default): a fixed seeded subset of ``active`` tailors per gate group (default ``N_T / 2``, the
  288-of-576 ratio of DivControl); the subset of group ``g`` depends only on ``(seed, g)``, not on how many classes
  there are.
* ``disjoint``: the tailors are split into equal contiguous blocks, one per gate group (needs ``N_T >= groups``).
* gate groups default to one per class; ``class_groups`` (a class -> group list, e.g. WordNet superclasses) makes
  classes of one group share a mask.
* null row: ``learngenes`` (all tailors off, default), ``all`` (all on) or ``random`` (its own random subset, as an
  extra group).

A gate must follow each sample's *effective* label, i.e. after label dropout, ``force_drop_ids`` and the null ids
of ``forward_with_cfg``. DiT applies all of those inside ``LabelEmbedder`` and then looks the label up in
``y_embedder.embedding_table``; ``GateEmbedding`` replaces that table (same weight Parameter, same module path) and,
on every lookup, records the looked-up labels' rank-space masks in a ``GateContext`` that the decomposed layers of
the same model read later in the same forward. The surgery lives inside the module tree, so DDP/DeepSpeed wrappers,
``torch.func.functional_call`` and deep copies carry it along; the table is a buffer, so ZeRO-3 (which partitions
only parameters) leaves it whole.

The context also groups the samples of a forward by gate row (``TailorGroups``), once per forward, for the layers'
``grouped`` tailor compute, which evaluates only each group's active tailors (``TAILOR_COMPUTE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

GATE_POLICIES = ("random", "disjoint", "none")
NULL_GATES = ("learngenes", "all", "random")
#: How a gated layer evaluates its tailors: ``masked`` computes every tailor for every sample and zeroes the inactive
#: ones in rank space; ``grouped`` groups the samples by gate row and computes only each group's active tailors;
#: ``auto`` is ``grouped`` on a CPU for samples of at least ``GROUPED_MIN_SAMPLE_SIZE`` values and ``masked``
#: otherwise, decided per forward by the input. All give the same outputs and gradients; kind/README.md ("Cost")
#: says which is faster where and why.
TAILOR_COMPUTE = ("auto", "masked", "grouped")
#: The smallest sample (tokens x width of a layer's input) for which ``auto`` groups on a CPU. Measured on a 2-core
#: CPU: grouping wins at DiT-B/2 on 256 px images (256 tokens x 768 = 196,608 values a sample; 1.29x dense against
#: masked 1.39x) and loses at every embedded shape (DiT-S/2 at 16 px: 64 x 384 = 24,576, masked 1.49x against
#: grouped 1.66x; DiT-T/2-d4 at 16 px batch 64: 4,096, masked 1.42x against 2.83x), where a group's matmuls are too
#: small for the BLAS (results/benchmarks/kind_layer_*.md).
GROUPED_MIN_SAMPLE_SIZE = 65_536
#: Multiplier that makes the per-group seeds of ``random`` gates independent of each other.
_SEED_STRIDE = 1_000_003


def gate_groups(num_classes: int, class_groups: Sequence[int] = ()) -> list[int]:
    """Gate group of every class: ``class_groups`` when given (one int per class), else one group per class."""
    if not class_groups:
        return list(range(num_classes))
    groups = list(class_groups)
    if len(groups) != num_classes:
        raise ValueError(f"class_groups lists {len(groups)} classes but the model has {num_classes}")
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in groups):
        raise ValueError("class_groups must hold non-negative int group ids, one per class")
    return groups


def random_subset(n_tailors: int, active: int, seed: int, group: int) -> torch.Tensor:
    """The sorted tailor indices of group ``group`` under the ``random`` policy (CPU generator: portable)."""
    generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + group)
    return torch.randperm(n_tailors, generator=generator)[:active].sort().values


def build_gate_table(policy: str, num_classes: int, n_tailors: int, *, active: int | None = None, seed: int = 0,
                     class_groups: Sequence[int] = (), null: str = "learngenes",
                     null_row: bool = True) -> torch.Tensor:
    """The float {0, 1} gate table ``(num_classes + null_row, n_tailors)`` of ``policy`` (see the module doc)."""
    if policy not in GATE_POLICIES:
        raise ValueError(f"gate policy must be one of {GATE_POLICIES}, got {policy!r}")
    if null not in NULL_GATES:
        raise ValueError(f"null gate must be one of {NULL_GATES}, got {null!r}")
    if n_tailors < 1:
        raise ValueError(f"a class gate needs at least one tailor, got n_tailors={n_tailors}")
    active = n_tailors // 2 if active is None else active
    if not 1 <= active <= n_tailors:
        raise ValueError(f"gate_active must be in [1, {n_tailors}] (the number of tailors), got {active}")
    groups = gate_groups(num_classes, class_groups)
    n_groups = max(groups) + 1 if groups else 0
    table = torch.zeros(num_classes + int(null_row), n_tailors)
    if policy == "none":
        return table.fill_(1.0)
    if policy == "disjoint":
        if n_tailors < n_groups:
            raise ValueError(f"gate 'disjoint' needs at least one tailor per gate group: {n_groups} groups but "
                             f"n_tailors={n_tailors}")
        blocks = torch.tensor_split(torch.arange(n_tailors), n_groups)
        for cls, group in enumerate(groups):
            table[cls, blocks[group]] = 1.0
    else:
        for cls, group in enumerate(groups):
            table[cls, random_subset(n_tailors, active, seed, group)] = 1.0
    if null_row:
        if null == "all":
            table[-1] = 1.0
        elif null == "random":
            table[-1, random_subset(n_tailors, active, seed, n_groups)] = 1.0
    return table


@dataclass(frozen=True)
class TailorGroups:
    """The samples of one forward grouped by gate row, for evaluating only the active tailors of each group.

    Only groups with at least one active tailor are listed (samples whose gate switches every tailor off, like the
    default null class, need their learngenes only). Group ``i`` holds the samples ``samples[i]`` (ascending batch
    indices) and uses ``sizes[i]`` tailors: the next ``sizes[i]`` entries of ``tailor_index`` (indices into N_T,
    group after group, ascending within a group).
    """

    samples: tuple[tuple[int, ...], ...]
    tailor_index: torch.Tensor
    sizes: tuple[int, ...]

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> TailorGroups | None:
        """Group the (batch, N_T) tailor gates ``rows``; None when a row is not binary (only a {0, 1} gate can skip
        tailors exactly) or the rows hold no real values (meta tensors: FLOP counting sees the masked compute)."""
        if rows.device.type == "meta" or not bool(((rows == 0) | (rows == 1)).all()):
            return None
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        on = unique != 0
        active = on.sum(1).tolist()
        keep = [g for g, n in enumerate(active) if n > 0]
        members: dict[int, list[int]] = {g: [] for g in keep}
        for sample, group in enumerate(inverse.tolist()):
            if group in members:
                members[group].append(sample)
        tailor_index = on[keep].nonzero()[:, 1]  # row-major: group after group, ascending tailors within a group
        return cls(tuple(tuple(members[g]) for g in keep), tailor_index, tuple(active[g] for g in keep))


class GateContext:
    """Hands each sample's rank-space mask from the label embedding to the decomposed layers of one forward.

    Masks are kept per device, so replicas of one model on several devices (``nn.DataParallel``) do not overwrite
    each other. A layer reading the context checks that the recorded batch matches its input, so a layer called
    outside a DiT forward (or after a forward of another batch size) fails loudly instead of using a stale gate.
    ``tailor_compute`` (one of ``TAILOR_COMPUTE``) is shared by every layer the context gates.
    """

    def __init__(self, tailor_compute: str = "auto") -> None:
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._groups: dict[torch.device, TailorGroups | None] = {}
        self.tailor_compute = tailor_compute

    @property
    def tailor_compute(self) -> str:
        return self._tailor_compute

    @tailor_compute.setter
    def tailor_compute(self, value: str) -> None:
        if value not in TAILOR_COMPUTE:
            raise ValueError(f"tailor_compute must be one of {TAILOR_COMPUTE}, got {value!r}")
        self._tailor_compute = value

    def record(self, mask: torch.Tensor) -> None:
        self._masks[mask.device] = mask
        self._groups.pop(mask.device, None)  # grouped lazily, once per forward, by the first layer that asks

    def grouped(self, x: torch.Tensor) -> bool:
        """Whether a layer evaluates only each gate group's active tailors on its input ``x`` (batch first). ``auto``
        groups on CPUs only, and only samples of at least ``GROUPED_MIN_SAMPLE_SIZE`` values: per-group matmuls are
        cheap to launch on a CPU but need large groups to run at BLAS speed, while on a GPU a batch of ~100
        distinct classes would launch ~100 small kernels per layer (kind/README.md, "Cost")."""
        if self.tailor_compute == "auto":
            return x.device.type == "cpu" and x[0].numel() >= GROUPED_MIN_SAMPLE_SIZE
        return self.tailor_compute == "grouped"

    def tailor_groups(self, x: torch.Tensor, rank: int, n_learngenes: int) -> TailorGroups | None:
        """The recorded forward's samples grouped by tailor gate (None: this gate cannot be grouped)."""
        mask = self.rank_mask(x, rank)
        if mask.device not in self._groups:
            self._groups[mask.device] = TailorGroups.from_rows(mask[:, n_learngenes:].detach())
        return self._groups[mask.device]

    def rank_mask(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """The (batch, rank) mask recorded for the forward ``x`` belongs to."""
        mask = self._masks.get(x.device)
        if mask is None:
            raise RuntimeError("KIND gate: no class gate was recorded on this device; gated KIND layers must run "
                               "inside the DiT forward (its y_embedder records each sample's gate)")
        if mask.shape[0] != x.shape[0] or mask.shape[1] != rank:
            raise RuntimeError(f"KIND gate: the recorded gate has shape {tuple(mask.shape)} but this layer needs "
                               f"({x.shape[0]}, {rank}); was the layer called outside its DiT's forward?")
        return mask


def _settings(table: nn.Embedding) -> dict:
    return {name: getattr(table, name) for name in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                                                     "sparse")}


class GateEmbedding(nn.Embedding):
    """DiT's class-embedding table that also records the class gate of every label it embeds.

    Shares the original table's weight Parameter, so parameter names (``y_embedder.embedding_table.weight``) and
    values are unchanged. Buffer ``kind_gate`` is the (rows, N_T) tailor table; the recorded rank-space mask
    prepends ``n_learngenes`` ones (learngenes are always on).
    """

    def __init__(self, table: nn.Embedding, gate: torch.Tensor, n_learngenes: int, context: GateContext):
        super().__init__(table.num_embeddings, table.embedding_dim, **_settings(table), device="meta")
        if gate.ndim != 2 or gate.shape[0] != table.num_embeddings:
            raise ValueError(f"gate table of shape {tuple(gate.shape)} does not fit a class table with "
                             f"{table.num_embeddings} rows")
        self.weight = table.weight
        self.register_buffer("kind_gate", gate.to(device=table.weight.device, dtype=table.weight.dtype))
        self.n_learngenes = n_learngenes
        self.context = context

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        tailors = self.kind_gate[labels]
        learngenes = tailors.new_ones(*tailors.shape[:-1], self.n_learngenes)
        self.context.record(torch.cat([learngenes, tailors], dim=-1))
        return super().forward(labels)

    def to_embedding(self) -> nn.Embedding:
        """A plain nn.Embedding holding the same weight Parameter (the gate is dropped)."""
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, **_settings(self), device="meta")
        plain.weight = self.weight
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tailors={self.kind_gate.shape[1]}, learngenes={self.n_learngenes}"
