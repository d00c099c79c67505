"""The local shard of a tensor that may be a DTensor, for bookkeeping outside autograd.

``local_shard`` reads a DTensor's local tensor directly (no autograd node): for counting bytes, norms,
optimizer state, initialisation. Code on the autograd graph (the experts' forward, dispatchers) uses
:func:`lightning_moe.moe.local_tensor` instead, whose ``to_local()`` passes gradients back to the DTensor.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["local_shard"]


def local_shard(t: Tensor) -> Tensor:
    """``t``'s local shard if it is a DTensor (not differentiable through), else ``t`` itself."""
    return t._local_tensor if isinstance(t, DTensor) else t
