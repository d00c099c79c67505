"""ParallelDims validation, "auto" expert parallelism, and the mesh layout."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_moe.parallel import ParallelDims, submesh
from tests.distributed.harness import run_ranks


def test_ep_not_dividing_dp_names_valid_sizes() -> None:
    message = r"expert_parallel_size=3 does not divide the data-parallel size 4; use one of \[1, 2, 4\]"
    with pytest.raises(ValueError, match=message):
        ParallelDims(world_size=4, expert_parallel_size=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(world_size=0), r"world_size=0 must be a positive integer"),
        (dict(world_size=4, zero_stage=4), r"zero_stage=4 is not a ZeRO stage; use one of \[0, 1, 2, 3\]"),
        (dict(world_size=4, offload="disk"), r"offload='disk' is not supported; use one of \['none', 'optimizer'"),
        (dict(world_size=4, zero_stage=0, offload="optimizer"), r"offload='optimizer' needs zero_stage >= 1"),
        (dict(world_size=4, zero_stage=2, offload="params"), r"offload='params' needs zero_stage=3"),
        (
            dict(world_size=4, tensor_parallel_size=3),
            r"tensor_parallel_size=3 does not divide world_size=4; use one of \[1, 2, 4\]",
        ),
        (
            dict(world_size=4, tensor_parallel_size=2, expert_parallel_size=4),
            r"expert_parallel_size=4 does not divide the data-parallel size 2",
        ),
        (dict(world_size=4, expert_parallel_size=0), r"expert_parallel_size=0 must be a positive integer or 'auto'"),
        (dict(world_size=4, expert_parallel_size="all"), r"expert_parallel_size='all' must be a positive integer"),
    ],
)
def test_bad_dims_name_the_key_and_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


@pytest.mark.parametrize(
    ("world_size", "experts", "expected"),
    [(8, [8, 4], 4), (4, [6], 2), (4, [3], 1), (4, [], 1), (2, 16, 2), (6, [12, 6], 6)],
)
def test_auto_ep_is_largest_common_divisor(world_size: int, experts, expected: int) -> None:
    dims = ParallelDims(world_size=world_size, expert_parallel_size="auto")
    assert not dims.is_resolved
    resolved = dims.resolve(experts)
    assert resolved is not dims and dims.expert_parallel_size == "auto"  # immutable: resolved into a new object
    assert resolved.ep == expected
    assert resolved.efsdp == world_size // expected
    assert resolved.resolve(experts) is resolved  # resolved dims only check the counts


def test_dims_are_immutable() -> None:
    import dataclasses

    dims = ParallelDims(world_size=4, expert_parallel_size="auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.expert_parallel_size = 2  # type: ignore[misc]


def test_parallelize_takes_only_resolved_dims() -> None:
    from lightning_moe.parallel import parallelize

    with pytest.raises(ValueError, match=r"parallelize needs resolved dims"):
        parallelize(torch.nn.Linear(2, 2), None, ParallelDims(world_size=1, expert_parallel_size="auto"))  # type: ignore[arg-type]


def test_explicit_ep_must_divide_every_expert_count() -> None:
    dims = ParallelDims(world_size=4, expert_parallel_size=4)
    message = r"expert_parallel_size=4 does not divide num_experts=6 of MoE layer 1; use one of \[1, 2\]"
    with pytest.raises(ValueError, match=message):
        dims.resolve([8, 6])


def test_unresolved_auto_cannot_build_a_mesh() -> None:
    with pytest.raises(ValueError, match=r"call dims.resolve\(num_experts=\[...\]\)"):
        ParallelDims(world_size=1, expert_parallel_size="auto").build_mesh("cpu")


def _mesh_layout(rank: int, world_size: int, ep: int) -> dict:
    mesh = ParallelDims(world_size, ep).build_mesh("cpu")
    out = {"names": mesh.mesh_dim_names, "shape": tuple(mesh.shape)}
    for name in ("ep", "efsdp", "dp", "tp"):
        sub = submesh(mesh, name)
        out[name] = sorted(dist.get_process_group_ranks(sub.get_group()))
    assert submesh(mesh, "dp") is submesh(mesh, "dp")  # cached, no new group
    with pytest.raises(ValueError, match="use one of"):
        submesh(mesh, "fsdp")
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_mesh_layout_ep_groups_are_contiguous(ep: int) -> None:
    layouts = run_ranks(_mesh_layout, 4, ep, timeout=60)
    for rank, layout in enumerate(layouts):
        assert layout["names"] == ("efsdp", "ep", "tp")
        assert layout["shape"] == (4 // ep, ep, 1)
        first = rank - rank % ep
        assert layout["ep"] == list(range(first, first + ep))
        assert layout["efsdp"] == list(range(rank % ep, 4, ep))
        assert layout["dp"] == [0, 1, 2, 3]
        assert layout["tp"] == [rank]


def _wrong_world_size(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match=r"world_size=4 but the process group has 2 ranks; use world_size=2"):
        ParallelDims(4, 1).build_mesh("cpu")


@pytest.mark.distributed
def test_build_mesh_checks_the_world_size() -> None:
    run_ranks(_wrong_world_size, 2, timeout=60)


def _mesh_layout_tp(rank: int, world_size: int) -> dict:
    mesh = ParallelDims(world_size, 2, tensor_parallel_size=2).build_mesh("cpu")
    out = {"shape": tuple(mesh.shape)}
    for name in ("ep", "efsdp", "dp", "tp", "efsdp_tp"):
        out[name] = sorted(dist.get_process_group_ranks(submesh(mesh, name).get_group()))
    return out


@pytest.mark.distributed
def test_mesh_layout_with_tp_is_innermost() -> None:
    # 8 ranks = efsdp 2 x ep 2 x tp 2: tp pairs are neighbours, ep groups stride 2, efsdp groups stride 4
    for rank, layout in enumerate(run_ranks(_mesh_layout_tp, 8, timeout=120)):
        assert layout["shape"] == (2, 2, 2)
        assert layout["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert layout["ep"] == [r for r in range(8) if r // 4 == rank // 4 and r % 2 == rank % 2]
        assert layout["efsdp"] == [r for r in range(8) if r % 4 == rank % 4]
        assert layout["dp"] == [r for r in range(8) if r % 2 == rank % 2]
        assert layout["efsdp_tp"] == [r for r in range(8) if (r // 2) % 2 == (rank // 2) % 2]
