"""Run the experts of the CPU loop path on several threads, whole experts per thread.

A matrix product over the few rows one expert receives (``T*k/E`` of them: 64 at T=4096, E=64, top-1)
divides badly between intra-op threads, which then spend much of each product waiting for each other.
Giving each thread whole experts instead - what a batched GEMM does with its batch - runs every
product on one core at that core's full rate. Measured on the 2-core CPU machine (the six FFN products,
d=512, h=2048, against one large product): 0.82 of the large-matmul rate instead of 0.74 at 64 rows per
expert, 0.90 instead of 0.71 at 128 rows, 0.97-0.99 instead of 0.84-0.85 at 256 rows; at 512 rows the
two ways tie, so larger groups stay on the intra-op threads.

The experts are split into contiguous ranges of about equal work, one per intra-op thread of the calling
thread (``torch.get_num_threads()``). The workers are daemon threads created once per process (again
after a fork, or when the thread count changes); each sets itself to one intra-op thread for the task
and the caller's count is restored afterwards (``torch.set_num_threads`` also changes the default that new
threads start with). Tasks run under ``torch.no_grad()``: they are the inside of an autograd node.
"""

from __future__ import annotations

import bisect
import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Optional, Sequence, TypeVar

import torch

__all__ = ["run_over_experts", "expert_ranges", "splits_over_threads", "MAX_ROWS_PER_EXPERT", "MIN_SPLIT_WORK"]

T = TypeVar("T")
S = TypeVar("S")

MAX_ROWS_PER_EXPERT = 256
"""Experts are spread over threads when they average at most this many rows (larger products already
use the intra-op threads well)."""

MIN_SPLIT_WORK = 1 << 24
"""Smallest ``rows x in-width x out-width`` of one weight's products worth handing to threads (tests set 0)."""

WEIGHT_COST_ROWS = 32
"""An expert's fixed work (streaming its weights, writing their gradients), in rows, for balancing ranges."""


def splits_over_threads(bounds: Sequence[int], matrix_size: int, num_threads: int) -> bool:
    """Whether experts with row offsets ``bounds`` (``[0, n_0, n_0+n_1, ..., N]``) and ``matrix_size``
    (in-width x out-width of one weight) run faster spread over ``num_threads`` threads."""
    num_rows = bounds[-1]
    busy = sum(1 for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e])
    if num_threads < 2 or busy < 2 or num_rows * matrix_size < MIN_SPLIT_WORK:
        return False
    return num_rows <= MAX_ROWS_PER_EXPERT * busy


def expert_ranges(bounds: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Split the experts into at most ``parts`` contiguous non-empty ranges ``[lo, hi)`` of about equal work
    (rows plus :data:`WEIGHT_COST_ROWS` per expert)."""
    num_experts = len(bounds) - 1
    cumulative = [0]
    for e in range(num_experts):
        cumulative.append(cumulative[-1] + bounds[e + 1] - bounds[e] + WEIGHT_COST_ROWS)
    total = cumulative[-1]
    cuts = [0]
    for p in range(1, parts):
        target = total * p / parts
        i = bisect.bisect_left(cumulative, target)
        if i > 0 and target - cumulative[i - 1] < cumulative[min(i, num_experts)] - target:
            i -= 1  # the nearer of the two boundaries around the target
        cuts.append(min(max(i, cuts[-1]), num_experts))
    cuts.append(num_experts)
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


class _Workers:
    """Daemon threads, each serving its own queue of ``(fn, args, future)`` tasks."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(size)]
        for i, q in enumerate(self._queues):
            threading.Thread(target=_serve, args=(q,), name=f"lightning_moe-experts-{i}", daemon=True).start()

    def submit(self, worker: int, fn: Callable[..., T], *args: object) -> Future:
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
        if not future.set_running_or_notify_cancel():
            continue
        try:
            torch.set_num_threads(1)  # this thread's products run on one core; the caller restores its count
            with torch.no_grad():
                result = fn(*args)
        except BaseException as exc:  # handed to the caller, which re-raises it
            future.set_exception(exc)
        else:
            future.set_result(result)
        # Drop the task before waiting for the next: its closure refers to the caller's tensors, and a gradient
        # with an extra reference is copied by autograd instead of being handed to the parameter.
        del task, fn, args, future
        result = None


_workers: Optional[_Workers] = None
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


def _most_rows(bounds: Sequence[int], first: int, last: int) -> int:
    return max((bounds[e + 1] - bounds[e] for e in range(first, last)), default=0)


def run_over_experts(
    fn: Callable[[int, int, S], T],
    bounds: Sequence[int],
    matrix_size: int,
    scratch: Callable[[int], S] = lambda rows: None,
) -> list[T]:
    """``fn(lo, hi, scratch(rows))`` over the experts: once for all of them, or once per contiguous range on
    worker threads.

    Args:
        fn: does the work of experts ``lo .. hi-1``, writing only their own rows and slices; runs under
            ``torch.no_grad()`` on a worker thread with one intra-op thread when split.
        bounds: row offsets ``[0, n_0, n_0+n_1, ..., N]`` of the expert-sorted rows.
        matrix_size: in-width x out-width of one expert weight (decides, with the rows, whether to split).
        scratch: makes the working memory of one call for at most ``rows`` rows per expert. It runs in the
            calling thread: memory that worker threads allocate and free comes from malloc's per-thread
            arenas, which hand blocks of this size back to the OS, and the next step pays the page faults
            again (measured: slower than not splitting at all).

    Returns:
        The results of ``fn`` in expert order.
    """
    num_experts = len(bounds) - 1
    num_threads = torch.get_num_threads()
    if getattr(_worker_local, "inside", False) or not splits_over_threads(bounds, matrix_size, num_threads):
        return [fn(0, num_experts, scratch(_most_rows(bounds, 0, num_experts)))]
    ranges = expert_ranges(bounds, num_threads)
    workers = _get_workers(num_threads)
    futures = [
        workers.submit(i, _marked, fn, lo, hi, scratch(_most_rows(bounds, lo, hi))) for i, (lo, hi) in enumerate(ranges)
    ]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:  # every task has finished (or failed) before the caller's thread count comes back
            f.exception()
        torch.set_num_threads(num_threads)


def _marked(fn: Callable[[int, int, S], T], lo: int, hi: int, scratch: S) -> T:
    """``fn(lo, hi, scratch)`` with this worker marked, so that nested calls run inline instead of waiting on
    themselves."""
    _worker_local.inside = True
    try:
        return fn(lo, hi, scratch)
    finally:
        _worker_local.inside = False
