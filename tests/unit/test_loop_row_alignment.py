"""The CPU loop path pads every expert's rows with zero rows to a count rounded to ``CPU_ROW_SIGNIFICANT_BITS``
binary digits, so that oneDNN sees few product shapes (its kernel cache holds 1,024); results and gradients stay
those of the unpadded experts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_moe.moe.experts import GroupedFFNExperts, GroupedGLUExperts, grouped_mm
from lightning_moe.moe.kernels import loop_experts
from lightning_moe.moe.kernels.loop_experts import pad_groups, rounded_rows
from tests.grouped_mm_reference import assert_matches_per_expert_products, grouped_mm_inputs

COUNTS = [130, 0, 65, 64, 7]  # padded to 132 and 66; empty, exact and small groups stay
PADDED = {132, 66, 64, 7}
WIDTH, HIDDEN = 24, 40  # no row count: every other dimension of a product shape is a row count


def test_rounded_rows_keeps_six_binary_digits() -> None:
    assert [rounded_rows(n) for n in (0, 1, 63, 64, 65, 127, 128, 129, 1000, 1024, 1025)] == [
        0, 1, 63, 64, 66, 128, 128, 132, 1008, 1024, 1056,
    ]  # fmt: skip
    for n in range(1, 5000):
        assert n <= rounded_rows(n) < n * (1 + 1 / 32)
    assert len({rounded_rows(n) for n in range(513, 1025)}) == 32  # an octave: 32 shapes
    assert rounded_rows(1000, 0) == 1000  # 0 disables


def test_pad_groups_layout() -> None:
    groups = pad_groups(torch.tensor(COUNTS), 6, torch.device("cpu"))
    assert groups.bounds == [0, 132, 132, 198, 262, 269]
    expected = [*range(0, 130), *range(132, 197), *range(198, 262), *range(262, 269)]
    assert groups.rows.tolist() == expected


def test_pad_groups_copies_nothing_when_no_group_needs_padding() -> None:
    groups = pad_groups(torch.tensor([64, 0, 132]), 6, torch.device("cpu"))
    assert groups.bounds == [0, 64, 64, 196] and groups.rows is None
    unrounded = pad_groups(torch.tensor(COUNTS), 0, torch.device("cpu"))  # 0 bits: the plain bounds
    assert unrounded.bounds == [0, 130, 130, 195, 259, 266] and unrounded.rows is None


class _ProductShapes(TorchDispatchMode):
    """Records the operand shapes of every matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet is torch.ops.aten.mm:
            self.shapes.append((*args[0].shape, *args[1].shape))
        elif packet in (torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.shapes.append((*args[1].shape, *args[2].shape))
        return func(*args, **(kwargs or {}))


def _run(experts: torch.nn.Module, x: Tensor, counts: list[int]) -> tuple[Tensor, list[Tensor]]:
    out = experts(x, torch.tensor(counts))
    grads = torch.autograd.grad(out, [x, *experts.parameters()], torch.randn_like(out))
    return out, list(grads)


@pytest.mark.parametrize("kind", ["ffn", "glu"])
def test_products_see_only_aligned_row_counts_and_results_do_not_change(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    make = GroupedFFNExperts if kind == "ffn" else GroupedGLUExperts
    experts = make(len(COUNTS), WIDTH, HIDDEN).double()
    x = torch.randn(sum(COUNTS), WIDTH, dtype=torch.float64, requires_grad=True)

    torch.manual_seed(1)
    with _ProductShapes() as recorder:
        out, grads = _run(experts, x, COUNTS)
    row_dims = {d for shape in recorder.shapes for d in shape if d not in (WIDTH, HIDDEN)}
    assert recorder.shapes and row_dims == PADDED, recorder.shapes

    monkeypatch.setattr(loop_experts, "CPU_ROW_SIGNIFICANT_BITS", 0)  # the unpadded products
    torch.manual_seed(1)
    with _ProductShapes() as recorder:
        plain_out, plain_grads = _run(experts, x, COUNTS)
    assert {d for shape in recorder.shapes for d in shape if d not in (WIDTH, HIDDEN)} == {130, 65, 64, 7}
    torch.testing.assert_close(out, plain_out)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want)


def test_grouped_mm_pads_too() -> None:
    x, w, bias = grouped_mm_inputs(COUNTS, WIDTH, HIDDEN)
    with _ProductShapes() as recorder:
        out = grouped_mm(x, w, torch.tensor(COUNTS), bias)
    assert {d for shape in recorder.shapes for d in shape if d not in (WIDTH, HIDDEN)} == PADDED
    assert_matches_per_expert_products(out, x, w, bias, COUNTS)


def test_padding_rows_are_zero_and_pad_unpad_gradients_pass_gradcheck() -> None:
    groups = pad_groups(torch.tensor([3, 0, 65, 1]), 6, torch.device("cpu"))  # 65 -> 66: one padding row
    assert groups.padding.tolist() == [68]
    x = torch.randn(69, 3, dtype=torch.float64, requires_grad=True)
    padded = loop_experts._pad(x, groups)
    assert padded.shape == (70, 3) and torch.all(padded[68] == 0)
    torch.testing.assert_close(loop_experts._unpad(padded, groups), x)
    assert torch.autograd.gradcheck(lambda t: loop_experts._pad(t, groups), (x,))
    y = torch.randn(70, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: loop_experts._unpad(t, groups), (y,))
    (grad_y,) = torch.autograd.grad(loop_experts._unpad(y, groups).sum(), y)
    assert torch.all(grad_y[68] == 0) and torch.all(grad_y[:68] == 1) and torch.all(grad_y[69] == 1)
