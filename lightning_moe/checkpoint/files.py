"""Checkpoint layouts on disk: the one completeness rule and the one atomic writer.

A checkpoint is either a file (``torch.save``) or a distributed (DCP) folder::

    ckpt/
      .metadata          # torch.distributed.checkpoint index (written by ``dcp.save``)
      __<rank>_0.distcp  # each rank's shards
      meta.pt            # everything but the tensors of the model and optimizers
      .complete          # marker written last

Both are written under a temporary name beside the destination and renamed into place, so a reader never
takes a half-written checkpoint for a whole one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Union

import torch

__all__ = [
    "COMPLETE_MARKER",
    "DCP_METADATA",
    "META_FILENAME",
    "IncompleteCheckpointError",
    "PathLike",
    "atomic_save",
    "fsync_dir",
    "fsync_file",
    "is_complete",
    "is_complete_distributed_checkpoint",
    "is_distributed_checkpoint",
    "read_torch_file",
    "replace_path",
    "require_complete",
    "temporary_sibling",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File holding everything but the tensors of the model and optimizers (Lightning's name for it).
META_FILENAME = "meta.pt"
#: Empty marker file written last into a distributed checkpoint folder.
COMPLETE_MARKER = ".complete"
#: The index ``torch.distributed.checkpoint`` writes into a folder.
DCP_METADATA = ".metadata"


class IncompleteCheckpointError(ValueError):
    """The folder is not a finished checkpoint (no completion marker / no index)."""


def is_distributed_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a folder written by ``torch.distributed.checkpoint`` (complete or not)."""
    p = Path(path)
    return p.is_dir() and (p / DCP_METADATA).is_file()


def is_complete_distributed_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a finished distributed checkpoint folder (index, meta and marker present)."""
    p = Path(path)
    return is_distributed_checkpoint(p) and (p / COMPLETE_MARKER).is_file() and (p / META_FILENAME).is_file()


def is_complete(path: PathLike) -> bool:
    """Whether ``path`` is a checkpoint a run may load: a file, or a finished distributed folder.

    A file is whole because it only ever appears under its name through :func:`replace_path`.
    """
    p = Path(path)
    return p.is_file() or is_complete_distributed_checkpoint(p)


def require_complete(path: Path) -> None:
    """Raise :class:`IncompleteCheckpointError` unless the folder ``path`` is a finished checkpoint."""
    if not (path / DCP_METADATA).is_file():
        raise IncompleteCheckpointError(
            f"{str(path)!r} is a folder without a `{DCP_METADATA}` index, so it is not a distributed checkpoint"
            " (or its writing was interrupted). Pass a checkpoint folder or a full checkpoint file."
        )
    if not is_complete_distributed_checkpoint(path):
        raise IncompleteCheckpointError(
            f"The checkpoint folder {str(path)!r} is incomplete: it has no `{COMPLETE_MARKER}` marker"
            f" (or no `{META_FILENAME}`), so its writing was interrupted. Resume from an earlier checkpoint."
        )


def temporary_sibling(path: Path, tag: str = "tmp", token: str = "") -> Path:
    """A unique name beside ``path`` (``<name>.<tag>-<token>``) that no checkpoint scan takes for a checkpoint."""
    return path.with_name(f"{path.name}.{tag}-{token or uuid.uuid4().hex}")


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names) to the disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` (file or folder) to ``dst``, replacing an older checkpoint there; ``dst`` is never partial."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
    else:
        # os.replace cannot put a file over a folder (or the reverse): move the old one aside first
        old = temporary_sibling(dst, "old")
        os.replace(dst, old)
        os.replace(src, dst)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    fsync_dir(dst.parent)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to a temporary file beside ``path``, flush it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        torch.save(obj, tmp)
        fsync_file(tmp)
        replace_path(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_torch_file(path: Path, weights_only: bool | None, *, mmap: bool = False) -> Any:
    """``torch.load`` onto the CPU; a file that ``weights_only=True`` refuses gets a message saying what to do.

    Args:
        path: the file.
        weights_only: passed to ``torch.load`` (``None``: torch's default, which is ``True``).
        mmap: map the file instead of reading it (every rank then shares the page cache).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - the unpickler raises several types
        if weights_only is False:
            raise
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"Could not read {str(path)!r} with `weights_only=True`: it holds objects other than plain types"
            f" ({type(e).__name__}: {first_line}). If you trust this checkpoint, pass `weights_only=False`"
            " (e.g. `Trainer.fit(..., ckpt_path=..., weights_only=False)`)."
        ) from e
