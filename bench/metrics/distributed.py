"""Index sharding and the few collectives the metrics need (docs/metrics.md §12).

Rank r of W owns the contiguous global range [⌊rN/W⌋, ⌊(r+1)N/W⌋): no padding, no DistributedSampler (P16).
Everything here is a no-op in a single process, so the same code runs with and without torchrun. Collectives use
the default process group: gloo on CPU, nccl on GPU (tensors must then live on the rank's CUDA device).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """Contiguous global index range of ``rank`` among ``world`` ranks.

    With ``align=1`` this is [⌊rN/W⌋, ⌊(r+1)N/W⌋). With ``align=B`` the same split is applied to the ⌈N/B⌉ blocks of
    B consecutive indices, so shard boundaries fall on multiples of B. Feature extraction aligns shards to its batch
    size: every image is then processed in the same batch, with the same neighbours, whatever the world size, and
    float32 features (hence all metrics) are bitwise independent of W, not just equal up to rounding.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world}")
    if n < 0 or align < 1:
        raise ValueError(f"invalid item count {n} or alignment {align}")
    blocks = -(-n // align)
    return min(rank * blocks // world * align, n), min((rank + 1) * blocks // world * align, n)


def shard_sizes(n: int, world: int, align: int = 1) -> list[int]:
    sizes = [b - a for a, b in (shard_range(n, r, world, align) for r in range(world))]
    assert sum(sizes) == n, "shard sizes must cover every index exactly once"
    return sizes


def collective_device() -> torch.device:
    """Device that tensors must live on for the current backend (nccl needs CUDA)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(local: torch.Tensor, n_total: int, align: int = 1) -> torch.Tensor:
    """Concatenate every rank's contiguous shard of rows in global order (rank 0's rows first).

    ``local`` must hold exactly this rank's ``shard_range(n_total, rank, world, align)`` rows. Shards are padded to
    the largest size for the collective and trimmed afterwards.
    """
    rank, world = rank_and_world()
    sizes = shard_sizes(n_total, world, align)
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows but owns {sizes[rank]} of {n_total}")
    if not is_distributed():
        return local
    device = collective_device()
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(local.device)


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (a no-op in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
