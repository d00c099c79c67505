"""An inter-process file lock, so that ranks preparing the same cache do the work once.

``prepare_data`` may run on several processes at once (every rank of a script that prepares data before
building its Trainer, or one process per node on a shared file system). Whoever takes the lock first
downloads or trains; the others wait, then find the verified result in the cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

__all__ = ["file_lock"]

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking, the atomic writes still keep files whole
    fcntl = None  # type: ignore[assignment]


@contextmanager
def file_lock(target: Union[str, os.PathLike]) -> Iterator[None]:
    """Hold an exclusive lock for ``target`` (the lock file is ``<folder>/.locks/<name>.lock``)."""
    target = Path(target)
    lock_dir = target.parent / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_dir / f"{target.name}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
