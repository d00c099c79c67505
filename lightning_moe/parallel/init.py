"""Materialise a model built on the meta device *after* it was sharded, with the weights one process would give.

A model built under ``torch.device("meta")`` has no values; once :func:`~lightning_moe.parallel.parallelize`
has sharded it, :func:`materialize_meta_model` allocates every rank's shards and initialises them:

* with the model's own init hook, ``init_weights()``, on every top-most module that defines one (the
  LightningModule itself or e.g. :class:`~lightning_moe.models.transformer.MoETransformer`), and
  ``reset_parameters()`` on the other modules that hold parameters or buffers (Lightning's rule);
* from rank 0's random state, broadcast to every rank, so that all ranks draw the same numbers;
* with each random draw made on the *full* tensor and the rank keeping its shard. Random ops on CPU
  DTensors would otherwise draw the local shard from the same generator state on every rank (all
  experts of a sharded ``[E, ...]`` weight would start equal). Peak extra memory: one full parameter.

The result equals, parameter for parameter, what the same hooks give on one process with the same random
state, whatever the expert-parallel size or ZeRO stage.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_moe.parallel.local import local_shard

__all__ = ["materialize_meta_model", "has_meta_tensors", "INIT_HOOK"]

INIT_HOOK = "init_weights"
"""Name of the optional method that (re-)initialises a module and everything below it."""

_aten = torch.ops.aten
# In-place random fills that ``torch.nn.init`` is built on (trunc_normal_, xavier_*, kaiming_*, orthogonal_
# start from one of these; what follows is elementwise or a matmul on the full values).
_RANDOM_FILLS = {
    _aten.normal_.default,
    _aten.uniform_.default,
    _aten.bernoulli_.float,
    _aten.random_.default,
    getattr(_aten.random_, "from"),  # "from" is a Python keyword
    _aten.random_.to,
    _aten.exponential_.default,
    _aten.log_normal_.default,
    _aten.cauchy_.default,
    _aten.geometric_.default,
}


class _FullTensorRandomFills(TorchDispatchMode):
    """Random fills of a DTensor draw the full tensor and keep the local shard (no communication)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else None
        if func in _RANDOM_FILLS and isinstance(target, DTensor):
            local = local_shard(target)
            full = torch.empty(target.shape, dtype=target.dtype, device=local.device)  # global shape
            func(full, *args[1:], **kwargs)
            shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
            local.copy_(local_shard(shard))
            return target
        return func(*args, **kwargs)


def has_meta_tensors(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device (DTensors: their local shard)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return any(local_shard(t).is_meta for t in tensors)


def _init_calls(model: nn.Module) -> list[Callable[[], None]]:
    """``init_weights`` of every top-most module defining it, then ``reset_parameters`` of every module
    outside those that holds tensors, in module order."""
    calls: list[Callable[[], None]] = []
    covered: set[int] = set()
    for module in model.modules():  # pre-order: a parent before its children
        if id(module) in covered:
            continue
        hook = getattr(module, INIT_HOOK, None)
        if callable(hook):
            calls.append(hook)
            covered |= {id(m) for m in module.modules()}
    uninitialised = []
    for module in model.modules():
        if id(module) in covered:
            continue
        if not any(True for _ in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))):
            continue
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            calls.append(reset)
        else:
            uninitialised.append(type(module).__name__)
    if uninitialised:
        raise ValueError(
            f"cannot initialise the meta-device model: {sorted(set(uninitialised))} hold parameters or buffers but"
            f" define no `reset_parameters()`, and no enclosing module defines `{INIT_HOOK}()`. Add one of the two,"
            " or build the model without `empty_init=True`."
        )
    return calls


def _broadcast_rng_state(group: dist.ProcessGroup | None) -> None:
    """Every rank takes rank 0's CPU random state (no-op when already equal or not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    box = [torch.get_rng_state()]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    torch.set_rng_state(box[0])


def materialize_meta_model(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Allocate ``model``'s meta tensors on ``device`` (each rank its shards) and initialise them.

    See the module docstring for the rule. Does nothing if ``model`` has no meta tensors.

    Args:
        model: the model after :func:`~lightning_moe.parallel.parallelize` (or a plain model).
        device: where the local tensors go.
        group: the ranks that must agree on the random state (default: all).

    Raises:
        ValueError: a module holding tensors has neither its own ``reset_parameters()`` nor an enclosing
            ``init_weights()``.
    """
    if not has_meta_tensors(model):
        return
    calls = _init_calls(model)
    model.to_empty(device=device)
    _broadcast_rng_state(group)
    with torch.no_grad(), _FullTensorRandomFills():
        for call in calls:
            call()
