"""KIND's configuration: every point the paper leaves open (docs/methods.md §2) as an option, with our default.

Options read as ``method.options`` in a run config (unknown keys are errors). "[ours: ...]" marks a default we chose
where the paper (or what was available of it) is silent; "[ours]" alone marks an implementation choice of ours.
Section numbers (§) in these docstrings refer to docs/methods.md, which discusses each choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from kind.gate import GATE_POLICIES, NULL_GATES, TAILOR_COMPUTE
from methods.base import MethodConfig, MethodError
from methods.surgery import check_reinit_names

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ADALN = "adaLN_modulation.1"
RANK_PRESETS = ("paper", "full")


def paper_ranks(width: int) -> tuple[int, int]:
    """(N_G, N_T) of the ``paper`` preset for a DiT of hidden size ``width``.

    KIND (ICML 2025, abstract) states 45.4M trainable parameters on DiT-L/2 and a saving of at least 35.4 GFLOPs;
    its hyper-parameter table is unavailable. Our accounting (``bench.models.accounting``, DiT's convention: forward
    GMACs of one image) pins both down on DiT-L/2 (d = 1024, 24 blocks, 256 tokens, q, k, v, o, fc1, fc2 decomposed,
    adaLN not):

    * trainable downstream = N_T tailors x 442,512 parameters each (u, sigma, v of the six matrices in 24 blocks)
      + 2.6M (461 + 1 class embeddings, final layer): 45.4M gives N_T = 96.7, so N_T = 96 = 3d/32 (45.09M, 0.7%
      below the stated figure; 97 would be 0.3% above, we keep the multiple of 16);
    * forward GMACs at total rank r = N_G + N_T: the decomposed matrices cost 24 x 256 x 18d x r MACs instead of
      24 x 256 x 12d^2; saving >= 35.4 of the dense model's 80.7 GMACs needs r <= 370, so r = 368 = 23d/64
      (45.06 GMACs, a saving of 35.63), and N_G = 272.

    The same fractions of the width give the preset at every size (DiT-B/2: 204 + 72).
    """
    n_tailors = max(1, round(3 * width / 32))
    return max(1, round(23 * width / 64) - n_tailors), n_tailors


def full_ranks(width: int) -> tuple[int, int]:
    """(N_G, N_T) of the ``full`` preset: d/2 each, N_G + N_T = d (full rank for d x d matrices)."""
    return width // 2, width // 2


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MethodError(f"kind {name} must be one of {choices}, got {value!r}")


def _optional_count(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise MethodError(f"kind {name} must be None or an int >= {minimum}, got {value!r}")


@dataclass
class KindConfig(MethodConfig):
    """KIND (Xie et al., ICML 2025): SVD-structured DiT whose components are learngenes and class-gated tailors."""

    # ---- structure (ancestry; downstream stages must agree with the ancestry) --------------------------------
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Block Linears decomposed: q, k, v (fused ``attn.qkv``, split by ``split_qkv``), o, fc1, fc2
    [ours: DivControl's set, §2.2]."""
    decompose_adaln: bool = False
    """Also decompose each block's ``adaLN_modulation.1`` (FINE style) [ours: off, §2.2]."""
    split_qkv: bool = True
    """Decompose q, k and v as three matrices inside ``attn.qkv`` (DivControl's S); False keeps qkv fused
    [§2.2]."""
    ranks: str = "paper"
    """(N_G, N_T) of the ancestry when ``n_learngenes`` / ``n_tailors`` are unset, as a fraction of the width d.
    ``paper``: N_T = round(3d/32), N_G = round(23d/64) - N_T (272 + 96 on DiT-L/2, 204 + 72 on DiT-B/2): the
    setting that meets KIND's stated 45.4M trainable parameters on DiT-L/2 (461 novel classes) and its saving of
    at least 35.4 GFLOPs, with the downstream model run factorised at rank N_G + N_T (derivation:
    ``paper_ranks`` and docs/methods.md §2.4). ``full``: N_G = N_T = d/2, full rank for d x d matrices (our
    earlier default, kept as an ablation). Downstream stages take the ancestry's ranks whatever this says."""
    n_learngenes: int | None = None
    """N_G, learngene components per matrix. None: from ``ranks`` in the ancestry, the ancestry's value downstream
    [ours, §2.4]."""
    n_tailors: int | None = None
    """N_T, tailor components per matrix. None: from ``ranks`` in the ancestry; downstream the ancestry's value
    (the ``domain`` stage's fresh tailors too: its N_T, or the N_T its learngenes file records; an error when
    neither is known) [ours: KIND's Table 6 is unavailable, §2.4]."""

    # ---- class gate (ancestry) ------------------------------------------------------------------------------
    gate: str = "random"
    """``random``: fixed seeded subset per class; ``disjoint``: one block of tailors per class; ``none``: no gate,
    every tailor always on (the gate-off ablation) [ours, §2.5]."""
    gate_active: int | None = None
    """K_act, tailors on per class under ``random``. None: N_T / 2 (DivControl's 288 of 576) [ours, §2.5]."""
    gate_seed: int = 0
    """Seed of the ``random`` gate (the mask of class c depends only on the seed and c) [ours]."""
    class_groups: tuple[int, ...] = ()
    """Optional class -> gate-group list (e.g. WordNet superclasses): classes of a group share one mask; empty means
    one group per class [an alternative in §2.5]."""
    null_gate: str = "learngenes"
    """Gate of the CFG null class: ``learngenes`` (every tailor off), ``all`` or ``random`` (its own mask)
    [ours, §2.5]."""
    tailor_compute: str = "auto"
    """How gated layers evaluate tailors; every value gives the same outputs and gradients, only speed and memory
    differ. ``masked``: every tailor for every sample, inactive ones zeroed in rank space (r(m+n) MACs per token,
    large GEMMs); ``grouped``: samples grouped by gate row, only each group's active tailors computed
    ((N_G + K_act)(m+n) MACs per token, one small matmul pair per group and layer); ``auto``: ``grouped`` on a
    CPU for samples of at least 65,536 values (DiT-B/2 at 256 px), where it measured faster, ``masked`` on a GPU,
    where per-group launches would dominate, and for smaller samples, whose groups are too small for the BLAS
    (kind/README.md, "Cost") [ours: an implementation choice, not a modelling one]."""
    ortho_reg: float = 0.0
    """Weight of sum ||U^T U - I||^2 + ||V^T V - I||^2 over decomposed matrices, added as ``extra_loss``
    [ours: 0, §2.3]."""

    # ---- downstream (transfer / domain / descend) -------------------------------------------------------------
    reinit: tuple[str, ...] = ("y_embedder",)
    """Modules re-initialised and trained in full: the new label space's class embeddings [ours, §2.8]."""
    train_modules: tuple[str, ...] = ("final_layer",)
    """Modules inherited from the ancestry and trained in full downstream (the final layer) [ours, §2.8]."""
    train_learngene_sigma: bool = False
    """Also train the learngenes' sigma downstream (U and V stay frozen) [an option in §2.8]."""
    train_dense: bool = False
    """Also train every parameter outside the decomposed matrices downstream (adaLN, embedders, biases); our
    default keeps them frozen; true is the reading "everything outside the decomposed matrices is trained"
    [an alternative in §2.8]."""
    transfer_gate: str = "none"
    """Stage ``transfer``: ``none`` runs every tailor for every new class (merge exact for all classes) [ours, §2.8];
    ``classes`` gates the new classes with the same policy, one mask per new class."""
    domain_tailors: str = "fresh"
    """Stage ``domain``: ``fresh`` tailors (SVD components N_G..N_G+N_T-1 of a freshly initialised DiT)
    [ours, §2.8], or ``inherit`` the pre-trained ones (whole-model transfer, the ablation KIND argues against)."""
    domain_dense: str = "inherit"
    """Stage ``domain``: ``inherit`` the ancestry's non-decomposed parameters [ours: as in ``transfer``], or
    ``fresh`` (DiT's init: strictly learngenes only; needs ``train_dense``) [the abstract read literally]."""
    descend_depth: int | None = None
    """Stage ``descend``: number of blocks of the deployed model (None: the requested flavour's depth) [ours]."""
    descend_blocks: str = "first"
    """Stage ``descend``: which ancestry blocks a shallower model keeps: ``first`` k, or ``even`` (evenly spaced,
    first and last included) [ours]."""
    descend_tailors: int | None = None
    """Stage ``descend``: tailors kept per matrix (0 = learngenes only). None: K_act = N_T / 2 [ours]."""
    descend_select: str = "norm"
    """Stage ``descend``: which tailors to keep per matrix: ``norm`` (largest |sigma| ||u|| ||v||), ``index``
    (lowest indices, i.e. largest initial singular values), ``classes`` (union of the ancestry gates of
    ``descend_classes``) [ours]."""
    descend_classes: tuple[int, ...] = ()
    """Ancestry class ids whose tailors ``descend_select = classes`` keeps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.class_groups = tuple(self.class_groups)
        self.train_modules = tuple(self.train_modules)
        self.descend_classes = tuple(self.descend_classes)
        if not self.targets:
            raise MethodError("kind needs at least one target Linear")
        if ADALN in self.targets:
            raise MethodError(f"put adaLN in kind through decompose_adaln = true, not in targets ({ADALN!r})")
        _optional_count("n_learngenes", self.n_learngenes, 1)
        _optional_count("n_tailors", self.n_tailors, 1)
        _optional_count("gate_active", self.gate_active, 1)
        _optional_count("descend_depth", self.descend_depth, 1)
        _optional_count("descend_tailors", self.descend_tailors, 0)
        _choice("ranks", self.ranks, RANK_PRESETS)
        _choice("gate", self.gate, GATE_POLICIES)
        _choice("null_gate", self.null_gate, NULL_GATES)
        _choice("tailor_compute", self.tailor_compute, TAILOR_COMPUTE)
        _choice("transfer_gate", self.transfer_gate, ("none", "classes"))
        _choice("domain_tailors", self.domain_tailors, ("fresh", "inherit"))
        _choice("domain_dense", self.domain_dense, ("inherit", "fresh"))
        _choice("descend_blocks", self.descend_blocks, ("first", "even"))
        _choice("descend_select", self.descend_select, ("norm", "index", "classes"))
        if not self.ortho_reg >= 0:
            raise MethodError(f"kind ortho_reg must be >= 0, got {self.ortho_reg!r}")
        if self.domain_dense == "fresh" and not self.train_dense:
            raise MethodError("kind domain_dense = 'fresh' leaves DiT's zero-initialised adaLN frozen (every block "
                              "the identity); set train_dense = true with it")
        if self.descend_select == "classes" and not self.descend_classes:
            raise MethodError("kind descend_select = 'classes' needs descend_classes (ancestry class ids)")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.descend_classes):
            raise MethodError("kind descend_classes must be non-negative class ids")
        check_reinit_names(self.reinit)

    def ancestry_ranks(self, width: int) -> tuple[int, int]:
        """(N_G, N_T) an ancestry of hidden size ``width`` is built with: the explicit counts, else ``ranks``."""
        preset = paper_ranks(width) if self.ranks == "paper" else full_ranks(width)
        return self.n_learngenes or preset[0], self.n_tailors or preset[1]

    @property
    def all_targets(self) -> tuple[str, ...]:
        """The decomposed Linears, adaLN included when ``decompose_adaln``."""
        return self.targets + ((ADALN,) if self.decompose_adaln else ())


@dataclass
class KindNoGateConfig(KindConfig):
    """Ablation: pre-training without the class gate (every tailor always on)."""

    gate: str = "none"
    """``none``: every tailor is trained by every class, so nothing is diverted."""


@dataclass
class KindFullTransferConfig(KindConfig):
    """Ablation: the ``domain`` stage transfers the whole pre-trained model (learngenes and tailors)."""

    domain_tailors: str = "inherit"
    """``inherit``: the pre-trained tailors replace the fresh ones of learngene-only transfer."""
