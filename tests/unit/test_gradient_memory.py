"""The experts' weight-gradient memory kept between steps: reused only when nobody refers to it, never
changing a gradient someone still holds, and off under ZeRO-2/3."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lightning_moe.moe import MoE
from lightning_moe.moe.experts import GroupedFFNExperts, GroupedGLUExperts
from lightning_moe.moe.kernels.gradient_memory import GradientMemory
from lightning_moe.parallel.parallelize import apply_gradient_memory

COUNTS = torch.tensor([3, 0, 5, 2])


def _backward(experts: nn.Module, x: torch.Tensor, scale: float = 1.0) -> None:
    (experts(x, COUNTS) * scale).sum().backward()


def _reference_grads(experts: nn.Module, x: torch.Tensor, scales: list[float]) -> dict[str, torch.Tensor]:
    """Gradients of the same steps on a copy that frees its gradient memory every time."""
    twin = copy.deepcopy(experts)
    twin.gradient_memory.enabled = False
    twin.zero_grad(set_to_none=True)
    for scale in scales:
        _backward(twin, x, scale)
    return {n: p.grad.clone() for n, p in twin.named_parameters()}


@pytest.mark.parametrize("experts_class", [GroupedFFNExperts, GroupedGLUExperts])
def test_memory_is_reused_after_grads_are_set_to_none(experts_class: type) -> None:
    torch.manual_seed(0)
    experts = experts_class(4, 6, 10)
    x = torch.randn(10, 6)
    _backward(experts, x)
    first = experts.w1.grad.data_ptr()
    experts.zero_grad(set_to_none=True)
    _backward(experts, x, 2.0)
    assert experts.w1.grad.data_ptr() == first  # the same memory, handed to the parameter again
    torch.testing.assert_close(experts.w1.grad, _reference_grads(experts, x, [2.0])["w1"])


def test_gradient_still_held_is_never_overwritten() -> None:
    torch.manual_seed(0)
    experts = GroupedFFNExperts(4, 6, 10)
    x = torch.randn(10, 6)
    _backward(experts, x)
    held = experts.w1.grad  # e.g. a user keeping last step's gradient
    snapshot = held.clone()
    experts.zero_grad(set_to_none=True)
    _backward(experts, x, 3.0)
    assert experts.w1.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, snapshot)
    torch.testing.assert_close(experts.w1.grad, 3.0 * snapshot)


def test_accumulation_without_zero_grad_sums_correctly_with_two_buffers() -> None:
    torch.manual_seed(0)
    experts = GroupedFFNExperts(4, 6, 10)
    x = torch.randn(10, 6)
    scales = [1.0, 0.5, -2.0]
    for scale in scales:  # micro-batches: .grad holds one buffer, each new gradient needs another
        _backward(experts, x, scale)
    reference = _reference_grads(experts, x, scales)
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, reference[name])
    assert len(experts.gradient_memory._storages["w1"]) == 2
    held = experts.gradient_memory.nbytes()
    _backward(experts, x)  # further micro-batches allocate nothing new
    assert experts.gradient_memory.nbytes() == held


def test_disabled_memory_allocates_fresh_gradients() -> None:
    experts = GroupedFFNExperts(4, 6, 10)
    experts.gradient_memory.enabled = False
    _backward(experts, torch.randn(10, 6))
    assert experts.gradient_memory.nbytes() == 0


def test_copies_and_saved_modules_start_without_kept_memory() -> None:
    experts = GroupedFFNExperts(4, 6, 10)
    _backward(experts, torch.randn(10, 6))
    assert experts.gradient_memory.nbytes() > 0
    assert copy.deepcopy(experts).gradient_memory.nbytes() == 0
    buffer = io.BytesIO()
    torch.save(experts, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.gradient_memory.nbytes() == 0 and loaded.gradient_memory.enabled
    assert set(experts.state_dict()) == {"w1", "w2", "b1", "b2"}  # nothing of it in checkpoints


def test_a_new_shape_replaces_kept_memory() -> None:
    memory = GradientMemory()
    memory.empty("w", torch.empty(4, 3))
    memory.empty("w", torch.empty(8, 3))
    assert memory.nbytes() == 8 * 3 * 4


@pytest.mark.parametrize("stage,kept", [(0, True), (1, True), (2, False), (3, False)])
def test_zero_stage_decides_whether_experts_keep_gradient_memory(stage: int, kept: bool) -> None:
    model = nn.Sequential(MoE(6, 4, 10), MoE(6, 4, 10, expert="glu"))
    for layer in model:
        layer(torch.randn(8, 6)).output.sum().backward()
    apply_gradient_memory(model, stage)
    for layer in model:
        assert layer.experts.gradient_memory.enabled is kept
        assert (layer.experts.gradient_memory.nbytes() > 0) is kept


@pytest.mark.parametrize("experts_class", [GroupedFFNExperts, GroupedGLUExperts])
def test_autocast_weight_casts_and_their_gradients_reuse_kept_memory(experts_class: type) -> None:
    """Under bf16 autocast the fp32 weights' casts and the fp32 gradients they send back come from kept memory:
    the second step's ``.grad`` sits where the first one's was, with the gradients a plain ``.to()`` gives."""
    torch.manual_seed(0)
    experts = experts_class(4, 6, 10)
    twin = copy.deepcopy(experts)
    twin.gradient_memory.enabled = False  # every block fresh: a plain .to() cast and fresh gradients
    x = torch.randn(10, 6)

    def autocast_backward(module: nn.Module, scale: float) -> None:
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, COUNTS)
        (out.float() * scale).sum().backward()

    autocast_backward(experts, 1.0)
    first = {n: p.grad.data_ptr() for n, p in experts.named_parameters() if n.startswith("w")}
    autocast_backward(experts, 2.0)
    autocast_backward(twin, 2.0)
    for name, p in experts.named_parameters():
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, dict(twin.named_parameters())[name].grad)
        if name.startswith("w"):
            assert p.grad.data_ptr() == first[name]
    kept = experts.gradient_memory._storages
    assert {"w1.cast", "w1.grad", "w2.cast", "w2.grad"} <= set(kept)
    assert kept["w1.cast"][0].nbytes() == experts.w1.numel() * 2  # the bf16 copy
    assert kept["w1.grad"][0].nbytes() == experts.w1.numel() * 4  # the fp32 gradient


def test_kept_cast_follows_its_weight_and_leaves_matching_dtypes_alone() -> None:
    from lightning_moe.moe.kernels.gradient_memory import cast_in_kept_memory

    memory = GradientMemory()
    w = torch.randn(3, 4, 5, requires_grad=True)
    assert cast_in_kept_memory(w, torch.float32, memory, "w") is w
    first = cast_in_kept_memory(w, torch.bfloat16, memory, "w")
    assert torch.equal(first, w.detach().to(torch.bfloat16))
    held = first  # still referenced (e.g. saved for a backward): the next cast must not write into it
    with torch.no_grad():
        w.mul_(2.0)
    second = cast_in_kept_memory(w, torch.bfloat16, memory, "w")
    assert second.data_ptr() != held.data_ptr()
    assert torch.equal(held, (w.detach() / 2.0).to(torch.bfloat16))
    assert torch.equal(second, w.detach().to(torch.bfloat16))
    grad = torch.randn(3, 4, 5, dtype=torch.bfloat16)
    second.backward(grad)
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, grad.float())
