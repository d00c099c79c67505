"""Process-group helpers for collective checkpoint calls; all of them are no-ops without a process group."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

__all__ = ["all_ok", "barrier", "gather_objects", "broadcast_object", "dcp_call", "distributed", "rank"]


def distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if distributed() else 0


def barrier() -> None:
    """Wait for every rank."""
    if distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank."""
    if not distributed():
        return ok
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    return all(flags)


@contextlib.contextmanager
def dcp_call() -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``dcp.save`` / ``dcp.load``; silences their single-process warning when no
    process group is initialised (one process is then the intended case, not an accident)."""
    single = not distributed()
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield {"no_dist": single}
