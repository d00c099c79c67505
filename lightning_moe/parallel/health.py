"""Which rank stopped? Bounded collective timeouts and a per-rank heartbeat in the process group's store.

A rank that dies mid-training (SIGKILL, the OOM killer, a lost node) shows up on the other ranks as a gloo /
NCCL error ("Connection reset by peer") when its sockets close, or as a collective timeout when they do not
(a frozen process, a lost machine). Neither error names the rank, and a rank that was not talking to the dead
one directly only fails once its own collective times out.

So every rank bumps a counter ``lightning_moe/heartbeat/<rank>`` in the default process group's store (the
``TCPStore`` of ``env://``, torchrun's agent store, or a ``FileStore``) from a daemon thread every
``interval`` seconds. When a collective fails, :meth:`Heartbeat.check` watches the counters for a few
intervals: the ranks whose counter did not move are gone (dead or frozen). A store that cannot be reached at
all means its host is gone: rank 0 under ``env://`` / Lightning's launcher. :func:`rank_failure` turns that
into a :class:`RankFailureError` naming the ranks.

No collective is involved in the check (the process group may be broken), only store reads, so every
surviving rank reaches the same verdict on its own. Bound: a killed process is noticed at once (its sockets
close); a frozen one after the collective timeout (:func:`set_collective_timeout`); then the check takes at
most ``check_intervals * interval`` seconds.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store, _set_pg_timeout

__all__ = [
    "Heartbeat",
    "HealthReport",
    "RankFailureError",
    "RankWatch",
    "exited_children",
    "is_communication_error",
    "rank_failure",
    "set_collective_timeout",
    "store_host_rank",
]

HEARTBEAT_PREFIX = "lightning_moe/heartbeat"

log = logging.getLogger(__name__)

_PROCESS_HEARTBEAT: Heartbeat | None = None  # see Heartbeat.running_for_default_group

# Errors of the collective layer whose text (not type) says so: gloo raises plain RuntimeErrors.
_DEFINITE = re.compile(r"gloo|nccl|ProcessGroup|Connection (reset|closed|refused)|Broken pipe", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# "[/path/to/gloo/transport/tcp/pair.cc:537] Read error ..." -> "Read error ..."
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")


class RankFailureError(RuntimeError):
    """Some ranks stopped responding (or a collective failed); the job cannot go on.

    Attributes:
        ranks: the global ranks that stopped responding (empty when every rank is still alive).
        world_size: the number of ranks of the job.
        where: what this rank was doing, e.g. ``"backward at global step 12"``.
    """

    def __init__(self, message: str, ranks: list[int], world_size: int, where: str) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.world_size = world_size
        self.where = where


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` may come from a collective or the store (a dead/frozen peer, a timeout)."""
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return bool(_DEFINITE.search(text) or _TIMEOUT.search(text))


def set_collective_timeout(timeout: timedelta, groups: Iterable[dist.ProcessGroup | None]) -> None:
    """Give every group in ``groups`` (``None`` = the default group) the collective ``timeout``.

    ``init_process_group(timeout=...)`` only sets the default group's: subgroups (a device mesh's dims) are
    created with torch's default (30 minutes for gloo) unless told otherwise.
    """
    seen: set[int] = set()
    for group in groups:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        if id(pg) not in seen:
            seen.add(id(pg))
            _set_pg_timeout(timeout, pg)


@dataclass
class HealthReport:
    """The verdict of :meth:`Heartbeat.check`."""

    unresponsive: list[int] = field(default_factory=list)
    """Ranks whose heartbeat did not move during the check."""
    store_error: str | None = None
    """Set when the store itself could not be read (its host is gone); ``unresponsive`` is then empty."""


class Heartbeat:
    """A daemon thread that bumps this rank's counter in ``store`` every ``interval`` seconds.

    Arguments:
        store: a c10d store shared by all ranks (thread-safe); keys go under :data:`HEARTBEAT_PREFIX`.
        rank, world_size: this rank and the number of ranks.
        interval: seconds between two beats.
        check_intervals: how many intervals :meth:`check` waits for a silent rank before calling it gone.
    """

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, interval: float = 0.5, check_intervals: int = 4
    ) -> None:
        if interval <= 0 or check_intervals < 2:
            raise ValueError(f"interval={interval!r} must be > 0 and check_intervals={check_intervals!r} >= 2")
        self._raw_store = store
        self.store = dist.PrefixStore(HEARTBEAT_PREFIX, store)
        self.rank = rank
        self.world_size = world_size
        self.interval = interval
        self.check_intervals = check_intervals
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_default_group(cls, **kwargs: float) -> Heartbeat:
        """A heartbeat in the default process group's store, for this rank (not started)."""
        return cls(_get_default_store(), dist.get_rank(), dist.get_world_size(), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def running_for_default_group(cls) -> Heartbeat:
        """The process's one running heartbeat for the current default process group (started if needed; the
        heartbeat of a previous, destroyed group is stopped)."""
        global _PROCESS_HEARTBEAT
        store = _get_default_store()
        current = _PROCESS_HEARTBEAT
        if current is not None and current._raw_store is store and current.running:
            return current
        if current is not None:
            current.stop()
        _PROCESS_HEARTBEAT = cls.for_default_group().start()
        return _PROCESS_HEARTBEAT

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Heartbeat:
        """Beat once now (so every key exists), then every ``interval`` seconds until :meth:`stop`."""
        if self.running:
            return self
        self._stop.clear()
        self.store.add(str(self.rank), 1)
        self._thread = threading.Thread(target=self._beat, name=f"lightning_moe-heartbeat-{self.rank}", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop beating (other ranks then see this rank as gone when one of their collectives fails)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.interval)
        self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.add(str(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store's host is gone; `check` reports it
                return

    def _counters(self, ranks: list[int]) -> dict[int, int]:
        # add(key, 0) reads without blocking (a missing key reads as 0), unlike get()
        return {r: int(self.store.add(str(r), 0)) for r in ranks}

    def check(self, known_dead: Callable[[], Iterable[int]] | None = None) -> HealthReport:
        """Watch every other rank's counter for up to ``check_intervals * interval`` s; the silent ones are gone.

        ``known_dead`` (optional) returns ranks whose process is known to have exited (e.g. the children of
        Lightning's launcher, seen from rank 0): the watch ends as soon as every silent rank is among them.

        A silent rank that left a verdict (:meth:`record_verdict`) noticed the failure itself and exited: it is
        not counted, but the ranks it named are (when they are silent here too). So a rank that notices late
        (its collective had to time out) still names the rank that died, not the survivors that left since.
        """
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            first = self._counters(others)
            deadline = time.monotonic() + self.check_intervals * self.interval
            silent = list(others)
            while silent and time.monotonic() < deadline:
                time.sleep(self.interval / 2)
                now = self._counters(silent)
                silent = [r for r in silent if now[r] == first[r]]
                if known_dead is not None and set(silent) <= set(known_dead()):
                    break
            left: set[int] = set()
            named: set[int] = set()
            for r in silent:
                if self.store.check([f"verdict/{r}"]):
                    left.add(r)
                    named.update(int(x) for x in self.store.get(f"verdict/{r}").decode().split(",") if x)
        except Exception as exc:  # noqa: BLE001 - any store failure means the store is unreachable
            return HealthReport(store_error=_first_line(exc))
        return HealthReport(unresponsive=sorted((set(silent) - left) | (named & set(silent))))

    def record_verdict(self, ranks: list[int]) -> None:
        """Tell the ranks that check later which ranks this one found gone (before it exits)."""
        try:
            self.store.set(f"verdict/{self.rank}", ",".join(str(r) for r in ranks))
        except Exception:  # noqa: BLE001 - the store is gone: nobody can read it anyway
            pass


def rank_failure(
    cause: BaseException,
    heartbeat: Heartbeat,
    where: str,
    *,
    timeout: timedelta | None = None,
    store_host: int | None = None,
    known_dead: Callable[[], Iterable[int]] | None = None,
) -> RankFailureError | None:
    """The :class:`RankFailureError` that explains ``cause`` (a failed collective), or ``None`` when it is not a
    communication error, or may be none with every rank alive (then re-raise ``cause`` unchanged).

    Arguments:
        cause: the exception this rank got.
        heartbeat: this rank's (running) heartbeat; its :meth:`Heartbeat.check` takes a few intervals.
        where: what this rank was doing, e.g. ``"backward at global step 12"``.
        timeout: the collective timeout, quoted when every rank is still alive.
        store_host: the rank whose process hosts the store (see :func:`store_host_rank`), ``None`` when no rank
            does (torchrun's agent, a file store).
        known_dead: see :meth:`Heartbeat.check` (makes the check end early).
    """
    if not is_communication_error(cause):
        return None
    world, me = heartbeat.world_size, heartbeat.rank
    seen = _first_line(cause)
    report = heartbeat.check(known_dead)
    resume = (
        "The job stops; run the same command again to resume from the last complete checkpoint"
        " (lightning_moe.train: checkpoint.resume=auto; a plain Trainer: fit(ckpt_path=...))."
    )
    if report.store_error is not None:
        if store_host is None:
            message = (
                f"rank {me} (of {world}) cannot reach the process group's store during {where}"
                f" ({report.store_error}); its host (torchrun's agent or a shared file) is gone. {resume}"
            )
            ranks: list[int] = []
        else:
            message = (
                f"rank {store_host} (of {world}) stopped responding during {where}: the process group's store it"
                f" hosts is unreachable ({report.store_error}); rank {me} saw: {seen}. {resume}"
            )
            ranks = [store_host]
        return RankFailureError(message, ranks, world, where)
    heartbeat.record_verdict(report.unresponsive)
    if report.unresponsive:
        gone = report.unresponsive
        names = f"rank {gone[0]}" if len(gone) == 1 else "ranks " + ", ".join(str(r) for r in gone)
        message = (
            f"{names} (of {world}) stopped responding during {where}: died, exited or froze (see that rank's own"
            f" log for its error); rank {me} saw: {seen}. {resume}"
        )
        return RankFailureError(message, gone, world, where)
    if not _from_the_collective_layer(cause):
        return None  # e.g. a "timed out" of the user's own code, with every rank alive: not ours to explain
    bound = f" (timeout {timeout.total_seconds():g} s)" if timeout is not None else ""
    message = (
        f"a collective failed on rank {me} (of {world}) during {where}{bound}, but every rank is still alive:"
        f" a rank raised its own error or is stuck elsewhere (other ranks' logs), or ranks called different"
        f" collectives. Rank {me} saw: {seen}. {resume}"
    )
    return RankFailureError(message, [], world, where)


def store_host_rank(store: dist.Store | None = None) -> int | None:
    """The rank whose process serves ``store`` (default: the default group's): 0 for the ``TCPStore`` of
    ``env://`` (Lightning's launcher, ``init_process_group`` with ``MASTER_ADDR``), ``None`` for torchrun's agent
    store or a store without a server process (``FileStore``, ``HashStore``)."""
    store = _get_default_store() if store is None else store
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    return 0


def _from_the_collective_layer(exc: BaseException) -> bool:
    text = str(exc).strip()
    return isinstance(exc, dist.DistError) or bool(_DEFINITE.search(text) or _SOURCE_PREFIX.match(text))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = _SOURCE_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
    text = text.split(". ")[0]  # gloo goes on with "This is typically caused by ..."
    return text if len(text) <= 200 else text[:197] + "..."


def exited_children(procs: Sequence[Any], first_rank: int) -> list[int]:
    """The global ranks of the child processes in ``procs`` (``subprocess.Popen`` s, the i-th one running rank
    ``first_rank + i``) that have exited: a launcher's children whose death this rank can see directly."""
    return [first_rank + i for i, proc in enumerate(procs) if proc.poll() is not None]


class RankWatch:
    """Bounded collective timeouts and this rank's heartbeat, and a context that names the ranks behind a
    failed collective.

    Arguments:
        timeout: the collective timeout of every group (``None``: torch's default).
        known_dead: ranks known to have exited without asking the store (see :meth:`Heartbeat.check`).
    """

    def __init__(self, timeout: timedelta | None, known_dead: Callable[[], Iterable[int]] | None = None) -> None:
        self.timeout = timeout
        self.known_dead = known_dead
        self.heartbeat: Heartbeat | None = None

    def start(self) -> None:
        """Apply ``timeout`` to the default group and start the heartbeat (once per process group)."""
        if self.timeout is not None:
            set_collective_timeout(self.timeout, [None])
        if dist.get_world_size() > 1:
            self.heartbeat = Heartbeat.running_for_default_group()

    def cover(self, groups: Iterable[dist.ProcessGroup | None]) -> None:
        """Apply ``timeout`` to more groups (a device mesh's subgroups are created with torch's default)."""
        if self.timeout is not None:
            set_collective_timeout(self.timeout, groups)

    @contextmanager
    def __call__(self, where: Callable[[], str]) -> Iterator[None]:
        """Turn a failed collective inside the block into a :class:`RankFailureError` naming the ranks that
        stopped responding; other errors pass through unchanged. ``where()`` says what this rank was doing."""
        try:
            yield
        except RankFailureError:
            raise
        except Exception as exc:
            if self.heartbeat is None or not self.heartbeat.running:
                raise
            error = rank_failure(
                exc,
                self.heartbeat,
                where(),
                timeout=self.timeout,
                store_host=store_host_rank(),
                known_dead=self.known_dead,
            )
            if error is None:
                raise
            # logged before raising: under Lightning's launcher rank 0 may be killed while the error unwinds
            log.error("[rank %d] %s", self.heartbeat.rank, error)
            raise error from exc
