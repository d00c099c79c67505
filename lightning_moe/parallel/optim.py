"""Optimizer settings: the whole-list update for DTensor parameters, fused AdamW where torch has the kernels.

With ``foreach=None`` and ``fused=None`` torch picks the per-parameter loop for CPU tensors, which on DTensor
parameters pays one DTensor dispatch per parameter and per operation; the whole-list update (``fused``
where torch has the kernels, else ``foreach``) avoids that (``benchmarks/dtensor_optimizer_step.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

__all__ = ["use_whole_list_update", "fused_kernels_cover"]


def fused_kernels_cover(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused Adam/AdamW kernels can update all of ``params`` (floating point, on a device with
    the kernels: CUDA and, in recent torch, CPU), where the default per-parameter loop is several times slower."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = list(params)
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def use_whole_list_update(optimizer: Optimizer) -> None:
    """Make ``optimizer`` update its DTensor parameter groups as whole lists (in place).

    ``torch.optim.Adam`` / ``AdamW`` get ``fused=True`` when every parameter of the group is a floating-point
    tensor on a device with fused kernels, other optimizers ``foreach=True``. Only groups that left both
    choices to torch (``None``) and are not ``differentiable`` change; plain-tensor groups are left alone.
    """
    defaults = getattr(optimizer, "defaults", {})
    if "foreach" not in defaults:
        return
    can_fuse = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and "fused" in defaults
    for group in optimizer.param_groups:
        params = group["params"]
        if group.get("foreach") is not None or group.get("fused") or group.get("differentiable", False):
            continue
        if not any(isinstance(p, DTensor) for p in params):
            continue
        if can_fuse and fused_kernels_cover(params):
            group["fused"] = True
        else:
            group["foreach"] = True
