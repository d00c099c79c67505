"""Memory for the experts' weight gradients, kept from one backward pass for the next (CPU).

Each ``[E, d, h]`` weight gradient is one large block. glibc's malloc maps blocks that large straight from
the OS and unmaps them when freed, so with gradients set to None between steps (``zero_grad()``'s default)
every backward pays a page fault per 4 KiB of fresh gradient; per-expert ``nn.Linear`` gradients avoid
this only because they are small enough for malloc to recycle. Figures: README ("MoE layer against an
equal-FLOP dense FFN", ``python benchmarks/moe_layer.py``).

:class:`GradientMemory` keeps the storage of each gradient it hands out and hands the same storage out
again once nobody else refers to it (the parameter's ``.grad`` was set to None, or the gradient was added
into an existing ``.grad`` and dropped). A storage still in use is never touched: a new block is handed
out instead. This is what DDP's persistent gradient buckets and GPU caching allocators do; the cost is
that the gradients' memory stays allocated between steps, so sharded-gradient training (ZeRO-2/3) turns
it off (:meth:`lightning_moe.moe.MoE.keep_gradient_memory`). CUDA tensors never go through it (the CUDA
caching allocator already reuses memory).

Under autocast the experts' fp32 weights are cast to the compute dtype every forward, and the cast's backward
makes the fp32 gradient that becomes the parameter's ``.grad``: two more blocks of the weights' size per step,
fresh ones with a plain ``.to()`` (bf16-mixed, E=8, d=512, h=2048: the four casts took 25.7 of a 124 ms layer
step, most of it in page faults). :func:`cast_in_kept_memory` takes both from the same memory.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["GradientMemory", "cast_in_kept_memory"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""References to a storage (torch private API; without it nothing is reused)."""


class GradientMemory:
    """Storages of weight gradients, keyed by the weight's role (``"w1"``, ``"w2"``, ...), for reuse.

    Args:
        max_per_key: storages kept per key. Two cover gradient accumulation, where the parameter's ``.grad``
            holds one and each micro-batch's new gradient needs another.
    """

    def __init__(self, max_per_key: int = 2) -> None:
        self.enabled = True
        self.max_per_key = max_per_key
        self._storages: dict[str, list[torch.UntypedStorage]] = {}

    def empty(self, key: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised contiguous tensor shaped like ``like``, typed like it (or ``dtype``), on reused memory
        when possible."""
        dtype = like.dtype if dtype is None else dtype
        if not self.enabled or like.device.type != "cpu" or _use_count is None:
            return torch.empty(like.shape, dtype=dtype, device=like.device)
        nbytes = like.numel() * dtype.itemsize
        kept = self._storages.setdefault(key, [])
        for storage in kept:
            if storage.nbytes() == nbytes and _use_count(storage._cdata) == 1:  # only this list refers to it
                return torch.empty(0, dtype=dtype).set_(storage, 0, like.shape)
        fresh = torch.empty(like.shape, dtype=dtype)
        kept[:] = [s for s in kept if s.nbytes() == nbytes]  # a new shape (e.g. after resharding) replaces old ones
        if len(kept) < self.max_per_key:
            kept.append(fresh.untyped_storage())
        return fresh

    def nbytes(self) -> int:
        """Bytes held (in use by gradients or free for the next backward)."""
        return sum(s.nbytes() for kept in self._storages.values() for s in kept)

    def release(self) -> None:
        """Forget every storage (gradients still in use keep theirs)."""
        self._storages.clear()

    def __deepcopy__(self, memo: dict) -> GradientMemory:
        copy = GradientMemory(self.max_per_key)  # a copied module starts with nothing kept
        copy.enabled = self.enabled
        return copy

    def __getstate__(self) -> dict:
        return {"enabled": self.enabled, "max_per_key": self.max_per_key, "_storages": {}}


class _CastInKeptMemory(torch.autograd.Function):
    """``t.to(dtype)``, the result and the gradient (in ``t``'s dtype) both in ``memory``'s blocks."""

    @staticmethod
    def forward(ctx, t: Tensor, dtype: torch.dtype, memory: GradientMemory, key: str) -> Tensor:
        ctx.memory, ctx.key, ctx.source_dtype = memory, key, t.dtype
        return memory.empty(f"{key}.cast", t, dtype).copy_(t)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return ctx.memory.empty(f"{ctx.key}.grad", grad, ctx.source_dtype).copy_(grad), None, None, None


def cast_in_kept_memory(t: Tensor, dtype: torch.dtype, memory: GradientMemory, key: str) -> Tensor:
    """``t.to(dtype)`` (differentiable) whose result and whose gradient for ``t`` reuse ``memory``'s blocks under
    ``key`` from step to step; ``t`` itself when it already has ``dtype``; a plain ``.to()`` under
    ``torch.compile``, which plans its own buffers."""
    if t.dtype == dtype or torch.compiler.is_compiling():
        return t.to(dtype)
    return _CastInKeptMemory.apply(t, dtype, memory, key)


def gradient_memory_of(module: object) -> GradientMemory | None:
    """The :class:`GradientMemory` an experts module uses, if it has one."""
    memory = getattr(module, "gradient_memory", None)
    return memory if isinstance(memory, GradientMemory) else None
