"""Optimizer settings for DTensor parameters.

With ``foreach=None`` and ``fused=None`` torch picks the per-parameter loop for CPU tensors, which on DTensor
parameters pays one DTensor dispatch per parameter and per operation; the whole-list update (``fused``
where torch has the kernels, else ``foreach``) avoids that (``benchmarks/dtensor_optimizer_step.py``).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

__all__ = ["use_whole_list_update"]


def use_whole_list_update(optimizer: Optimizer) -> None:
    """Make ``optimizer`` update its DTensor parameter groups as whole lists (in place).

    ``torch.optim.Adam`` / ``AdamW`` get ``fused=True`` when every parameter of the group is a floating-point
    tensor on a device with fused kernels, other optimizers ``foreach=True``. Only groups that left both
    choices to torch (``None``) and are not ``differentiable`` change; plain-tensor groups are left alone.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    defaults = getattr(optimizer, "defaults", {})
    if "foreach" not in defaults:
        return
    fused_devices = set(_get_fused_kernels_supported_devices())
    can_fuse = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and "fused" in defaults
    for group in optimizer.param_groups:
        params = group["params"]
        if group.get("foreach") is not None or group.get("fused") or group.get("differentiable", False):
            continue
        if not any(isinstance(p, DTensor) for p in params):
            continue
        if can_fuse and all(p.device.type in fused_devices and torch.is_floating_point(p) for p in params):
            group["fused"] = True
        else:
            group["foreach"] = True
