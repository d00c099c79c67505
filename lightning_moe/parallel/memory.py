"""Per-rank byte counts of parameters, gradients and optimizer state (what ZeRO stages promise to shrink).

DTensors count their local shard (:func:`~lightning_moe.parallel.local.local_shard`), plain tensors their full size. Storage shared by
several tensors is counted once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lightning_moe.parallel.local import local_shard

__all__ = [
    "local_bytes",
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "optimizer_parameters",
    "unsharded_parameter_bytes",
    "dense_and_expert_parameter_bytes",
]


def local_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the local parts of ``tensors`` (None skipped, each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = local_shard(t)
        if id(local) in seen:
            continue
        seen.add(id(local))
        total += local.numel() * local.element_size()
    return total


def _params(source: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    return list(source.parameters()) if isinstance(source, nn.Module) else list(source)


def parameter_bytes(source: nn.Module | Iterable[Tensor]) -> int:
    """Bytes of the parameters this rank holds (sharded parameters: their local shard).

    ``source``: a module (its *registered* parameters) or parameters, e.g. an optimizer's, which under
    FSDP2 are always the sharded ones.
    """
    return local_bytes(_params(source))


def unsharded_parameter_bytes(model: nn.Module, sharded: Iterable[Tensor]) -> int:
    """Bytes of the parameters registered on ``model`` now that are not the resting ``sharded`` ones.

    FSDP2 swaps a unit's sharded parameters for unsharded ones while the unit is in use, and keeps
    them until after backward when ``reshard_after_forward=False``: measured between forward and
    backward this shows what stages 1-2 keep and stage 3 frees. ``sharded``: the parameters at rest,
    e.g. :func:`optimizer_parameters` (for expert-parallel weights the unsharded value is itself a
    DTensor over ``ep``, so the type alone does not tell).
    """
    resting = {id(p) for p in sharded}
    return local_bytes(p for p in model.parameters() if id(p) not in resting)


def gradient_bytes(source: nn.Module | Iterable[Tensor]) -> int:
    """Bytes of the ``.grad`` of ``source``'s parameters (local shards).

    Pass the optimizer's parameters for the sharded gradients, the module for the gradients of the
    parameters registered now (unsharded ones while FSDP keeps a unit unsharded).
    """
    return local_bytes(p.grad for p in _params(source))


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters an optimizer updates (under FSDP2: the sharded DTensors)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's tensor state on this rank (moments, step counters, local shards),
    plus the CPU master copies of :class:`~lightning_moe.parallel.offload.CPUOffloadAdamW`."""
    tensors: list[Tensor] = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    tensors += list(getattr(optimizer, "_masters", {}).values())
    return local_bytes(tensors)


def dense_and_expert_parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """``(dense, experts)``: bytes of the parameters this rank holds outside / inside the experts modules
    (MoE layers' and transformers MoE blocks'; local shards; what tensor and expert parallelism each divide)."""
    from lightning_moe.parallel.discovery import expert_modules

    expert_ids = {id(p) for _, experts in expert_modules(model) for p in experts.parameters()}
    params = list(model.parameters())
    return (
        local_bytes(p for p in params if id(p) not in expert_ids),
        local_bytes(p for p in params if id(p) in expert_ids),
    )
