"""Atomic single-file checkpoints and finding the checkpoint a (re)started run resumes from.

Checkpoints are named ``step-<N>.ckpt`` (a file, or a DCP folder written by ``moe_zero``). A file is
written to a temporary name and renamed into place; a folder carries a completion marker written
last (see ``lightning_moe.checkpoint``). So a run killed while writing leaves the previous
checkpoint as the newest complete one, and ``resume=auto`` picks it.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import shutil

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = [
    "AtomicCheckpointIO",
    "RetainingModelCheckpoint",
    "find_latest_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "checkpoint_step",
    "COMPLETE_MARKER",
]

COMPLETE_MARKER = ".complete"
"""File written last into a checkpoint folder; a folder without it is incomplete."""

_STEP = re.compile(r"step-(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, then ``os.replace`` into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Union[str, os.PathLike], storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            torch.save(checkpoint, temporary)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()

    def load_checkpoint(self, path: Union[str, os.PathLike], map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only)


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a ``step-<N>.ckpt`` name, or None."""
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """A checkpoint file, or a folder holding the completion marker."""
    if path.is_file():
        return True
    return path.is_dir() and (path / COMPLETE_MARKER).exists()


def find_latest_checkpoint(folder: Union[str, os.PathLike]) -> Optional[Path]:
    """The complete ``step-<N>.ckpt`` with the largest N in ``folder`` (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [(checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return max(candidates)[1] if candidates else None


def resolve_resume(resume: str, folder: Union[str, os.PathLike]) -> Optional[str]:
    """``ckpt_path`` for ``Trainer.fit`` from ``checkpoint.resume`` (``auto``, ``never`` or a path)."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = find_latest_checkpoint(folder)
        return None if latest is None else str(latest)
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} does not exist; use 'auto', 'never' or an existing checkpoint")
    if not is_complete(path):
        raise ValueError(f"checkpoint.resume={resume!r} is an incomplete checkpoint (no {COMPLETE_MARKER} marker)")
    return str(path)


def prune_checkpoints(folder: Union[str, os.PathLike], keep_last: int) -> list[Path]:
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
