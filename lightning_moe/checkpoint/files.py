"""Checkpoint layouts on disk: the one completeness rule and the one atomic writer.

A checkpoint is either a file (``torch.save``) or a distributed (DCP) folder::

    ckpt/
      .metadata          # torch.distributed.checkpoint index (written by ``dcp.save``)
      __<rank>_0.distcp  # each rank's shards
      meta.pt            # everything but the tensors of the model and optimizers
      manifest.json      # every file's size and SHA-256 (:mod:`.manifest`)
      .complete          # marker written last

A checkpoint file ``step-N.ckpt`` has its manifest beside it (``step-N.ckpt.manifest.json``).

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
    "CheckpointWriteError",
    "META_FILENAME",
    "IncompleteCheckpointError",
    "PathLike",
    "atomic_save",
    "fsync_dir",
    "fsync_file",
    "is_complete",
    "is_complete_distributed_checkpoint",
    "is_distributed_checkpoint",
    "needs_pickled_code",
    "read_torch_file",
    "replace_path",
    "require_complete",
    "temporary_sibling",
    "write_torch_file",
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


def _first_os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: its cause/context chain, or a DCP ``CheckpointException``'s failures."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for f in failures.values():  # each an exception, or an (exception, traceback) pair
                f = f[0] if isinstance(f, tuple) and f else f
                if isinstance(f, BaseException):
                    todo.append(f)
    return None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file size limit, ...); the previous one is intact."""

    @classmethod
    def wrap(cls, err: BaseException, path: Path) -> CheckpointWriteError:
        """One line naming ``path`` and the reason (``No space left on device``, ``File too large``, ...)."""
        if isinstance(err, OSError):
            reason = err.strerror or str(err) or type(err).__name__
            if err.filename and str(err.filename) != str(path):
                reason += f" ({err.filename})"
            errno = err.errno
        else:  # torch.save / DCP report a failed write as a RuntimeError / CheckpointException
            cause = _first_os_error(err)
            if cause is not None:
                return cls.wrap(cause, path)
            reason = (
                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__} (is the disk full?)"
            )
            errno = None
        return cls(
            errno,
            f"could not write the checkpoint {str(path)!r}: {reason}. Nothing was replaced: the previous"
            " checkpoints are intact. Free space (or raise the file size limit) and re-run the same command",
        )

    def __str__(self) -> str:
        return self.strerror or super().__str__()


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


def write_torch_file(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object and flush it to the disk.

    Through a file object, a failed write (disk full, file size limit) raises the ``OSError`` that says so;
    torch's own file writer reports it as an unrelated position mismatch.
    """
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj: Any, path: PathLike, *, manifest: bool = False) -> None:
    """``torch.save`` ``obj`` to a temporary file beside ``path``, flush it, then rename it into place.

    Args:
        obj: what to save.
        path: the destination file.
        manifest: also write ``<path>.manifest.json`` (size and SHA-256, :mod:`.manifest`). The old
            manifest goes first and the new one comes after the file, so an interruption leaves a whole
            file without a manifest (accepted) rather than a manifest that does not match.

    Raises:
        CheckpointWriteError: writing failed (disk full, file size limit, permissions); the destination
            still holds what it held before, and nothing is left behind.
    """
    from lightning_moe.checkpoint.manifest import digest, file_manifest_path, write_manifest

    path = Path(path)
    tmp = temporary_sibling(path)
    tmp_manifest = temporary_sibling(file_manifest_path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_torch_file(obj, tmp)
        if manifest:
            write_manifest(tmp_manifest, {path.name: digest(tmp)})
        file_manifest_path(path).unlink(missing_ok=True)
        replace_path(tmp, path)
        if manifest:
            replace_path(tmp_manifest, file_manifest_path(path))
    except CheckpointWriteError:
        raise
    except (OSError, RuntimeError) as err:
        raise CheckpointWriteError.wrap(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)


def needs_pickled_code(err: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` failed on a class or function to import (pickled code),
    as opposed to bytes that are no checkpoint at all."""
    return "unsupported global" in str(err).lower()


def read_torch_file(path: Path, weights_only: bool | None, *, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` (onto the CPU by default); a file that ``weights_only=True`` refuses gets a one-line
    message saying what to do, and a file that is not a readable checkpoint says so.

    Args:
        path: the file.
        weights_only: passed to ``torch.load`` (``None`` means ``True`` here, whatever torch's default).
        mmap: map the file instead of reading it (every rank then shares the page cache).
        map_location: passed to ``torch.load``.
    """
    weights_only = True if weights_only is None else weights_only
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=weights_only, mmap=mmap)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - the unpickler raises several types
        if weights_only is False:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        if needs_pickled_code(e):
            raise ValueError(
                f"refusing to load {str(path)!r} with `weights_only=True`: it holds pickled code or objects, not"
                f" only tensors and plain types ({detail}). Only if you trust where it came from, load it"
                " with `weights_only=False` (e.g. `Trainer.fit(..., ckpt_path=..., weights_only=False)`)."
            ) from e
        raise ValueError(
            f"{str(path)!r} is not a checkpoint that torch.load can read ({type(e).__name__}: {detail})"
        ) from e
