"""The collectives of :class:`~lightning_moe.strategy.MoEZeroStrategy`, each watched: when a rank dies or
freezes, the surviving ranks raise :class:`~lightning_moe.parallel.health.RankFailureError` naming it and the
step, instead of hanging (the watch itself is :class:`~lightning_moe.parallel.health.RankWatch`)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized, _sync_ddp_if_available
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.strategies.strategy import TBroadcast
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_moe.parallel.health import exited_children

__all__ = ["WatchedCollectives"]


class WatchedCollectives:
    """Mixin for the strategy (before ``ParallelStrategy`` in the bases). Expects ``_rank_watch``
    (a :class:`RankWatch`), ``root_device``, ``node_rank``, ``num_processes``, ``lightning_module`` and the
    launcher's ``procs``."""

    @override
    def barrier(self, name: str | None = None) -> None:
        if not _distributed_is_initialized():
            return
        with self._watch(f"barrier({name!r})" if name else "barrier"):
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        with self._watch("broadcast"):
            dist.broadcast_object_list(box, src, group=_group.WORLD)
        return box[0]

    @override
    def reduce(
        self,
        tensor: Tensor | Any,
        group: Any | None = None,
        reduce_op: ReduceOp | str | None = "mean",
    ) -> Tensor | Any:
        """Reduce ``tensor`` over all ranks (``"mean"`` by default, ``"sum"``, ...); non-tensors pass through."""
        if isinstance(tensor, Tensor):
            with self._watch("reduce"):
                return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        with self._watch("backward"):  # FSDP's gradient reduce-scatters run in backward hooks
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        with self._watch("optimizer step"):  # the closure runs training_step and backward; then clipping, step
            return super().optimizer_step(optimizer, closure, model, **kwargs)

    def _watch(self, what: str) -> Any:
        return self._rank_watch(lambda: self._where(what))

    def _exited_children(self) -> list[int]:
        # local rank i + 1 is the i-th child of Lightning's launcher on this node
        procs = getattr(self._launcher, "procs", None) or []
        return exited_children(procs, first_rank=self.node_rank * self.num_processes + 1)

    def _where(self, what: str) -> str:
        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        return what if trainer is None else f"{what} at global step {trainer.global_step}"
