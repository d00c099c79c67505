"""Run a function on several forked gloo ranks inside one pytest process.

Forking (instead of spawning) keeps the modules the parent already imported, so a 2-4 rank test
costs well under a second once ``tests/conftest.py`` has pre-imported the heavy torch modules.

Each rank:

1. joins a gloo process group rendezvoused through a ``FileStore`` in a fresh temporary folder
   (no fixed TCP port, so parallel test runs cannot collide), then waits in a barrier for every rank,
2. runs ``fn(rank, world_size, *args, **kwargs)`` with ``torch.set_num_threads(1)``,
3. sends its (picklable) return value, or its formatted traceback, back through a pipe,
4. destroys the process group and leaves with ``os._exit`` (never running the parent's pytest
   machinery twice).

The parent re-raises the first failing rank's traceback as :class:`RankError` and kills every rank
still alive; if the ranks do not finish within ``timeout`` seconds it kills them all and raises
:class:`RankTimeoutError` naming the ranks that did not finish. A failing or hanging rank can
therefore never hang the test suite. If connecting the ranks fails (before any rank has started
``fn``), the whole launch is repeated, up to three times.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["RankError", "RankTimeoutError", "run_ranks"]

# Without the setup barrier, ~1 launch in 50 failed in gloo's connectFullMesh with "Connection closed by
# peer": a rank that had finished connecting ran a short test, tore its process group down and closed
# its sockets while a peer was still completing the handshake. The barrier removed that (0 failures in
# 600 launches). A setup failure that still happens occurs before any rank runs the test function,
# so the whole launch is repeated.
_SETUP_ATTEMPTS = 3

# After one rank failed, give the others this long to report their own outcome before killing them
# (they are usually blocked in a collective waiting for the failed rank).
_FAILURE_GRACE_S = 1.0


class RankError(RuntimeError):
    """A rank raised; the message holds that rank's formatted traceback."""

    def __init__(
        self, rank: int, remote_traceback: str, other_failed: list[int], tracebacks: dict[int, str] | None = None
    ) -> None:
        others = f" (ranks {other_failed} failed too)" if other_failed else ""
        super().__init__(f"rank {rank} failed{others}:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.tracebacks = tracebacks if tracebacks is not None else {rank: remote_traceback}
        """Every rank that failed (in the order they reported) -> its traceback or exit message."""


class RankTimeoutError(TimeoutError):
    """Some ranks did not finish within the timeout; they were killed."""


def _rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    conn: Connection,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Body of one forked rank: init gloo, run ``fn``, report, tear down, ``os._exit``."""
    exit_code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        for key, value in (
            ("RANK", rank),
            ("LOCAL_RANK", rank),
            ("WORLD_SIZE", world_size),
            ("LOCAL_WORLD_SIZE", world_size),
            ("GROUP_RANK", 0),
        ):
            os.environ[key] = str(value)
        try:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
            # No rank starts ``fn`` before every rank is connected: a failed setup can then be
            # retried without any rank having run part of the test.
            dist.barrier()
        except BaseException:  # noqa: BLE001
            payload = pickle.dumps(("setup_error", traceback.format_exc()))
            exit_code = 1
        else:
            try:
                result = fn(rank, world_size, *args, **kwargs)
                payload = pickle.dumps(("ok", result))
            except BaseException:  # noqa: BLE001 - everything goes back to the parent
                payload = pickle.dumps(("error", traceback.format_exc()))
                exit_code = 1
        conn.send_bytes(payload)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the outcome was already reported
            pass
    except BaseException:  # noqa: BLE001 - e.g. the result could not be pickled or sent
        exit_code = 1
        try:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            conn.close()
        finally:
            os._exit(exit_code)


def _kill(procs: dict[int, mp.process.BaseProcess]) -> None:
    """SIGKILL every rank still alive and reap it."""
    for proc in procs.values():
        if proc.is_alive() and proc.pid is not None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs.values():
        proc.join(timeout=5)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    failure_grace_s: float = _FAILURE_GRACE_S,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked gloo ranks.

    Args:
        fn: the per-rank function. It may be a closure or a lambda (nothing is pickled on the way in);
            its return value must be picklable with :mod:`pickle` (return plain tensors, not DTensors).
        world_size: number of ranks to fork (>= 1).
        timeout: seconds all ranks together may take before every rank is killed.
        failure_grace_s: once a rank failed (or died), how long the others may still take to report their own
            outcome before they are killed (a test of how ranks react to a dead peer needs more than the default).

    Returns:
        The ranks' return values, indexed by rank.

    Raises:
        RankError: a rank raised; the message names the rank and holds its traceback.
        RankTimeoutError: a rank did not finish in time; the message names the unfinished ranks.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    for attempt in range(1, _SETUP_ATTEMPTS + 1):
        outcome = _attempt(
            fn, world_size, args, kwargs, deadline, timeout, failure_grace_s, last=attempt == _SETUP_ATTEMPTS
        )
        if outcome is not None:
            return outcome
        print(
            f"run_ranks: connecting the {world_size} gloo ranks failed (attempt {attempt}/{_SETUP_ATTEMPTS}); "
            "no rank had started the test, retrying",
            file=sys.stderr,
        )
    raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover


def _attempt(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    deadline: float,
    timeout: float,
    failure_grace_s: float = _FAILURE_GRACE_S,
    *,
    last: bool = False,
) -> list[Any] | None:
    """Fork the ranks once. Returns their results, or None if the process-group setup failed on some
    rank (then no rank ran ``fn``) and another attempt is allowed; raises on any other failure."""
    ctx = mp.get_context("fork")
    tmpdir = tempfile.mkdtemp(prefix="run_ranks_")
    store_path = os.path.join(tmpdir, "filestore")
    procs: dict[int, mp.process.BaseProcess] = {}
    readers: dict[Connection, int] = {}
    results: dict[int, Any] = {}
    failures: list[tuple[int, str]] = []
    setup_failed = False
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(rank, world_size, store_path, writer, fn, args, kwargs),
                name=f"rank{rank}",
                daemon=True,
            )
            proc.start()
            writer.close()  # the parent keeps only the read end, so EOF means the rank died
            procs[rank] = proc
            readers[reader] = rank
        while readers and not setup_failed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(readers), timeout=remaining):
                rank = readers.pop(conn)  # type: ignore[arg-type]
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    procs[rank].join(timeout=5)
                    status = "error"
                    value = f"rank {rank} exited (exit code {procs[rank].exitcode}) without reporting"
                finally:
                    conn.close()
                if status == "ok":
                    results[rank] = value
                    continue
                if status == "setup_error":
                    setup_failed = True
                if not failures:  # the others are probably stuck waiting for this rank
                    deadline = min(deadline, time.monotonic() + failure_grace_s)
                failures.append((rank, value))
        unfinished = sorted(readers.values())
        _kill(procs)
        if setup_failed and not last and time.monotonic() < deadline:
            return None
        if failures:
            first_rank, first_tb = failures[0]
            raise RankError(first_rank, first_tb, [r for r, _ in failures[1:]], dict(failures))
        if unfinished:
            raise RankTimeoutError(
                f"ranks {unfinished} of {world_size} did not finish within {timeout} s and were killed"
            )
        return [results[rank] for rank in range(world_size)]
    finally:
        _kill(procs)
        for conn in readers:
            conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
