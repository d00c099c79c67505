"""The CPU expert FFN (one autograd node for fc1 -> activation -> fc2, hand-written backward) against a
per-expert reference built from plain autograd ops; the layer's host reads and output dtype."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe.moe import MoE
from lightning_moe.moe import experts as experts_mod
from lightning_moe.moe.experts import ACTIVATIONS, GroupedFFNExperts
from lightning_moe.moe.kernels import loop_experts as loop_experts_mod
from tests.autograd_graph import graph_node_names

COUNTS = [0, 3, 0, 5, 1, 0]  # empty groups first, in the middle and last


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def per_expert_reference(experts: GroupedFFNExperts, x: Tensor, counts: list[int]) -> Tensor:
    """Each expert's rows through ``F.linear``-style ops, one expert at a time, concatenated."""
    act = ACTIVATIONS[experts.activation]
    outputs, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start : start + n]
        h = rows @ experts.w1[e] + (0 if experts.b1 is None else experts.b1[e])
        y = act(h) @ experts.w2[e] + (0 if experts.b2 is None else experts.b2[e])
        outputs.append(y)
        start += n
    return torch.cat(outputs)


def _grads(experts: GroupedFFNExperts, x: Tensor, out: Tensor, grad: Tensor) -> list[Tensor]:
    params = [p for p in experts.parameters() if p.requires_grad]
    inputs = [x, *params] if x.requires_grad else params
    return list(torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_fused_loop_ffn_equals_per_expert_reference(activation: str, bias: bool) -> None:
    experts = GroupedFFNExperts(len(COUNTS), 6, 10, activation=activation, bias=bias).double()
    x = torch.randn(sum(COUNTS), 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(sum(COUNTS), 6, dtype=torch.float64)
    counts = torch.tensor(COUNTS)
    out = experts(x, counts)
    ref = per_expert_reference(experts, x, COUNTS)
    torch.testing.assert_close(out, ref)
    got, want = _grads(experts, x, out, grad), _grads(experts, x, ref, grad)
    assert len(got) == (5 if bias else 3)  # x, w1, w2 (, b1, b2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    w1_grad = got[1]
    assert torch.all(w1_grad[0] == 0) and torch.all(w1_grad[5] == 0)  # experts without rows


def test_fused_loop_ffn_is_one_autograd_node_and_handles_expanded_grad() -> None:
    experts = GroupedFFNExperts(len(COUNTS), 4, 8)
    x = torch.randn(sum(COUNTS), 4, requires_grad=True)
    out = experts(x, torch.tensor(COUNTS))
    # the experts are one node; around it at most the copies into and out of a padded buffer (loop_experts.py)
    padding_copies = ("_MoveRowsBackward",)
    assert [name for name in graph_node_names(out) if name not in padding_copies] == ["LoopExpertFFNBackward"]
    out.sum().backward()  # sum() sends an expanded (stride-0) gradient
    ref = per_expert_reference(experts, x, COUNTS)
    ref_grads = torch.autograd.grad(ref.sum(), [x, experts.w1, experts.b2])
    for got, want in zip([x.grad, experts.w1.grad, experts.b2.grad], ref_grads):
        torch.testing.assert_close(got, want)


def test_fused_loop_ffn_gradcheck_float64() -> None:
    experts = GroupedFFNExperts(3, 3, 4, activation="gelu_tanh").double()
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]

    def fn(x: Tensor, w1: Tensor, w2: Tensor, b1: Tensor, b2: Tensor) -> Tensor:
        return loop_experts_mod.loop_expert_ffn(x, w1, b1, w2, b2, counts, "gelu_tanh")

    names = [n for n, _ in experts.named_parameters()]
    assert names == ["w1", "w2", "b1", "b2"]
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_frozen_weights_and_input_without_grad() -> None:
    experts = GroupedFFNExperts(len(COUNTS), 4, 8).double()
    experts.w1.requires_grad_(False)
    experts.b2.requires_grad_(False)
    x = torch.randn(sum(COUNTS), 4, dtype=torch.float64)  # no grad: the first layer's input, say
    grad = torch.randn_like(x)
    out = experts(x, torch.tensor(COUNTS))
    ref = per_expert_reference(experts, x, COUNTS)
    for a, b in zip(_grads(experts, x, out, grad), _grads(experts, x, ref, grad)):  # w2, b1
        torch.testing.assert_close(a, b)


def test_empty_input() -> None:
    experts = GroupedFFNExperts(3, 4, 8)
    x = torch.randn(0, 4, requires_grad=True)
    out = experts(x, torch.zeros(3, dtype=torch.long))
    assert out.shape == (0, 4)
    out.sum().backward()
    assert torch.all(experts.w1.grad == 0) and x.grad.shape == (0, 4)


# --------------------------------------------------------------------------------- the layer itself


def test_padding_mask_costs_the_layer_one_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a padding mask and capacity, the router/dispatch side of the layer reads the device once (the
    kept and real assignment counts together); the CPU experts' own read of the group sizes is not counted."""
    layer = MoE(8, 4, 16, k=2, capacity_factor=1.0, min_capacity=0, use_rts=False)
    x = torch.randn(2, 6, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    reads: list[str] = []
    counting = [True]

    def wrap(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if counting[0]:
                reads.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        wrap(name)
    experts_forward = layer.experts.forward

    def experts_uncounted(*args):
        counting[0] = False
        try:
            return experts_forward(*args)
        finally:
            counting[0] = True

    monkeypatch.setattr(layer.experts, "forward", experts_uncounted)
    out, _, _ = layer(x, mask)
    assert reads == ["tolist"], reads
    monkeypatch.undo()
    # The capacity computed on the device is that of the 10 real tokens: the same output as without padding.
    real = torch.cat([x[0], x[1, :4]]).unsqueeze(0)  # [1, 10, 8]
    ref, _, _ = layer(real)
    torch.testing.assert_close(torch.cat([out[0], out[1, :4]]), ref[0])


def test_capacity_tensor_matches_host_formula() -> None:
    for factor in (1.0, 1.25, 0.3, 2.0 / 3.0):
        layer = MoE(8, 6, 16, k=2, capacity_factor=factor, min_capacity=3)
        for n in (0, 1, 7, 100, 4097):
            assert int(layer.capacity(torch.tensor(n))) == layer.capacity(n), (factor, n)


def test_layer_output_keeps_input_dtype_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path (forced onto CPU) computes in bf16 under autocast; the layer returns x's dtype."""
    monkeypatch.setattr(experts_mod, "_NATIVE_DEVICE_TYPES", ("cuda", "cpu"))
    layer = MoE(16, 4, 32, k=2)
    x = torch.randn(10, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inner = layer.experts(x, torch.tensor([3, 3, 2, 2]))
        out, aux, _ = layer(x)
    assert inner.dtype == torch.bfloat16  # the experts alone return the autocast dtype
    assert out.dtype == torch.float32 and aux.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and layer.experts.w1.grad.dtype == torch.float32
    # Without the fused path the CPU loop follows autocast as nn.Linear does: bf16 products, x's dtype out.
    monkeypatch.undo()
    layer.eval()  # no random token selection: the two calls route alike
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.experts(x, torch.tensor([3, 3, 2, 2])).dtype == torch.bfloat16
        out_loop = layer(x).output
    assert out_loop.dtype == torch.float32
    torch.testing.assert_close(out_loop, layer(x).output, rtol=2e-2, atol=2e-2)  # bf16: 8 mantissa bits
