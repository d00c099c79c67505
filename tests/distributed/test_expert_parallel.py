"""Expert-parallel all-to-all: the same outputs and gradients as running every expert locally."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lightning_moe.moe import MoE, TokenDispatcher
from lightning_moe.parallel.expert_parallel import (
    AllToAllTokenDispatcher,
    apply_expert_parallel,
    combine_tokens,
    dispatch_tokens,
    is_expert_parallel,
    local_expert_range,
    source_major_to_expert_major,
)
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed


def _reference_perm(counts: list[list[int]]) -> list[int]:
    """Loop reference: rows of (source i, expert j) blocks, re-listed expert-major."""
    starts, pos = {}, 0
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            starts[i, j] = pos
            pos += c
    perm = []
    for j in range(len(counts[0])):
        for i in range(len(counts)):
            perm.extend(range(starts[i, j], starts[i, j] + counts[i][j]))
    return perm


@pytest.mark.parametrize("counts", [[[2, 0, 1], [0, 3, 2]], [[1], [0], [4]], [[0, 0], [0, 0]], [[3, 1, 0, 2]]])
def test_source_major_to_expert_major_matches_loop(counts: list[list[int]]) -> None:
    c = torch.tensor(counts)
    perm = source_major_to_expert_major(c, int(c.sum()))
    assert perm.tolist() == _reference_perm(counts)


def _uneven_all_to_all(rank: int, world_size: int) -> None:
    # rank r sends (r + j) % 3 rows to rank j: some splits are zero, sizes differ per pair.
    send = [(rank + j) % 3 for j in range(world_size)]
    recv = [(i + rank) % 3 for i in range(world_size)]
    rows = []
    for j, n in enumerate(send):
        rows += [[100.0 * rank + 10.0 * j + k, float(rank)] for k in range(n)]
    x = torch.tensor(rows, dtype=torch.float32).reshape(-1, 2).requires_grad_(True)
    y = dispatch_tokens(x, send, recv, dist.group.WORLD)
    expected = []
    for i, n in enumerate(recv):
        expected += [[100.0 * i + 10.0 * rank + k, float(i)] for k in range(n)]
    torch.testing.assert_close(y, torch.tensor(expected, dtype=torch.float32).reshape(-1, 2))
    # Round trip: the rows come back in their original order, scaled by the rank that held them, and
    # the gradient of each row comes back to it.
    back = combine_tokens(y * (rank + 1), send, recv, dist.group.WORLD)
    holder_scale = torch.cat([torch.full((n, 1), dst + 1.0) for dst, n in enumerate(send)])  # [N, 1]
    torch.testing.assert_close(back.detach(), x.detach() * holder_scale)
    weight = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape)
    (back * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight * holder_scale)


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_to_all_uneven_splits_forward_backward(world_size: int) -> None:
    run_ranks(_uneven_all_to_all, world_size, timeout=60)


def _make_layer(num_experts: int, expert: str, **kwargs) -> MoE:
    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    chosen = template if expert == "module" else expert
    return MoE(hidden_size=8, num_experts=num_experts, ffn_hidden_size=8, expert=chosen, **kwargs)


def _ep_experts_match_local(rank: int, world_size: int, num_experts: int, expert: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    layer = _make_layer(num_experts, expert)
    reference = _make_layer(num_experts, expert).experts
    keys = list(layer.state_dict())
    apply_expert_parallel(layer, mesh)
    experts = layer.experts
    assert is_expert_parallel(layer)
    assert isinstance(layer.token_dispatcher, AllToAllTokenDispatcher)
    assert f"(token_dispatcher): AllToAllTokenDispatcher(num_experts={num_experts}, ep={world_size})" in repr(layer)
    assert list(layer.state_dict()) == keys  # the dispatcher holds no state: checkpoints keep their keys
    for name, p in experts.named_parameters():
        assert isinstance(p, DTensor) and p.to_local().shape[0] == num_experts // world_size, name

    gen = torch.Generator().manual_seed(1234 + rank)
    counts = torch.randint(0, 4, (num_experts,), generator=gen)
    counts[-1] = 0  # the last expert receives nothing from anyone
    if rank == 1:
        counts.zero_()  # a rank that sends nothing at all
    x = torch.randn(int(counts.sum()), 8, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weight = torch.randn(x.shape, generator=gen)

    y = layer.token_dispatcher(experts, x, counts)
    y_ref = reference(x_ref, counts)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    (y * weight).sum().backward()
    if y_ref.requires_grad:  # the replicated experts return a constant for zero rows
        (y_ref * weight).sum().backward()
    ref_x_grad = x_ref.grad if x_ref.grad is not None else torch.zeros_like(x)
    torch.testing.assert_close(x.grad, ref_x_grad, rtol=1e-5, atol=1e-6)

    owned = local_expert_range(num_experts, mesh)
    for (name, p), (ref_name, p_ref) in zip(experts.named_parameters(), reference.named_parameters()):
        assert name == ref_name
        full_grad = p_ref.grad.clone() if p_ref.grad is not None else torch.zeros_like(p_ref)
        dist.all_reduce(full_grad)  # the experts see every rank's tokens
        torch.testing.assert_close(p.grad.to_local(), full_grad[owned.start : owned.stop], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.to_local().detach(), p_ref.detach()[owned.start : owned.stop])


@pytest.mark.parametrize(
    ("world_size", "num_experts", "expert"),
    # "module": replicated nn.Module experts, which return a constant for zero rows (rank 1 owns the last
    # expert, which nobody sends to): the backward all-to-alls must still match on every rank.
    [(2, 2, "ffn"), (2, 4, "ffn"), (4, 8, "glu"), (4, 4, "ffn"), (2, 2, "module")],
)
def test_expert_parallel_matches_local_experts(world_size: int, num_experts: int, expert: str) -> None:
    run_ranks(_ep_experts_match_local, world_size, num_experts, expert, timeout=60)


def _moe_layer_matches_local(rank: int, world_size: int, drop_tokens: bool) -> None:
    # The whole layer on each rank's own tokens: with capacity, EP must drop exactly what the local
    # layer drops (capacity comes from the local token count in both).
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    kwargs = dict(k=2, drop_tokens=drop_tokens, capacity_factor=0.5, min_capacity=1, use_rts=False)
    layer = apply_expert_parallel(_make_layer(4, "ffn", **kwargs), mesh)
    reference = _make_layer(4, "ffn", **kwargs)
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = layer(x), reference(x_ref)
    if drop_tokens:
        assert layer.last_stats.dropped_fraction > 0  # capacity really bites
    torch.testing.assert_close(out.output, out_ref.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, out_ref.aux_loss)
    (out.output.square().sum() + out.aux_loss).backward()
    (out_ref.output.square().sum() + out_ref.aux_loss).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.gate.weight.grad, reference.gate.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_moe_layer_with_expert_parallelism_matches_local_layer(drop_tokens: bool) -> None:
    run_ranks(_moe_layer_matches_local, 2, drop_tokens, timeout=60)


def _ep_size_one_is_identity(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("ep", "dp"))
    layer = _make_layer(4, "ffn")
    apply_expert_parallel(layer, mesh["ep"])
    assert not is_expert_parallel(layer)
    assert type(layer.token_dispatcher) is TokenDispatcher
    assert not any(isinstance(p, DTensor) for p in layer.parameters())


def test_expert_parallel_size_one_is_identity() -> None:
    run_ranks(_ep_size_one_is_identity, 2, timeout=60)


def _bad_expert_count(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    layer = _make_layer(6, "ffn")
    with pytest.raises(ValueError, match=r"expert_parallel_size=4 does not divide num_experts=6"):
        apply_expert_parallel(layer, mesh)


def test_expert_parallel_rejects_indivisible_expert_count() -> None:
    run_ranks(_bad_expert_count, 4, timeout=60)
