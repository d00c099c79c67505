"""Gradient clipping for models whose parameters live on several device meshes.

``torch.nn.utils.clip_grad_norm_`` stacks the per-parameter norms, which fails for DTensors on
different meshes (dense weights on ``dp``, experts on ``efsdp x ep``). Here parameters are grouped by
(mesh, placements, device); each group's norm is reduced over the mesh dims it is sharded on, the groups are
combined (``p``-norm, or max for ``inf``) and every group is scaled by the same coefficient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lightning_moe.parallel.local import local_shard

__all__ = ["clip_grad_norm_", "clip_grad_value_", "grad_norm"]

_Params = Tensor | Iterable[Tensor]


def _grads(parameters: _Params) -> list[Tensor]:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return [p.grad for p in params if p.grad is not None]


def _group(grads: list[Tensor]) -> dict[tuple, list[Tensor]]:
    """Gradients keyed by (mesh, placements, local device); plain tensors under ``(None, (), device)``."""
    groups: dict[tuple, list[Tensor]] = {}
    for g in grads:
        key = (
            (g.device_mesh, tuple(g.placements), local_shard(g).device)
            if isinstance(g, DTensor)
            else (None, (), g.device)
        )
        groups.setdefault(key, []).append(g)
    return groups


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def _group_norm(key: tuple, grads: list[Tensor], norm_type: float) -> Tensor:
    """The ``norm_type`` norm of one group's gradients, the same on every rank (fp32 scalar).

    Reduces the local shards' contributions over every mesh dim the group is sharded on (replicated
    dims already hold the same values): one small all-reduce per sharded dim, no DTensor dispatch.
    """
    mesh, placements, device = key
    locals_ = [local_shard(g) for g in grads]
    if math.isinf(norm_type):
        maxima = [t.abs().max().float() if t.numel() else torch.zeros((), device=device) for t in locals_]
        partial = torch.stack(maxima).max()
    else:
        partial = torch.stack([torch.linalg.vector_norm(s, norm_type, dtype=torch.float32) for s in locals_])
        partial = (partial**norm_type).sum()  # sum of |g|^p over the local shards
    if mesh is not None:
        partial = partial.to(_mesh_device(mesh))
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        for dim, placement in enumerate(placements):
            if placement.is_replicate():
                continue
            if placement.is_partial():
                raise ValueError(
                    f"cannot clip gradients with a pending reduction ({placement}); clip after the backward's "
                    "gradient reduction (after FSDP's post-backward)"
                )
            dist.all_reduce(partial, op=op, group=mesh.get_group(dim))
    return partial if math.isinf(norm_type) else partial ** (1.0 / norm_type)


def _total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    if not grads:
        return torch.tensor(0.0)
    group_norms = [_group_norm(key, gs, norm_type) for key, gs in _group(grads).items()]
    device = group_norms[0].device
    stacked = torch.stack([n.to(device) for n in group_norms])  # [num_groups]
    if math.isinf(norm_type):
        return stacked.max()
    return torch.linalg.vector_norm(stacked, norm_type)


@torch.no_grad()
def grad_norm(parameters: _Params, norm_type: float = 2.0) -> Tensor:
    """The total ``norm_type`` norm of the gradients of ``parameters`` (all meshes together).

    Collective: every rank must call it with the same parameters.
    """
    return _total_norm(_grads(parameters), float(norm_type))


@torch.no_grad()
def clip_grad_norm_(
    parameters: _Params,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm``, like
    ``torch.nn.utils.clip_grad_norm_``, across parameters on different meshes.

    Collective: every rank must call it with the same parameters.

    Returns:
        The total norm before clipping (a plain tensor, the same on every rank).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} must be > 0")
    grads = _grads(parameters)
    total = _total_norm(grads, float(norm_type))
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} of the gradients is non-finite; "
            "set error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (_, _, device), gs in _group(grads).items():
        torch._foreach_mul_([local_shard(g) for g in gs], coef.to(device))
    return total


@torch.no_grad()
def clip_grad_value_(parameters: _Params, clip_value: float) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` (on each local shard)."""
    if not clip_value > 0:
        raise ValueError(f"clip_value={clip_value!r} must be > 0")
    for g in _grads(parameters):
        local_shard(g).clamp_(min=-clip_value, max=clip_value)
