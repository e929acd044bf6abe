"""FINE's factorised DiT (docs/methods.md §3.1): per matrix type one pair (U, V) shared by every block, per block a Σ.

    W^(l)_type = U_type diag(σ^(l)_type) V_typeᵀ + b^(l)_type

The shared factors are parameters of the *root* DiT (``fine_U_<type>``, ``fine_V_<type>``), held once; every
block's ``SharedFactorLinear`` owns only its σ and bias and reads U, V from the root at forward time. Two reasons
for that ownership: the tensors exist once (in ``state_dict``, in the optimizer, in the EMA), and under DeepSpeed
ZeRO-3 the root's forward encloses every use of them, so ZeRO-3 gathers them before any block runs and keeps them
until the root is done (a parameter owned by a module whose forward does *not* enclose its uses would need
``deepspeed.zero.register_external_parameter``).

Two exact evaluations of the same function, chosen per call by counting MACs
(``methods.decomposed.low_rank_step_macs``):

* **formed**: rebuild W (the paper's "W is reconstructed from them at every forward pass", ``out * r * in`` MACs per
  call, independent of the batch) and run a dense ``F.linear``. Cheapest when U and V train (the factorised
  ancestry) or when a call carries many tokens.
* **factored**: ``((x V) * sigma) Uᵀ + b``, ``r * (in + out)`` MACs per token, and no dense weight gradient to form.
  Cheapest in the Σ phase (U, V frozen), where the formed path's batch-independent re-forming costs more than the
  whole layer at a small batch (``benchmarks/methods_cost.py`` measured 1.69x full fine-tuning at batch 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from methods.base import MethodError
from methods.decomposed import factored_is_cheaper, factored_linear, low_rank_step_macs
from methods.surgery import find_linears, set_submodule

#: Every matrix type FINE factorises: q/k/v (fused), o, MLP in, MLP out, adaLN (docs/methods.md §3.1).
BLOCK_TYPES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")


def factor_names(target: str) -> tuple[str, str]:
    """Root parameter names of the shared factors of matrix type ``target`` (``attn.qkv`` -> ``fine_U_attn_qkv``)."""
    key = target.replace(".", "_")
    return f"fine_U_{key}", f"fine_V_{key}"


class SharedFactorLinear(nn.Module):
    """A Linear whose weight is ``U diag(sigma) Vᵀ``: ``sigma`` and ``bias`` belong to this layer, U (out x r) and
    V (in x r) to ``owner`` (the root DiT), shared with every block of the same matrix type."""

    def __init__(self, owner: nn.Module, target: str, sigma: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # A plain attribute, not a submodule: the root owns this layer; registering the root here would make a cycle.
        object.__setattr__(self, "_owner", owner)
        self.target = target
        self.u_name, self.v_name = factor_names(target)
        self.sigma = nn.Parameter(sigma.detach().clone(memory_format=torch.contiguous_format))
        self.bias = nn.Parameter(bias.detach().clone(memory_format=torch.contiguous_format)) if bias is not None \
            else None

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Looked up at call time, not cached: functional_call (FLOP counting) and dtype casts swap the root's tensors.
        return getattr(self._owner, self.u_name), getattr(self._owner, self.v_name)

    @property
    def out_features(self) -> int:
        return self.factors[0].shape[0]

    @property
    def in_features(self) -> int:
        return self.factors[1].shape[0]

    def weight_matrix(self) -> torch.Tensor:
        u, v = self.factors
        return (u * self.sigma) @ v.T

    def _grads(self) -> dict[str, bool]:
        u, v = self.factors
        return {"grad_spectrum": self.sigma.requires_grad, "grad_factors": u.requires_grad or v.requires_grad}

    def forward_macs(self, tokens: int, path: str) -> int:
        """MACs of a training step through this layer on ``tokens`` rows by ``path`` (``low_rank_step_macs``)."""
        u, v = self.factors
        return low_rank_step_macs(path, tokens, u.shape[0], v.shape[0], u.shape[1], **self._grads())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors
        if factored_is_cheaper(x, u.shape[0], v.shape[0], u.shape[1], **self._grads()):
            return factored_linear(x, u, self.sigma, v, self.bias)
        return F.linear(x, self.weight_matrix(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.target}: in={self.in_features}, out={self.out_features}, rank={self.sigma.numel()}"


# --------------------------------------------------------------------------------------------------------------
#                                          Shared bases from dense layers
# --------------------------------------------------------------------------------------------------------------


def _random_orthonormal(rows: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, rank, dtype=torch.float64))
    return q.to(dtype)


@torch.no_grad()
def shared_bases(weights: Sequence[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Shared factors of a stack of same-shape matrices (``out x in``): ``U`` the top-``rank`` left singular vectors
    of ``[W_1 ... W_L]``, ``V`` the top-``rank`` right singular vectors of ``[W_1; ...; W_L]``, and per layer
    ``σ_l``: the least-squares best diagonal for those orthonormal bases, ``diag(Uᵀ W_l V)``, rescaled so that
    ``U diag(σ_l) Vᵀ`` has the Frobenius norm of ``W_l``.

    The rescaling matters for what FINE factorises, DiT's random initialisation: independent random matrices share
    no bases, so the diagonal alone keeps about 1/d of each weight's energy (1.1 % at d = 64, 0.27 % at d = 256; a
    DiT-T fc1 started at norm 1.1 instead of 20.2) and the factorised ancestry started as a nearly zero network.
    Matrices that do share the bases are reproduced exactly either way (the diagonal then holds all the energy).

    An all-zero stack (DiT's adaLN-Zero init) has no singular directions: U and V are then random orthonormal
    and every σ is zero, so the factorised layers start at zero exactly like DiT's.
    """
    out_dim, in_dim = weights[0].shape
    if not 0 < rank <= min(out_dim, in_dim):
        raise MethodError(f"FINE rank {rank} must be in 1..{min(out_dim, in_dim)} for {out_dim}x{in_dim} matrices")
    dtype = weights[0].dtype
    stack = [w.double() for w in weights]
    if all(not w.any() for w in stack):
        u = _random_orthonormal(out_dim, rank, dtype)
        v = _random_orthonormal(in_dim, rank, dtype)
        return u, v, [torch.zeros(rank, dtype=dtype) for _ in weights]
    u = torch.linalg.svd(torch.cat(stack, dim=1), full_matrices=False).U[:, :rank]
    v = torch.linalg.svd(torch.cat(stack, dim=0), full_matrices=False).Vh[:rank].T
    sigmas = [_energy_preserving(torch.diagonal(u.T @ w @ v), w).to(dtype) for w in stack]
    return u.to(dtype), v.to(dtype), sigmas


def _energy_preserving(sigma: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sigma`` scaled so that ``||sigma||`` (the norm of ``U diag(sigma) Vᵀ`` for orthonormal U, V) equals
    ``||weight||_F``; a zero ``sigma`` stays zero."""
    norm = sigma.norm()
    return sigma * (weight.norm() / norm) if norm > 0 else sigma


# --------------------------------------------------------------------------------------------------------------
#                                                  Surgery
# --------------------------------------------------------------------------------------------------------------


def block_linears(model: nn.Module, target: str) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` of matrix type ``target`` in every block, in block order (FINE factorises blocks only)."""
    if target not in BLOCK_TYPES:
        raise MethodError(f"FINE factorises the block matrix types {BLOCK_TYPES}; got target {target!r}")
    found = find_linears(model, (target,))
    depth = len(model.blocks)
    names = [f"blocks.{i}.{target}" for i in range(depth)]
    missing = [n for n in names if n not in found]
    if missing:
        raise MethodError(f"FINE: no plain nn.Linear at {missing[:3]} (already factorised?)")
    return [(n, found[n]) for n in names]


@torch.no_grad()
def install_factors(model: nn.Module, target: str, u: torch.Tensor, v: torch.Tensor,
                    sigmas: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> None:
    """Give ``model`` (a stock DiT) the shared factors ``u``, ``v`` of ``target`` and replace each block's Linear by
    a ``SharedFactorLinear`` with its own σ and bias."""
    linears = block_linears(model, target)
    if len(sigmas) != len(linears) or len(biases) != len(linears):
        raise MethodError(f"FINE: {len(sigmas)} sigmas for {len(linears)} blocks of {target}")
    u_name, v_name = factor_names(target)
    # Contiguous copies: SVD factors are strided views, and ZeRO-3 flattens parameters into contiguous buffers.
    model.register_parameter(u_name, nn.Parameter(u.detach().clone(memory_format=torch.contiguous_format)))
    model.register_parameter(v_name, nn.Parameter(v.detach().clone(memory_format=torch.contiguous_format)))
    for (name, linear), sigma, bias in zip(linears, sigmas, biases):
        if (u.shape[0], v.shape[0]) != tuple(linear.weight.shape):
            raise MethodError(f"FINE: factors {tuple(u.shape)} x {tuple(v.shape)} do not fit {name} "
                              f"{tuple(linear.weight.shape)}")
        set_submodule(model, name, SharedFactorLinear(model, target, sigma, bias))


@torch.no_grad()
def factorise(model: nn.Module, targets: Iterable[str], rank: int) -> None:
    """Turn a stock DiT into FINE's factorised DiT in place, from its current (e.g. freshly initialised) weights."""
    for target in targets:
        linears = [linear for _, linear in block_linears(model, target)]
        layer_rank = rank or min(linears[0].weight.shape)
        u, v, sigmas = shared_bases([lin.weight for lin in linears], layer_rank)
        install_factors(model, target, u, v, sigmas, [lin.bias for lin in linears])


def factorised_targets(model: nn.Module) -> list[str]:
    """Matrix types ``model`` holds shared factors for, in ``BLOCK_TYPES`` order."""
    return [t for t in BLOCK_TYPES if hasattr(model, factor_names(t)[0])]


@torch.no_grad()
def materialise(model: nn.Module) -> nn.Module:
    """Replace every ``SharedFactorLinear`` by a plain ``nn.Linear`` holding ``U diag(σ) Vᵀ`` and drop the shared
    factors from the root: an ordinary dense DiT with DiT's state-dict keys, computing the same function."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SharedFactorLinear)]
    for name, layer in layers:
        weight = layer.weight_matrix()
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        dense.weight.requires_grad_(layer.sigma.requires_grad)
        if dense.bias is not None:
            dense.bias.requires_grad_(layer.bias.requires_grad)
        set_submodule(model, name, dense)
    for target in factorised_targets(model):
        for param_name in factor_names(target):
            delattr(model, param_name)
    return model
