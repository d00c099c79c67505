"""The checkpoint hooks of :class:`~lightning_moe.strategy.MoEZeroStrategy`: Lightning's save/load calls mapped
onto :mod:`lightning_moe.checkpoint` (DCP folders or full files, resharded on load).

``lightning_moe.checkpoint`` is imported inside the hooks: ``import lightning_moe`` stays light, and
``python -m lightning_moe.checkpoint`` does not find itself imported already.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch.optim import Optimizer

__all__ = ["CheckpointHooks", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper (or ``optimizer`` itself)."""
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


class CheckpointHooks:
    """Mixin for the strategy: every rank saves its shards (or rank 0 the full state) and loads any layout.

    Expects the strategy's ``model``, ``lightning_module``, ``optimizers``, ``broadcast``, ``_watch`` and
    ``_save_distributed_checkpoint``.
    """

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Each rank's shards (DCP folder) or, with ``save_distributed_checkpoint=False``, the full state on rank 0."""
        from lightning_moe import checkpoint as ckpt

        assert self.model is not None
        return ckpt.model_state_dict(self.model, full=not self._save_distributed_checkpoint)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # the weights were already loaded (resharded) in `load_checkpoint()`

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer state keyed by parameter name (each rank's shards, or full on rank 0)."""
        from lightning_moe import checkpoint as ckpt

        assert self.model is not None
        return ckpt.optimizer_state_dict(
            self.model, unwrap_optimizer(optimizer), full=not self._save_distributed_checkpoint
        )

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # the optimizer states were already loaded (resharded) in `load_checkpoint()`

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` atomically: a DCP folder (every rank) or one full file (rank 0)."""
        if storage_options is not None:
            raise TypeError(
                f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not supported:"
                " checkpoints are written by `lightning_moe.checkpoint`, not through a `CheckpointIO`."
            )
        from lightning_moe import checkpoint as ckpt

        with self._watch("checkpoint save"):
            ckpt.save_checkpoint(checkpoint, filepath, distributed=self._save_distributed_checkpoint)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load weights and optimizer states resharded onto this layout; returns the rest (loops, callbacks)."""
        from lightning_moe import checkpoint as ckpt

        assert self.model is not None and self.lightning_module is not None
        path = Path(self.broadcast(str(checkpoint_path)))
        with self._watch("checkpoint load"):
            return ckpt.load_checkpoint(
                path,
                self.model,
                [unwrap_optimizer(o) for o in self.optimizers],
                strict=self.lightning_module.strict_loading,
                weights_only=weights_only,
            )
