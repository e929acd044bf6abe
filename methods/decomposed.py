"""A Linear stored as a sum of rank-1 components, shared by every method that decomposes DiT matrices.

``DecomposedLinear`` holds ``W = U diag(sigma) V^T = sum_i sigma_i u_i v_i^T`` instead of ``W``: ``U`` is
(out_features, r), ``sigma`` (r,), ``V`` (in_features, r), so ``W`` has nn.Linear's (out, in) layout. The forward
never forms ``W``: it projects the input through ``V``, scales in rank space and projects through ``U``
(``r * (in + out)`` MACs per token instead of ``in * out``). An optional rank-space ``mask`` scales each component,
per sample when it has a batch dimension, which is how a class gate switches components on and off without ever
building a per-sample dense matrix.

Components can be split into named groups (``{"kind_learngene": 32, "kind_tailor": 32}``): each group is its own
three Parameters (``<group>_U``, ``<group>_sigma``, ``<group>_V``) so that it can be frozen, saved or replaced on
its own, while the forward still runs one matmul pair over the concatenated factors. A layer built with a plain
int rank has one unnamed group with Parameters ``U``, ``sigma`` and ``V``.

``SplitDecomposedLinear`` keeps a fused Linear's module path (DiT's ``attn.qkv``) while decomposing its row blocks
independently (q, k and v each get their own factors); its outputs are concatenated and its bias stays dense.

Both only ever touch their own parameters inside their own ``forward`` (the split layer calls its parts), so
DeepSpeed ZeRO-3, which gathers a module's parameters around that module's forward, works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from methods.surgery import plain_linear

__all__ = ["DecomposedLinear", "SplitDecomposedLinear", "factored_is_cheaper", "factored_linear", "low_rank_step_macs",
           "spread_null_directions", "svd_factors"]

_FACTORS = ("U", "sigma", "V")
LOW_RANK_PATHS = ("formed", "factored")


def low_rank_step_macs(path: str, tokens: int, out_dim: int, in_dim: int, rank: int, *, grad_spectrum: bool,
                       grad_factors: bool) -> int:
    """Multiply-accumulates of one training step (forward, and backward for what needs a gradient) of a layer
    ``W = U diag(s) Vᵀ`` on ``tokens`` input rows, by how it is evaluated:

    * ``formed``: form W (``out * r * in``, independent of the batch), run a dense matmul, and in backward the
      input gradient, the dense weight gradient and its projection onto the spectrum and/or the factors;
    * ``factored``: ``((x V) * s) Uᵀ``, ``r * (in + out)`` per token each way, no dense weight gradient.

    Layers whose factors are frozen (FINE's Σ phase, SVDiff) save the dense weight gradient by staying factored;
    layers whose factors train see a large batch amortise the forming. Elementwise work is not counted.
    """
    if path == "formed":
        macs = out_dim * rank * in_dim + 2 * tokens * out_dim * in_dim  # form W, y = x Wᵀ, dL/dx = g W
        if grad_spectrum or grad_factors:
            macs += tokens * out_dim * in_dim + out_dim * in_dim * rank  # dL/dW, then (dL/dW) V
        if grad_factors:
            macs += out_dim * in_dim * rank  # the second factor's gradient
        return macs
    if path != "factored":
        raise ValueError(f"path must be one of {LOW_RANK_PATHS}, got {path!r}")
    macs = 2 * tokens * rank * (in_dim + out_dim)  # x V then Uᵀ, and their input gradients
    if grad_factors:
        macs += tokens * rank * (in_dim + out_dim)  # dL/dU and dL/dV
    return macs


def factored_linear(x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``((x V) * scale) Uᵀ + b``: the factored path of ``low_rank_step_macs``, never forming the dense weight."""
    y = (x @ v * scale) @ u.T
    return y + bias if bias is not None else y


def factored_is_cheaper(x: torch.Tensor, out_dim: int, in_dim: int, rank: int, *, grad_spectrum: bool,
                        grad_factors: bool) -> bool:
    """Whether ``low_rank_step_macs`` favours the factored path for the input ``x`` (..., in_dim)."""
    tokens = x.numel() // in_dim if x.numel() else 0
    shape = (tokens, out_dim, in_dim, rank)
    kw = {"grad_spectrum": grad_spectrum, "grad_factors": grad_factors}
    return low_rank_step_macs("factored", *shape, **kw) < low_rank_step_macs("formed", *shape, **kw)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` SVD components of ``weight`` (m, n): ``U`` (m, rank), ``sigma`` (rank,), ``V`` (n, rank).

    Computed in float64 (so a full-rank decomposition reproduces ``weight`` to float32 precision) and returned in
    ``weight``'s dtype, components in descending order of singular value.
    """
    if weight.ndim != 2:
        raise ValueError(f"svd_factors needs a 2-D weight, got shape {tuple(weight.shape)}")
    full = min(weight.shape)
    if not 0 <= rank <= full:
        raise ValueError(f"rank {rank} is out of range for a {tuple(weight.shape)} weight (0..{full})")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    dtype = weight.dtype
    return u[:, :rank].to(dtype), s[:rank].to(dtype), vh[:rank].T.to(dtype)


def _null_components(sigma: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Boolean mask of the components whose singular value is zero at numerical precision (``matrix_rank``'s rule)."""
    top = float(sigma.abs().max()) if sigma.numel() else 0.0
    tol = top * max(shape) * torch.finfo(torch.float64 if sigma.dtype == torch.float64 else sigma.dtype).eps
    return sigma.abs() <= tol


def _orthonormal_complement(basis: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random orthonormal columns orthogonal to the orthonormal columns of ``basis`` (float64)."""
    draw = torch.randn(basis.shape[0], count, dtype=torch.float64)
    if basis.shape[1]:
        draw = draw - basis @ (basis.T @ draw)
    q, _ = torch.linalg.qr(draw)
    return q


@torch.no_grad()
def spread_null_directions(u: torch.Tensor, sigma: torch.Tensor,
                           v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD factors whose zero-singular-value components point in random directions instead of LAPACK's.

    The singular vectors of a zero singular value are arbitrary; LAPACK returns coordinate vectors. For DiT's
    zero-initialised adaLN (``decompose_adaln``), a (6d, d) zero matrix, that puts every U column on the first d
    output rows: the factors could only ever reach the first of adaLN's six modulation chunks (shift) until U
    rotated away, one sigma step at a time. Drawing those components' U and V columns as random orthonormal
    directions (orthogonal to the non-degenerate ones, global torch RNG) spreads them over every output row and
    input; sigma stays zero, so the layer still equals ``weight``. Full-rank weights are returned unchanged and draw
    no random numbers.
    """
    if sigma.device.type == "meta":  # shapes only (parameter counting): there are no values to inspect
        return u, sigma, v
    null = _null_components(sigma, (u.shape[0], v.shape[0]))
    count = int(null.sum())
    if not count:
        return u, sigma, v
    keep = ~null
    u64, v64 = u.double(), v.double()
    u64[:, null] = _orthonormal_complement(u64[:, keep], count)
    v64[:, null] = _orthonormal_complement(v64[:, keep], count)
    sigma = sigma.clone()
    sigma[null] = 0
    return u64.to(u.dtype), sigma, v64.to(v.dtype)


def _normalise_groups(rank: int | Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    if isinstance(rank, Mapping):
        groups = tuple((str(name), size) for name, size in rank.items())
        if not groups:
            raise ValueError("a DecomposedLinear needs at least one component group")
        for name, _ in groups:
            if not name.isidentifier():
                raise ValueError(f"component group name {name!r} must be a Python identifier")
    else:
        groups = (("", rank),)
    for name, size in groups:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"component group {name or 'rank'!r} must have a non-negative int size, got {size!r}")
    return groups


class DecomposedLinear(nn.Module):
    """``y = x V diag(sigma * mask) U^T + bias``: a Linear kept as rank-1 components.

    Args:
        in_features, out_features: as nn.Linear.
        rank: an int (one group; Parameters ``U``, ``sigma``, ``V``) or an ordered mapping group name -> number of
            components (Parameters ``<name>_U`` ...; components are numbered across groups in mapping order).
        bias: keep a dense bias of ``out_features``.

    A freshly constructed layer is the zero map (all factors zero); ``from_linear``/``load_svd`` initialise it from
    a dense weight.
    """

    def __init__(self, in_features: int, out_features: int, rank: int | Mapping[str, int], *, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.groups = _normalise_groups(rank)
        kw = {"device": device, "dtype": dtype}
        for group, size in self.groups:
            self.register_parameter(self.param_name(group, "U"), nn.Parameter(torch.zeros(out_features, size, **kw)))
            self.register_parameter(self.param_name(group, "sigma"), nn.Parameter(torch.zeros(size, **kw)))
            self.register_parameter(self.param_name(group, "V"), nn.Parameter(torch.zeros(in_features, size, **kw)))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    # ---- structure ------------------------------------------------------------------------------------------

    @staticmethod
    def param_name(group: str, factor: str) -> str:
        """Attribute name of one factor of one group: ``U`` for the unnamed group, ``<group>_U`` otherwise."""
        return factor if not group else f"{group}_{factor}"

    @property
    def rank(self) -> int:
        """Total number of components over all groups."""
        return sum(size for _, size in self.groups)

    def group_size(self, group: str) -> int:
        for name, size in self.groups:
            if name == group:
                return size
        raise KeyError(f"no component group {group!r} (groups: {[g for g, _ in self.groups]})")

    def group_parameters(self, group: str) -> dict[str, nn.Parameter]:
        """The three Parameters of ``group`` by attribute name (``{"<group>_U": ..., ...}``)."""
        self.group_size(group)  # validates the name
        return {self.param_name(group, f): getattr(self, self.param_name(group, f)) for f in _FACTORS}

    def group_slice(self, group: str) -> slice:
        """Where ``group``'s components sit in the concatenated rank axis."""
        start = 0
        for name, size in self.groups:
            if name == group:
                return slice(start, start + size)
            start += size
        raise KeyError(f"no component group {group!r} (groups: {[g for g, _ in self.groups]})")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U`` (out, r), ``sigma`` (r,), ``V`` (in, r), concatenated over groups in order."""
        parts = [[getattr(self, self.param_name(g, f)) for g, _ in self.groups] for f in _FACTORS]
        if len(self.groups) == 1:
            return parts[0][0], parts[1][0], parts[2][0]
        return torch.cat(parts[0], dim=1), torch.cat(parts[1]), torch.cat(parts[2], dim=1)

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g or 'rank'}={s}" for g, s in self.groups)
        return (f"in_features={self.in_features}, out_features={self.out_features}, {groups}, "
                f"bias={self.bias is not None}")

    # ---- compute --------------------------------------------------------------------------------------------

    def _scale(self, sigma: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return sigma
        r = sigma.shape[0]
        if mask.shape[-1] != r or mask.ndim not in (1, 2):
            raise ValueError(f"rank-space mask must have shape ({r},) or (batch, {r}); got {tuple(mask.shape)}")
        if mask.ndim == 1:
            return sigma * mask
        if x.ndim < 2 or mask.shape[0] != x.shape[0]:
            raise ValueError(f"per-sample mask of batch {mask.shape[0]} does not match input of shape "
                             f"{tuple(x.shape)}")
        # (B, r) -> (B, 1, ..., 1, r): one scale vector per sample, broadcast over its tokens.
        return (sigma * mask).reshape(mask.shape[0], *([1] * (x.ndim - 2)), r)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (..., in) -> (..., out); ``mask``: None, (r,) shared, or (batch, r) per sample (x.shape[0])."""
        u, sigma, v = self.factors()
        hidden = torch.matmul(x, v)
        # Cast the scale to the activations' dtype: under bf16 autocast an fp32 scale would promote the whole
        # (B, T, r) activation to fp32 before the second matmul.
        hidden = hidden * self._scale(sigma, mask, x).to(hidden.dtype)
        return F.linear(hidden, u, self.bias)

    @torch.no_grad()
    def merged_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out, in) weight ``U diag(sigma * mask) V^T`` for one shared mask (r,) or None (all on).

        Summed in float64 (on devices that have it), then cast to the factors' dtype.
        """
        u, sigma, v = self.factors()
        if mask is not None:
            if mask.shape != sigma.shape:
                raise ValueError(f"merge mask must have shape ({sigma.shape[0]},), got {tuple(mask.shape)}; a "
                                 f"merged Linear is exact for one mask only")
            sigma = sigma * mask.to(sigma)
        wide = torch.float64 if u.device.type in ("cpu", "cuda") else u.dtype
        weight = (u.to(wide) * sigma.to(wide)) @ v.to(wide).T
        return weight.to(u.dtype)

    @torch.no_grad()
    def to_linear(self, mask: torch.Tensor | None = None) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes under ``mask`` (None: every component on)."""
        return plain_linear(self.merged_weight(mask), self.bias)

    # ---- initialisation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_svd(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> DecomposedLinear:
        """Set the factors to the top-``rank`` SVD components of ``weight`` (groups take them in order) and copy
        ``bias``. With rank = min(out, in) the layer then equals the dense layer exactly (up to float rounding)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a DecomposedLinear "
                             f"({self.out_features}, {self.in_features})")
        u, sigma, v = spread_null_directions(*svd_factors(weight, self.rank))
        for group, _ in self.groups:
            part = self.group_slice(group)
            getattr(self, self.param_name(group, "U")).copy_(u[:, part])
            getattr(self, self.param_name(group, "sigma")).copy_(sigma[part])
            getattr(self, self.param_name(group, "V")).copy_(v[:, part])
        if bias is not None:
            if self.bias is None:
                raise ValueError("this DecomposedLinear was built without a bias; cannot load one")
            self.bias.copy_(bias)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | Mapping[str, int]) -> DecomposedLinear:
        """A DecomposedLinear initialised from the SVD of ``linear`` (same device, dtype and bias)."""
        layer = DecomposedLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                                 device=linear.weight.device, dtype=linear.weight.dtype)
        return layer.load_svd(linear.weight, linear.bias)


class SplitDecomposedLinear(nn.Module):
    """A fused Linear whose output rows are split into equal parts, each decomposed on its own.

    DiT's ``attn.qkv`` is one (3d, d) Linear; KIND decomposes q, k and v separately. This module keeps the fused
    module path and bias (a dense parameter of this module) and concatenates its parts' outputs, so merged weights
    and state-dict keys stay DiT's (``attn.qkv.weight``/``attn.qkv.bias`` after ``to_linear``).
    """

    def __init__(self, parts: Mapping[str, DecomposedLinear], bias: torch.Tensor | None):
        super().__init__()
        if not parts:
            raise ValueError("a SplitDecomposedLinear needs at least one part")
        shapes = {(p.in_features, p.out_features) for p in parts.values()}
        if len(shapes) != 1:
            raise ValueError(f"split parts must all have the same shape, got {sorted(shapes)}")
        for name, part in parts.items():
            if part.bias is not None:
                raise ValueError(f"split part {name!r} must have no bias (the fused bias belongs to the split layer)")
            self.add_module(name, part)
        self.part_names = tuple(parts)
        self.in_features, part_out = next(iter(shapes))
        self.out_features = part_out * len(parts)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def parts(self) -> list[DecomposedLinear]:
        return [getattr(self, name) for name in self.part_names]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.cat([part(x, mask) for part in self.parts()], dim=-1)
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def to_linear(self, mask: torch.Tensor | None = None) -> nn.Linear:
        """The fused nn.Linear (parts' merged weights stacked in order) for one shared ``mask`` or None."""
        weight = torch.cat([part.merged_weight(mask) for part in self.parts()], dim=0)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, names: Sequence[str],
                    make_part: Callable[[int, int], DecomposedLinear], svd_init: bool = True) -> SplitDecomposedLinear:
        """Split ``linear``'s rows into ``len(names)`` equal blocks; ``make_part(in, out)`` builds each (bias-free)
        part, which is SVD-initialised from its block unless ``svd_init`` is False (values loaded later)."""
        if linear.out_features % len(names):
            raise ValueError(f"cannot split {linear.out_features} output rows into {len(names)} equal parts")
        rows = linear.out_features // len(names)
        parts = {}
        for index, name in enumerate(names):
            part = make_part(linear.in_features, rows)
            if svd_init:
                part.load_svd(linear.weight[index * rows:(index + 1) * rows])
            parts[name] = part
        return cls(parts, linear.bias)
