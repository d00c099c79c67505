"""Saving and loading a (sharded) model's checkpoint: the entry points that pick the layout.

Both functions are collective when a process group is initialised: every rank calls them with its own
shard of the model. Without a process group they run in one process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_moe.checkpoint import collective
from lightning_moe.checkpoint.dcp import load_distributed, save_distributed
from lightning_moe.checkpoint.files import PathLike, is_distributed_checkpoint, temporary_sibling
from lightning_moe.checkpoint.full import load_full, save_full
from lightning_moe.checkpoint.manifest import verify_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]


def _check_replaceable(path: Path) -> None:
    """Refuse to overwrite a folder that is not one of our checkpoints (it may hold the user's files)."""
    if path.is_dir() and not is_distributed_checkpoint(path):
        raise IsADirectoryError(
            f"The checkpoint path {str(path)!r} is an existing folder that is not a distributed checkpoint;"
            " refusing to replace it. Choose another path or remove the folder."
        )


def save_checkpoint(checkpoint: dict[str, Any], path: PathLike, *, distributed: bool = True) -> None:
    """Write a Lightning checkpoint dict atomically; collective (every rank calls it).

    Args:
        checkpoint: Lightning's checkpoint dict. ``checkpoint["state_dict"]`` and each entry of
            ``checkpoint["optimizer_states"]`` must come from :func:`model_state_dict` /
            :func:`optimizer_state_dict` with ``full=not distributed``. The dict is not modified.
        path: the checkpoint folder (``distributed=True``) or file (``distributed=False``). The same path
            must be passed on every rank (rank 0's is used).
        distributed: ``True``: a DCP folder with each rank's shards. ``False``: one full file written by
            rank 0 (the other ranks' ``checkpoint`` may hold empty state dicts).

    Raises:
        IsADirectoryError: ``path`` is an existing folder that is not a distributed checkpoint.
    """
    path = Path(collective.broadcast_object(os.fspath(path)))
    error: BaseException | None = None
    if collective.rank() == 0:
        try:
            _check_replaceable(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        except BaseException as e:  # noqa: BLE001 - re-raised below after every rank learnt about it
            error = e
    if not collective.all_ok(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 could not prepare the checkpoint path {str(path)!r} (see rank 0's error)")

    if distributed:
        # every rank agrees on one temporary folder next to the destination
        tmp = temporary_sibling(path, token=collective.broadcast_object(uuid.uuid4().hex))
        save_distributed(checkpoint, path, tmp)
    else:
        save_full(checkpoint, path)


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    *,
    strict: bool = True,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into a (sharded) model and its optimizers, resharding as needed; collective.

    Args:
        path: a distributed checkpoint folder, a full checkpoint file or a consolidated file.
        model: the model, already parallelised (its parameters may be DTensors on any mesh).
        optimizers: the optimizers to restore (plain torch optimizers, in ``configure_optimizers`` order);
            empty to load the weights only. Ignored when the checkpoint holds no optimizer state.
        strict: whether parameter names must match exactly (shapes must match regardless).
        weights_only: passed to ``torch.load`` for ``meta.pt`` / the full file (``None``: torch's default).

    Returns:
        The rest of the checkpoint (loops, epoch, global step, callbacks, hyper-parameters, lr schedulers, ...).
        ``"optimizer_states"`` holds one empty placeholder per saved optimizer (their tensors went straight
        into ``optimizers``); ``"state_dict"`` is absent (it went into ``model``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: a folder whose writing did not finish.
        CheckpointMismatchError: names or shapes differ from the model's (the message lists them).
        DamagedCheckpointError: a file listed in the checkpoint's manifest is missing or has another size.
    """
    path = Path(path)
    if path.exists():
        verify_checkpoint(path, check_sums=False)  # every rank: cheap; the run checked the checksums when choosing it
    if path.is_dir():
        return load_distributed(path, model, optimizers, strict=strict, weights_only=weights_only)
    if path.is_file():
        return load_full(path, model, optimizers, strict=strict, weights_only=weights_only)
    raise FileNotFoundError(f"No checkpoint at {str(path)!r}: expected a checkpoint folder or file.")
