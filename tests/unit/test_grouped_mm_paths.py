"""The preparation of the fused grouped GEMM (``torch._grouped_mm``) and the choice between it and the loop.

On CUDA sm90/sm100 with bf16 the experts call ``torch._grouped_mm`` on rows padded so that every expert
group starts at a 16-byte boundary. Most of that path is plain tensor code that runs on CPU too: the
padded layout (offsets, row map), the eligibility rules, and - because torch ships a reference loop
implementation of ``torch._grouped_mm`` for CPU - the whole fused path, forward and backward, forced
onto CPU in float32 and compared with the loop path. The dispatch plan that feeds the counts is checked
against the straightforward ``bincount`` / boolean-mask formulation it replaced (which synchronises
with the host on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from lightning_moe.moe import MoE, plan_dispatch
from lightning_moe.moe import experts as experts_mod
from lightning_moe.moe.experts import (
    NATIVE_GROUP_ALIGNMENT,
    build_experts,
    grouped_mm,
    native_group_layout,
    native_grouped_mm_dtype,
)
from tests.grouped_mm_calls import count_grouped_mm_calls


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Let the fused path run on CPU in float32 (torch's reference ``_grouped_mm``); count its calls."""
    monkeypatch.setattr(experts_mod, "_NATIVE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(experts_mod, "_NATIVE_DTYPES", (torch.bfloat16, torch.float32))
    yield count_grouped_mm_calls(monkeypatch)


# ------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("alignment", [1, 8, 16])
@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 4], [0, 0, 0, 9], [8, 16, 0], [0, 0, 0], [1]])
def test_layout_aligns_every_group_and_maps_every_row(counts: list[int], alignment: int) -> None:
    tokens = torch.tensor(counts)
    n, e = sum(counts), len(counts)
    layout = native_group_layout(tokens, n, alignment)
    offsets = layout.offsets.tolist()
    assert layout.offsets.dtype == torch.int32 and len(offsets) == e
    assert offsets[-1] == layout.num_rows  # every buffer row belongs to a group: the kernel writes it
    starts = [0] + offsets[:-1]
    assert all(b >= a for a, b in zip(starts, offsets))
    if alignment == 1:
        assert layout.rows is None and layout.num_rows == n
        assert offsets == torch.cumsum(tokens, 0).tolist()
    else:
        # Static size: known without reading the counts.
        assert layout.num_rows == -(-(n + e * alignment) // alignment) * alignment
        assert all(s % alignment == 0 for s in starts)
        assert all(b - a >= alignment for a, b in zip(starts, offsets))  # no empty group
        rows = layout.rows.tolist()
        assert len(rows) == n and len(set(rows)) == n
        first = 0
        for g, count in enumerate(counts):  # group g's rows are the first `count` rows of its padded group
            assert rows[first : first + count] == list(range(starts[g], starts[g] + count))
            assert offsets[g] - starts[g] >= count
            first += count
    sizes = [b - a for a, b in zip(starts, offsets)]
    assert layout.expert_of_row.tolist() == [g for g, size in enumerate(sizes) for _ in range(size)]


def test_pad_and_unpad_rows_round_trip_with_zero_padding() -> None:
    tokens = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 4)
    layout = native_group_layout(tokens, 9, 8)
    padded = experts_mod._pad_rows(x, layout)
    assert padded.shape == (layout.num_rows, 4)
    written = torch.zeros(layout.num_rows, dtype=torch.bool)
    written[layout.rows] = True
    assert torch.equal(padded[written], x)  # rows keep their order
    assert torch.count_nonzero(padded[~written]) == 0
    back = experts_mod._unpad_rows(padded, layout)
    assert torch.equal(back, x) and back.data_ptr() != padded.data_ptr()


# -------------------------------------------------------------------------------------- eligibility


def test_cpu_and_fp32_use_the_loop_by_default() -> None:
    x = torch.randn(4, 16)
    w = torch.randn(2, 16, 32)
    assert native_grouped_mm_dtype(x, [w]) is None  # CPU is not a fused device
    assert native_grouped_mm_dtype(x.bfloat16(), [w.bfloat16()]) is None


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dtype", "expected"),
    [
        ((5, 16), (3, 16, 32), torch.float32, torch.float32),
        ((5, 16), (3, 16, 32), torch.bfloat16, torch.bfloat16),
        ((5, 12), (3, 12, 32), torch.bfloat16, None),  # 12 bf16 = 24 bytes: rows not 16-byte aligned
        ((5, 12), (3, 12, 32), torch.float32, torch.float32),  # 12 fp32 = 48 bytes: aligned
        ((5, 18), (3, 18, 32), torch.float32, None),  # odd hidden size
        ((5, 16), (3, 16, 30), torch.float32, None),  # odd output width
        ((0, 16), (3, 16, 32), torch.float32, None),  # no rows: nothing to gain
        ((5, 16), (3, 16, 32), torch.float64, None),  # not a fused dtype
    ],
)
def test_eligibility_rules(fused_on_cpu, x_shape, w_shape, dtype, expected: torch.dtype | None) -> None:
    x = torch.randn(x_shape, dtype=dtype)
    w = torch.randn(w_shape, dtype=dtype)
    assert native_grouped_mm_dtype(x, [w]) == expected


def test_eligibility_needs_row_major_weights_and_one_dtype(fused_on_cpu) -> None:
    x = torch.randn(5, 16)
    w = torch.randn(3, 32, 16).transpose(1, 2)  # [3, 16, 32], column-major
    assert native_grouped_mm_dtype(x, [w]) is None
    assert native_grouped_mm_dtype(x, [w.contiguous()]) == torch.float32
    assert native_grouped_mm_dtype(x, [w.contiguous().bfloat16()]) is None  # mixed dtypes, no autocast


def test_autocast_selects_the_lower_precision(fused_on_cpu) -> None:
    """Activations leave a LayerNorm in fp32 under autocast: the fused path then runs in the autocast dtype."""
    x = torch.randn(5, 16)
    w = torch.randn(3, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native_grouped_mm_dtype(x, [w]) == torch.bfloat16
        assert native_grouped_mm_dtype(torch.randn(5, 12), [torch.randn(3, 12, 32)]) is None


# ------------------------------------------------------------------------------ fused path == loop


def _run(module: torch.nn.Module, x: Tensor, counts: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x, counts)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("alignment", [1, NATIVE_GROUP_ALIGNMENT])
@pytest.mark.parametrize("kind", ["ffn", "glu"])
def test_fused_path_equals_loop_path(fused_on_cpu, monkeypatch, kind: str, alignment: int) -> None:
    monkeypatch.setattr(experts_mod, "NATIVE_GROUP_ALIGNMENT", alignment)
    buffers: list[int] = []
    pad_rows = experts_mod._pad_rows
    monkeypatch.setattr(
        experts_mod, "_pad_rows", lambda x, layout: buffers.append(layout.num_rows) or pad_rows(x, layout)
    )
    module = build_experts(kind, 5, 16, 32, None)
    counts = torch.tensor([3, 0, 11, 1, 6])  # an empty group, groups shorter and longer than the alignment
    x = torch.randn(int(counts.sum()), 16)
    grad = torch.randn(x.shape[0], 16)
    fused = _run(module, x, counts, grad)
    calls = 4 if kind == "ffn" else 3  # one per expert matrix, and one per bias gradient (ffn) in backward
    assert len(fused_on_cpu) == calls
    assert buffers == [21 if alignment == 1 else 64]  # padded once per forward: 21 rows + 5 * 8, rounded to 8
    monkeypatch.setattr(experts_mod, "_NATIVE_DEVICE_TYPES", ("cuda",))
    loop = _run(module, x, counts, grad)
    assert len(fused_on_cpu) == calls  # the loop path never calls it
    torch.testing.assert_close(fused[0], loop[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], loop[1], rtol=1e-5, atol=1e-5)
    for name in loop[2]:
        torch.testing.assert_close(fused[2][name], loop[2][name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.count_nonzero(fused[2]["w1"][1]) == 0  # the empty group's weights get no gradient


def test_grouped_mm_function_fused_equals_loop(fused_on_cpu, monkeypatch) -> None:
    counts = torch.tensor([0, 4, 9])
    x = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    b = torch.randn(3, 16, requires_grad=True)
    grad = torch.randn(13, 16)
    fused = grouped_mm(x, w, counts, b)
    fused.backward(grad)
    fused_grads = [t.grad.clone() for t in (x, w, b)]
    assert len(fused_on_cpu) == 2  # the product, and the bias gradient
    for t in (x, w, b):
        t.grad = None
    monkeypatch.setattr(experts_mod, "_NATIVE_DEVICE_TYPES", ("cuda",))
    loop = grouped_mm(x, w, counts, b)
    loop.backward(grad)
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)
    for got, t in zip(fused_grads, (x, w, b)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [18, 30])
def test_odd_hidden_sizes_fall_back_to_the_loop(fused_on_cpu, hidden: int) -> None:
    layer = MoE(hidden, 4, 2 * hidden, k=2)
    x = torch.randn(2, 7, hidden, requires_grad=True)
    out = layer(x)
    (out.output.sum() + out.aux_loss).backward()
    assert fused_on_cpu == []
    assert torch.isfinite(x.grad).all()


def test_moe_layer_fused_path_equals_loop_path(fused_on_cpu, monkeypatch) -> None:
    layer = MoE(16, 6, 32, k=2, capacity_factor=1.0, use_rts=False)
    x = torch.randn(3, 11, 16)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 5:] = True

    def step() -> tuple[Tensor, dict[str, Tensor]]:
        layer.zero_grad(set_to_none=True)
        out = layer(x, padding_mask=padding)
        (out.output.square().sum() + out.aux_loss).backward()
        return out.output.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    fused = step()
    assert len(fused_on_cpu) == 4  # two products, two bias gradients
    monkeypatch.setattr(experts_mod, "_NATIVE_DEVICE_TYPES", ("cuda",))
    loop = step()
    torch.testing.assert_close(fused[0], loop[0], rtol=1e-5, atol=1e-5)
    for name in loop[1]:
        torch.testing.assert_close(fused[1][name], loop[1][name], rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------- dispatch plan, sync-free form


def _reference_plan(expert_index, expert_weight, num_experts, capacity, valid, priority):
    """The plain formulation: bincount for the counts, a boolean mask for the kept assignments."""
    num_tokens, k = expert_index.shape
    flat_expert = expert_index.t().reshape(-1)
    flat_weight = expert_weight.t().reshape(-1)
    if valid is not None:
        flat_expert = torch.where(valid.repeat(k), flat_expert, torch.full_like(flat_expert, num_experts))
    by_priority = flat_expert if priority is None else flat_expert[priority]
    sorted_expert, order = torch.sort(by_priority, stable=True)
    assignment = order if priority is None else priority[order]
    routed = torch.bincount(sorted_expert, minlength=num_experts + 1)[:num_experts]
    num_assignments = int(routed.sum())
    if capacity is None:
        kept, kept_per_expert = assignment[:num_assignments], routed
    else:
        kept_per_expert = routed.clamp(max=capacity)
        group_start = torch.cumsum(routed, 0) - routed
        real = sorted_expert[:num_assignments]
        position = torch.arange(num_assignments) - group_start[real]
        kept = assignment[:num_assignments][position < capacity]
    return kept % num_tokens, flat_weight[kept], kept_per_expert, routed, num_assignments


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity", [None, 1, 3, 100])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("random_priority", [False, True])
def test_plan_matches_bincount_formulation(k: int, capacity: int | None, padding: bool, random_priority: bool) -> None:
    num_tokens, num_experts = 29, 5
    logits = torch.randn(num_tokens, num_experts)
    weight, index = torch.softmax(logits, -1).topk(k, -1)
    valid = (torch.rand(num_tokens) > 0.3) if padding else None
    torch.manual_seed(7)
    plan = plan_dispatch(index, weight, num_experts, capacity, valid=valid, random_priority=random_priority)
    priority = None
    if random_priority:  # the same random order as inside plan_dispatch
        torch.manual_seed(7)
        order = torch.randperm(num_tokens)
        priority = (torch.arange(k).unsqueeze(1) * num_tokens + order.unsqueeze(0)).reshape(-1)
    token_index, combine_weight, kept_per_expert, routed, num_assignments = _reference_plan(
        index, weight, num_experts, capacity, valid, priority
    )
    assert torch.equal(plan.token_index, token_index)
    assert torch.equal(plan.combine_weight, combine_weight)
    assert torch.equal(plan.tokens_per_expert, kept_per_expert)
    assert torch.equal(plan.routed_per_expert, routed)
    assert plan.num_assignments == num_assignments
    assert plan.tokens_per_expert.sum() == plan.token_index.numel()
