"""Experts spread over threads (whole experts per thread): the split, the worker pool, and parity of the
loop experts with threads forced on against a per-expert reference."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from lightning_moe.moe.activations import ACTIVATIONS
from lightning_moe.moe.experts import GroupedFFNExperts, GroupedGLUExperts, grouped_mm
from lightning_moe.moe.kernels import expert_threads
from lightning_moe.moe.kernels.expert_threads import expert_order, run_over_experts, splits_over_threads
from tests.autograd_graph import graph_node_names

COUNTS = [0, 7, 3, 0, 9, 1, 4, 0, 6, 2]  # empty groups first, in the middle and last


def _bounds(counts: list[int]) -> list[int]:
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return bounds


@pytest.fixture
def threads_forced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Spread any experts over 2 threads, however small the work."""
    monkeypatch.setattr(expert_threads, "MIN_SPLIT_WORK", 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------- the schedule


def test_workers_take_the_largest_experts_first() -> None:
    assert expert_order(_bounds(COUNTS)) == [4, 1, 8, 6, 2, 9, 5, 0, 3, 7]


def test_split_only_for_small_groups_with_enough_work() -> None:
    d_h = 512 * 2048
    assert splits_over_threads(_bounds([64] * 64), d_h, 2)  # 64 rows per expert
    assert splits_over_threads(_bounds([256] * 32), d_h, 2)
    assert not splits_over_threads(_bounds([512] * 8), d_h, 2)  # large groups: intra-op threads do well
    assert not splits_over_threads(_bounds([64] * 64), d_h, 1)  # one thread
    assert not splits_over_threads(_bounds([4096] + [0] * 63), d_h, 2)  # one busy expert
    assert not splits_over_threads(_bounds([2] * 8), 6 * 10, 2)  # too little work to hand over


def test_any_rows_splits_large_groups_but_keeps_the_other_conditions() -> None:
    d_h = 512 * 2048
    assert splits_over_threads(_bounds([512] * 8), d_h, 2, any_rows=True)
    assert not splits_over_threads(_bounds([512] * 8), d_h, 1, any_rows=True)  # one thread
    assert not splits_over_threads(_bounds([4096] + [0] * 7), d_h, 2, any_rows=True)  # one busy expert
    assert not splits_over_threads(_bounds([2] * 8), 6 * 10, 2, any_rows=True)  # too little work


# ------------------------------------------------------------------------------------------ the pool


def test_every_expert_runs_once_on_worker_threads_and_threads_are_restored(threads_forced: None) -> None:
    seen: list[tuple[int, int, str, int, bool]] = []
    lock = threading.Lock()

    def fn(lo: int, hi: int, scratch: Tensor) -> None:
        assert scratch.shape == (max(COUNTS), 3)
        with lock:
            seen.append((lo, hi, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))

    run_over_experts(fn, _bounds(COUNTS), 1, scratch=lambda rows: torch.empty(rows, 3))
    assert sorted((lo, hi) for lo, hi, *_ in seen) == [(e, e + 1) for e in range(len(COUNTS))]
    for _, _, name, threads, grad_enabled in seen:
        assert name.startswith("lightning_moe-experts") and threads == 1 and not grad_enabled
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_without_a_split_fn_runs_once_over_all_experts_in_the_caller() -> None:
    calls: list[tuple[int, int, str]] = []
    run_over_experts(lambda lo, hi, s: calls.append((lo, hi, threading.current_thread().name)), _bounds(COUNTS), 1)
    assert calls == [(0, len(COUNTS), threading.current_thread().name)]


def _count_experts(counted: list[int], threads: set[str] | None = None) -> None:
    lock = threading.Lock()

    def fn(lo: int, hi: int, scratch: None) -> None:
        with lock:
            counted.extend(range(lo, hi))
            if threads is not None:
                threads.add(threading.current_thread().name)

    run_over_experts(fn, _bounds(COUNTS), 1)


def test_worker_exception_reaches_the_caller_and_stops_the_others(threads_forced: None) -> None:
    taken: list[int] = []

    def fn(lo: int, hi: int, scratch: None) -> None:
        taken.append(lo)
        if lo == 4:  # the largest expert: taken first
            raise RuntimeError(f"expert {lo} failed")

    with pytest.raises(RuntimeError, match="expert 4 failed"):
        run_over_experts(fn, _bounds(COUNTS), 1)
    assert len(taken) < len(COUNTS)  # the other worker stopped taking experts
    assert torch.get_num_threads() == 2
    counted: list[int] = []
    _count_experts(counted)  # the workers still serve
    assert sorted(counted) == list(range(len(COUNTS)))


def test_nested_call_runs_inline(threads_forced: None) -> None:
    names: list[str] = []

    def inner(lo: int, hi: int, scratch: None) -> None:
        names.append(f"{lo}-{hi}")

    def outer(lo: int, hi: int, scratch: None) -> None:
        run_over_experts(inner, _bounds(COUNTS), 1)  # would wait on its own worker if not inline

    run_over_experts(outer, _bounds(COUNTS), 1)
    assert names == [f"0-{len(COUNTS)}"] * len(COUNTS)


def _child_count(queue: multiprocessing.Queue) -> None:
    counted: list[int] = []
    threads: set[str] = set()
    _count_experts(counted, threads)
    queue.put((sorted(counted), all(name.startswith("lightning_moe-experts") for name in threads)))


def test_forked_child_gets_its_own_workers(threads_forced: None) -> None:
    _count_experts([])  # the parent's workers exist
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_count, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    counted, on_workers = queue.get(timeout=5)
    assert counted == list(range(len(COUNTS))) and on_workers


# ---------------------------------------------------------------------------------- parity, threads on


def _reference_ffn(experts: GroupedFFNExperts, x: Tensor, counts: list[int]) -> Tensor:
    act, outputs, start = ACTIVATIONS[experts.activation], [], 0
    for e, n in enumerate(counts):
        rows = x[start : start + n]
        hidden = act(rows @ experts.w1[e] + (0 if experts.b1 is None else experts.b1[e]))
        outputs.append(hidden @ experts.w2[e] + (0 if experts.b2 is None else experts.b2[e]))
        start += n
    return torch.cat(outputs)


def _reference_glu(experts: GroupedGLUExperts, x: Tensor, counts: list[int]) -> Tensor:
    act, outputs, start = ACTIVATIONS[experts.activation], [], 0
    for e, n in enumerate(counts):
        rows = x[start : start + n]
        outputs.append((act(rows @ experts.w1[e]) * (rows @ experts.w3[e])) @ experts.w2[e])
        start += n
    return torch.cat(outputs)


def _assert_same_outputs_and_grads(module: torch.nn.Module, out: Tensor, ref: Tensor, x: Tensor) -> None:
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    inputs = [x, *module.parameters()]
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kind, activation",
    [("ffn", a) for a in sorted(ACTIVATIONS)] + [("glu", a) for a in ("silu", "gelu", "relu")],
)
def test_experts_on_threads_equal_per_expert_reference(threads_forced: None, kind: str, activation: str) -> None:
    cls, backward, reference = {
        "ffn": (GroupedFFNExperts, "LoopExpertFFNBackward", _reference_ffn),
        "glu": (GroupedGLUExperts, "LoopExpertGLUBackward", _reference_glu),
    }[kind]
    torch.manual_seed(0)
    experts = cls(len(COUNTS), 6, 10, activation=activation).double()
    x = torch.randn(sum(COUNTS), 6, dtype=torch.float64, requires_grad=True)
    out = experts(x, torch.tensor(COUNTS))
    assert backward in graph_node_names(out)
    _assert_same_outputs_and_grads(experts, out, reference(experts, x, COUNTS), x)


def test_grouped_mm_on_threads_equals_per_expert_reference(threads_forced: None) -> None:
    torch.manual_seed(0)
    w = torch.randn(len(COUNTS), 6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(len(COUNTS), 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(sum(COUNTS), 6, dtype=torch.float64, requires_grad=True)
    out = grouped_mm(x, w, torch.tensor(COUNTS), b)
    starts = _bounds(COUNTS)
    ref = torch.cat([x[starts[e] : starts[e + 1]] @ w[e] + b[e] for e in range(len(COUNTS))])
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, [x, w, b], grad), torch.autograd.grad(ref, [x, w, b], grad)):
        torch.testing.assert_close(got, want)


def test_glu_gradcheck_float64() -> None:
    from lightning_moe.moe.kernels.loop_experts import loop_expert_glu

    torch.manual_seed(0)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: loop_expert_glu(*a, counts, "silu"), (x, w1, w3, w2))


def test_weight_gradients_from_threads_go_to_the_parameter_without_a_copy(threads_forced: None) -> None:
    """A worker that kept its task alive would hold an extra reference to the gradient; autograd then copies
    it into a new tensor instead of handing it to ``.grad`` (the copy and the fresh memory cost time)."""
    experts = GroupedFFNExperts(len(COUNTS), 6, 10)
    x = torch.randn(sum(COUNTS), 6)
    for _ in range(30):  # the worker must let go before it reports the task done, not just soon after
        experts.zero_grad(set_to_none=True)
        experts(x, torch.tensor(COUNTS)).sum().backward()
        kept = {s.data_ptr() for storages in experts.gradient_memory._storages.values() for s in storages}
        assert experts.w1.grad.data_ptr() in kept and experts.w2.grad.data_ptr() in kept
        assert len(kept) == 2
