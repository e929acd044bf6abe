"""One place where a method's ``count`` is assembled from ``bench.models.accounting`` (docs/harness.md §9.5).

Every method answers ``count(model)`` the same way: parameters as built (total, trainable), split into those whose
values came from the ancestry and those the method initialised fresh, the bytes of ``state_to_save``, and forward
GMACs of the model as trained and as sampled (``sampling_model``). Methods only say which parameters are new; the
convention (DiT's GMACs: one image, forward only, no CFG doubling) lives in ``bench.models.accounting``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from bench.models.accounting import count_params, forward_gmacs
from methods.base import Accounting, Method, MethodError


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors of ``state`` occupy as stored (numel x element size, no file header)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def method_accounting(method: Method, model: nn.Module, new_params: Iterable[str]) -> Accounting:
    """The ``Accounting`` of ``model`` built by ``method``, given the names of the parameters it initialised fresh.

    Every other parameter counts as inherited from the ancestry (for a method that takes no ancestry, pass every
    parameter name as new). The sampled GMACs are measured on ``method.sampling_model`` of a deep copy, so
    ``model`` is left as it is.
    """
    params = dict(model.named_parameters())
    new = set(new_params)
    unknown = sorted(new - set(params))
    if unknown:
        raise MethodError(f"{method.name}: accounting names parameters the model does not have: {unknown[:5]}")
    counts = count_params(model)
    params_new = sum(params[name].numel() for name in new)
    sampled = method.sampling_model(copy.deepcopy(model))
    return Accounting(
        params_total=counts["total"],
        params_trainable=counts["trainable"],
        params_inherited=counts["total"] - params_new,
        params_new=params_new,
        stored_bytes=state_bytes(method.state_to_save(model)),
        gmacs_fwd_trained=forward_gmacs(model),
        gmacs_fwd_sampled=forward_gmacs(sampled),
    )
