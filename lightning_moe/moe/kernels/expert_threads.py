"""Run the experts of the CPU loop path on several threads, whole experts per thread.

A matrix product over the few rows one expert receives divides badly between intra-op threads, which
then wait for each other; giving each thread whole experts instead (what a batched GEMM does with its
batch) runs every product on one core at full rate. Larger groups already use the intra-op threads well
and stay there, except where the caller asks otherwise (bf16 experts with large weights, ``product_layout.py``).
Figures: README ("MoE layer against an equal-FLOP dense FFN", ``python benchmarks/moe_layer.py``).

There are as many workers as the calling thread has intra-op threads (``torch.get_num_threads()``). They
take the experts one at a time from a shared list, largest first, so that a worker slowed down by anything
(an uneven expert, another process on its core) simply takes fewer. The workers are daemon threads created
once per process (again after a fork, or when the thread count changes); each sets itself to one intra-op
thread for the task and the caller's count is restored afterwards (``torch.set_num_threads`` also changes
the default that new threads start with). Tasks run under ``torch.no_grad()``: they are the inside of an
autograd node.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

import torch

__all__ = ["run_over_experts", "expert_order", "splits_over_threads", "MAX_ROWS_PER_EXPERT", "MIN_SPLIT_WORK"]

S = TypeVar("S")

MAX_ROWS_PER_EXPERT = 256
"""Experts are spread over threads when they average at most this many rows (larger products already
use the intra-op threads well)."""

MIN_SPLIT_WORK = 1 << 24
"""Smallest ``rows x in-width x out-width`` of one weight's products worth handing to threads (tests set 0)."""


def splits_over_threads(bounds: Sequence[int], matrix_size: int, num_threads: int, any_rows: bool = False) -> bool:
    """Whether experts with row offsets ``bounds`` (``[0, n_0, n_0+n_1, ..., N]``) and ``matrix_size``
    (in-width x out-width of one weight) run faster spread over ``num_threads`` threads; with ``any_rows``
    whatever their row counts (the caller knows its products gain from it, see ``product_layout.py``)."""
    num_rows = bounds[-1]
    busy = sum(1 for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e])
    if num_threads < 2 or busy < 2 or num_rows * matrix_size < MIN_SPLIT_WORK:
        return False
    return any_rows or num_rows <= MAX_ROWS_PER_EXPERT * busy


def expert_order(bounds: Sequence[int]) -> list[int]:
    """The order in which workers take the experts: most rows first (then by index), so that the last experts
    taken are the smallest and the workers finish together."""
    return sorted(range(len(bounds) - 1), key=lambda e: (bounds[e] - bounds[e + 1], e))


class _SharedExperts:
    """Experts handed out one at a time to whichever worker asks next; none after a worker failed."""

    def __init__(self, order: list[int]) -> None:
        self._order = order
        self._next = 0
        self._lock = threading.Lock()
        self.failed = False

    def take(self) -> int | None:
        with self._lock:
            if self.failed or self._next == len(self._order):
                return None
            self._next += 1
            return self._order[self._next - 1]


class _Workers:
    """Daemon threads, each serving its own queue of ``(fn, args, future)`` tasks."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(size)]
        for i, q in enumerate(self._queues):
            threading.Thread(target=_serve, args=(q,), name=f"lightning_moe-experts-{i}", daemon=True).start()

    def submit(self, worker: int, fn: Callable[..., None], *args: object) -> Future:
        future: Future = Future()
        self._queues[worker].put((fn, args, future))
        return future

    def close(self) -> None:
        for q in self._queues:
            q.put(None)


def _serve(tasks: queue.SimpleQueue) -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        fn, args, future = task
        error: BaseException | None = None
        try:
            torch.set_num_threads(1)  # this thread's products run on one core; the caller restores its count
            with torch.no_grad():
                fn(*args)
        except BaseException as exc:  # handed to the caller, which re-raises it
            error = exc
        # Drop the task before reporting that it is done: its closure refers to the caller's tensors, and a
        # gradient that still has another reference when the caller returns it is copied by autograd instead
        # of being handed to the parameter.
        del task, fn, args
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
        del future, error


_workers: _Workers | None = None
_workers_lock = threading.Lock()
_worker_local = threading.local()


def _forget_workers_after_fork() -> None:
    """In a forked child the workers' threads do not exist (and the lock may have been held): start afresh."""
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_workers_after_fork)


def _get_workers(size: int) -> _Workers:
    global _workers
    with _workers_lock:
        if _workers is None or _workers.pid != os.getpid() or _workers.size != size:
            if _workers is not None and _workers.pid == os.getpid():
                _workers.close()
            _workers = _Workers(size)
        return _workers


def _most_rows(bounds: Sequence[int]) -> int:
    return max((bounds[e + 1] - bounds[e] for e in range(len(bounds) - 1)), default=0)


def run_over_experts(
    fn: Callable[[int, int, S], None],
    bounds: Sequence[int],
    matrix_size: int,
    scratch: Callable[[int], S] = lambda rows: None,
    any_rows: bool = False,
) -> None:
    """``fn(lo, hi, scratch(rows))`` over the experts: once for all of them, or expert by expert on worker
    threads (``fn(e, e + 1, ...)``, each expert exactly once, in no fixed order).

    Args:
        fn: does the work of experts ``lo .. hi-1``, writing only their own rows and slices; runs under
            ``torch.no_grad()`` on a worker thread with one intra-op thread when split.
        bounds: row offsets ``[0, n_0, n_0+n_1, ..., N]`` of the expert-sorted rows.
        matrix_size: in-width x out-width of one expert weight (decides, with the rows, whether to split).
        scratch: makes working memory for experts of at most ``rows`` rows, one per worker. It runs in the
            calling thread: memory that worker threads allocate and free comes from malloc's per-thread
            arenas, which hand blocks of this size back to the OS, and every step pays the page faults
            again (slower than not splitting at all).
        any_rows: split whatever the experts' row counts (see :func:`splits_over_threads`).
    """
    num_threads = torch.get_num_threads()
    if getattr(_worker_local, "inside", False) or not splits_over_threads(bounds, matrix_size, num_threads, any_rows):
        fn(0, len(bounds) - 1, scratch(_most_rows(bounds)))
        return
    experts = _SharedExperts(expert_order(bounds))
    workers = _get_workers(num_threads)
    rows = _most_rows(bounds)
    futures = [workers.submit(i, _take_experts, fn, experts, scratch(rows)) for i in range(num_threads)]
    try:
        for f in futures:
            f.result()
    finally:
        experts.failed = True  # after a failure the other workers take no further expert ...
        for f in futures:  # ... and all have stopped before the caller's thread count comes back
            f.exception()
        torch.set_num_threads(num_threads)


def _take_experts(fn: Callable[[int, int, S], None], experts: _SharedExperts, scratch: S) -> None:
    """Run ``fn`` on experts taken from ``experts`` until none is left, with this worker marked so that a
    nested :func:`run_over_experts` runs inline instead of waiting on itself."""
    _worker_local.inside = True
    try:
        while (e := experts.take()) is not None:
            try:
                fn(e, e + 1, scratch)
            except BaseException:
                experts.failed = True
                raise
    finally:
        _worker_local.inside = False
