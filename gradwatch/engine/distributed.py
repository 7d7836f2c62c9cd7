"""The one module that talks to ``torch.distributed``: ranks, shards, the global reduction."""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.distributed as dist

try:  # DTensor moved to torch.distributed.tensor in 2.4/2.5
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - older layout
    try:
        from torch.distributed._tensor import DTensor, Replicate
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


class RankZeroFilter(logging.Filter):
    """Lets log records through on rank 0 only (installed on the ``gradwatch`` logger).

    Every rank computes the same alerts; only rank 0 prints them. ``on_alert`` callbacks and
    ``GradWatch.alerts`` still see every alert on every rank.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether this process is rank 0."""
        return is_rank_zero()


logging.getLogger("gradwatch").addFilter(RankZeroFilter())


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 / tensor parallel), whose local part is a shard."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` stored on this rank (the tensor itself unless sharded).

    For a DTensor this is its local tensor itself (no copy, not tracked by autograd), so in-place
    operations on it (e.g. clipping a gradient with ``torch._foreach_mul_``) change the DTensor. A
    rank holding an empty shard gets an empty tensor.
    """
    if is_sharded(tensor):
        with torch.no_grad():  # outside autograd ``to_local`` returns the local tensor, ~40x faster
            return cast("DTensor", tensor).to_local()
    return tensor


def held_whole(tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` as a plain tensor when this rank holds all of it, else None (it is sharded).

    For host-side measurements (e.g. the init scale in advice) that must come out the same on every
    rank without communication: a shard would give each rank a different answer.
    """
    if not is_sharded(tensor):
        return tensor
    dtensor = cast("DTensor", tensor)
    if all(isinstance(placement, Replicate) for placement in dtensor.placements):
        return dtensor.to_local()
    return None


def replica_weight(tensor: torch.Tensor) -> float:
    """Weight that makes a sum over ranks of local sums of squares count each element once.

    Used only when the model holds DTensors, so the sums of squares are all-reduced over the
    default group. A plain tensor is a full replica on every rank. A DTensor is replicated over its
    mesh dimensions with a ``Replicate`` placement; a mesh smaller than the default group is taken
    to be one of ``world_size / mesh size`` equivalent copies (data parallel over several
    model-parallel groups). Local sums of squares are divided by the number of replicas.
    """
    if not is_sharded(tensor):
        return 1.0 / world_size()
    dtensor = cast("DTensor", tensor)
    mesh = dtensor.device_mesh
    replicas = world_size() / mesh.size()
    for dim, placement in enumerate(dtensor.placements):
        if isinstance(placement, Replicate):
            replicas *= mesh.size(dim)
    return 1.0 / replicas


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` in place over every rank of the default group (one collective)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Takes the element-wise maximum of ``tensor`` over every rank, in place (one collective)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
