"""The one module that talks to ``torch.distributed``: ranks, sharded tensors, the global reduction."""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # DTensor moved to torch.distributed.tensor in 2.4/2.5
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - older layout
    try:
        from torch.distributed._tensor import DTensor, Replicate  # type: ignore[no-redef]
    except ImportError:
        DTensor = None  # type: ignore[assignment,misc]
        Replicate = None  # type: ignore[assignment,misc]


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside distributed runs)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group (1 outside distributed runs)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """Whether this process writes files and prints."""
    return rank() == 0


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 / tensor parallel), whose local part is a shard."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` stored on this rank (the tensor itself unless sharded)."""
    if is_sharded(tensor):
        return tensor.to_local()  # type: ignore[union-attr]
    return tensor


def replica_weight(tensor: torch.Tensor) -> float:
    """Weight that makes a sum over ranks of local sums of squares count each element once.

    Used only when the model holds DTensors, so the sums of squares are all-reduced. A DTensor
    replicated over some mesh dimensions is held by that many ranks, and a plain tensor by every
    rank; their local sums of squares are divided by the number of replicas before the global sum.
    The DTensor's mesh is assumed to span the default group.
    """
    if not is_sharded(tensor):
        return 1.0 / world_size()  # a plain tensor is a full replica on every rank
    replicas = 1
    mesh = tensor.device_mesh  # type: ignore[union-attr]
    for dim, placement in enumerate(tensor.placements):  # type: ignore[union-attr]
        if isinstance(placement, Replicate):
            replicas *= mesh.size(dim)
    return 1.0 / replicas


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` in place over every rank of the default group (one collective)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
