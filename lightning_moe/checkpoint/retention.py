"""Keeping the newest ``keep_last`` step checkpoints of a run, judged from what is on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.checkpoint.files import is_complete
from lightning_moe.checkpoint.resume import checkpoint_step

__all__ = ["RetainingModelCheckpoint", "prune_checkpoints"]


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete ``step-<N>.ckpt`` in ``folder``, and any incomplete
    one older than the newest complete one (left by a killed run). Returns what was deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = [(checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None]
    complete = sorted((s, p) for s, p in steps if is_complete(p))
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for _, p in complete[:-keep_last]] if len(complete) > keep_last else []
    doomed += [p for s, p in steps if not is_complete(p) and s < newest]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return doomed


class RetainingModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the newest ``keep_last`` checkpoints found on disk.

    Retention looks at the folder, not at the callback's own bookkeeping, so it holds across restarts
    (and changes of ``keep_last``) of the same run.
    """

    def __init__(self, keep_last: int, **kwargs: Any) -> None:
        super().__init__(save_top_k=-1, **kwargs)
        self.keep_last = keep_last

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        trainer.strategy.barrier("checkpoint-retention")
        if trainer.is_global_zero:
            prune_checkpoints(Path(filepath).parent, self.keep_last)
