"""The CPU loop path's backward by columns (``product_layout.py``): where the rule sends an expert, and that its
results and gradients are those of a per-expert reference built from plain autograd ops."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe.moe.experts import ACTIVATIONS, GroupedFFNExperts, GroupedGLUExperts, grouped_mm
from lightning_moe.moe.kernels import loop_experts, product_layout
from lightning_moe.moe.kernels.product_layout import backward_by_columns, columns_of, whole_experts_per_thread
from tests.grouped_mm_reference import assert_matches_per_expert_products, grouped_mm_inputs

COUNTS = [5, 0, 9, 3]  # an empty expert in the middle; sizes under 64 are not padded
WIDTH, HIDDEN = 6, 10


def _bf16(*shape: int) -> Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16)


def test_rule_takes_few_rows_of_large_bf16_weights_only() -> None:
    weight = _bf16(512, 2048)  # 2 MiB: the layer benchmark's expert
    assert backward_by_columns(64, 512, 2048, weight)
    assert backward_by_columns(409, 512, 2048, weight)  # 409 * 2560 <= 512 * 2048
    assert not backward_by_columns(410, 512, 2048, weight)
    assert not backward_by_columns(0, 512, 2048, weight)
    assert not backward_by_columns(64, 256, 1024, _bf16(256, 1024))  # fits in L2: repacking is cheap
    assert not backward_by_columns(64, 512, 2048, torch.empty(512, 2048))  # fp32 runs in MKL: no repacking
    assert backward_by_columns(64, 2048, 512, _bf16(2048, 512))  # fc2's weight, the other way round


def test_whole_experts_per_thread_for_bf16_weights_of_one_mib_or_more() -> None:
    assert whole_experts_per_thread(512, 1024, _bf16(512, 1024))
    assert not whole_experts_per_thread(256, 1024, _bf16(256, 1024))  # the translator's experts
    assert not whole_experts_per_thread(512, 1024, torch.empty(512, 1024))


@pytest.mark.parametrize(("kind", "width", "expected"), [("ffn", 512, True), ("glu", 512, True), ("ffn", 256, False)])
def test_loop_experts_ask_for_whole_experts_per_thread_by_weight_size(
    kind: str, width: int, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []

    def run_inline(fn, bounds, matrix_size, scratch=lambda rows: None, any_rows=False) -> None:  # noqa: ANN001
        seen.append(any_rows)
        fn(0, len(bounds) - 1, scratch(max(b - a for a, b in zip(bounds, bounds[1:]))))

    monkeypatch.setattr(loop_experts, "run_over_experts", run_inline)
    make = GroupedGLUExperts if kind == "glu" else GroupedFFNExperts
    experts = make(2, width, 1024).to(torch.bfloat16)
    x = torch.randn(600, width, dtype=torch.bfloat16, requires_grad=True)
    experts(x, torch.tensor([300, 300])).sum().backward()
    assert seen == [expected, expected]  # forward and backward


def test_columns_of_is_a_contiguous_transposed_view_of_the_first_rows() -> None:
    buffer = torch.zeros(8, 3)
    view = columns_of(buffer, 5)
    assert view.shape == (3, 5) and view.is_contiguous()
    view.fill_(1.0)
    assert buffer.view(-1)[:15].eq(1).all() and buffer.view(-1)[15:].eq(0).all()


def _choose(monkeypatch: pytest.MonkeyPatch, by_columns: set[int]) -> list[tuple[int, int, int]]:
    """Send experts with these row counts by columns, the others by rows; returns the rule's calls."""
    calls: list[tuple[int, int, int]] = []

    def rule(rows: int, in_width: int, out_width: int, weight: Tensor) -> bool:
        calls.append((rows, in_width, out_width))
        return rows in by_columns

    monkeypatch.setattr(product_layout, "backward_by_columns", rule)
    return calls


def _ffn_reference(experts: torch.nn.Module, x: Tensor, glu: bool) -> Tensor:
    act = ACTIVATIONS[experts.activation]
    outputs, start = [], 0
    for e, n in enumerate(COUNTS):
        rows = x[start : start + n]
        if glu:
            hidden = act(rows @ experts.w1[e]) * (rows @ experts.w3[e])
        else:
            hidden = act(rows @ experts.w1[e] + (0 if experts.b1 is None else experts.b1[e]))
        outputs.append(hidden @ experts.w2[e] + (0 if glu or experts.b2 is None else experts.b2[e]))
        start += n
    return torch.cat(outputs)


@pytest.mark.parametrize("kind", ["ffn", "ffn_bias", "glu"])
@pytest.mark.parametrize("by_columns", [{5, 9, 3}, {9}])  # all experts, or one beside experts by rows
def test_experts_by_columns_equal_per_expert_reference(
    kind: str, by_columns: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    if kind == "glu":
        experts = GroupedGLUExperts(len(COUNTS), WIDTH, HIDDEN).double()
    else:
        experts = GroupedFFNExperts(len(COUNTS), WIDTH, HIDDEN, activation="gelu", bias=kind == "ffn_bias").double()
    x = torch.randn(sum(COUNTS), WIDTH, dtype=torch.float64, requires_grad=True)
    calls = _choose(monkeypatch, by_columns)
    out = experts(x, torch.tensor(COUNTS))
    reference = _ffn_reference(experts, x, glu=kind == "glu")
    torch.testing.assert_close(out, reference)
    inputs = [x, *experts.parameters()]
    grad = torch.randn_like(out)
    got, want = torch.autograd.grad(out, inputs, grad), torch.autograd.grad(reference, inputs, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert [rows for rows, *_ in calls] == COUNTS and {tuple(c[1:]) for c in calls} == {(WIDTH, HIDDEN)}


@pytest.mark.parametrize("by_columns", [{5, 9, 3}, {5}])
def test_grouped_mm_by_columns_equals_per_expert_products(
    by_columns: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, w, bias = grouped_mm_inputs(COUNTS, WIDTH, HIDDEN)
    calls = _choose(monkeypatch, by_columns)
    out = grouped_mm(x, w, torch.tensor(COUNTS), bias)
    assert_matches_per_expert_products(out, x, w, bias, COUNTS)
    assert [rows for rows, *_ in calls] == COUNTS


def test_bf16_experts_at_benchmark_shapes_go_by_columns_within_bf16_tolerance() -> None:
    torch.manual_seed(0)
    counts = [64, 48]
    experts = GroupedFFNExperts(len(counts), 512, 2048, activation="gelu", bias=False)
    assert backward_by_columns(64, 512, 2048, experts.w1.bfloat16())
    x = torch.randn(sum(counts), 512, dtype=torch.float64)
    grad = torch.randn(sum(counts), 512, dtype=torch.float64)
    results = {}
    for dtype in (torch.float64, torch.bfloat16):
        model = GroupedFFNExperts(len(counts), 512, 2048, activation="gelu", bias=False).to(dtype)
        model.load_state_dict(experts.state_dict())
        inp = x.to(dtype).requires_grad_()
        out = model(inp, torch.tensor(counts))
        grads = torch.autograd.grad(out, [inp, model.w1, model.w2], grad.to(dtype))
        results[dtype] = [t.double() for t in (out, *grads)]
    for got, want in zip(results[torch.bfloat16], results[torch.float64]):
        assert (got - want).norm() / want.norm() < 2e-2
