"""Tests of the forked multi-rank harness itself."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import RankError, RankTimeoutError, run_ranks

pytestmark = pytest.mark.distributed


def _all_reduce_rank(rank: int, world_size: int, offset: int, *, scale: float) -> dict:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": t.item() * scale + offset,
        "threads": torch.get_num_threads(),
        "tensor": torch.full((2,), float(rank)),
    }


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_returns_values_by_rank(world_size: int) -> None:
    out = run_ranks(_all_reduce_rank, world_size, 3, scale=2.0, timeout=60)
    expected_sum = sum(range(world_size)) * 2.0 + 3
    assert [o["rank"] for o in out] == list(range(world_size))
    assert all(o["world"] == world_size for o in out)
    assert all(o["sum"] == expected_sum for o in out)
    assert all(o["threads"] == 1 for o in out)
    for rank, o in enumerate(out):
        torch.testing.assert_close(o["tensor"], torch.full((2,), float(rank)))


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise KeyError("boom-from-rank-one")
    return rank


def test_failing_rank_is_reraised_with_its_traceback() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(_fail_on_rank_one, 2, timeout=60)
    assert info.value.rank == 1
    message = str(info.value)
    assert "rank 1 failed" in message
    assert "boom-from-rank-one" in message and "_fail_on_rank_one" in message


def _fail_while_peer_waits(rank: int, world_size: int) -> None:
    if rank == 0:
        raise ValueError("rank zero gives up")
    dist.barrier()  # would wait forever for rank 0


def test_failing_rank_does_not_hang_on_peers_in_a_collective() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match="rank zero gives up"):
        run_ranks(_fail_while_peer_waits, 2, timeout=60)
    assert time.monotonic() - start < 30


def _hang_on_rank_two(rank: int, world_size: int) -> None:
    if rank == 2:
        time.sleep(600)


def test_hanging_rank_times_out_naming_it() -> None:
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"ranks \[2\] of 3 did not finish"):
        run_ranks(_hang_on_rank_two, 3, timeout=2)
    assert time.monotonic() - start < 15


def test_unpicklable_result_is_reported() -> None:
    with pytest.raises(RankError, match="rank 0 failed"):
        run_ranks(lambda rank, world_size: lambda: None, 1, timeout=60)


def test_rejects_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(_all_reduce_rank, 0)


def _flaky_init(marker_dir: str, fail_times: int):
    """An ``init_process_group`` that fails on rank 1 for its first ``fail_times`` launches."""
    real_init = dist.init_process_group

    def init(*args, **kwargs):
        if kwargs.get("rank") == 1:
            failures = len(os.listdir(marker_dir))
            if failures < fail_times:
                open(os.path.join(marker_dir, str(failures)), "w").close()
                raise RuntimeError("simulated gloo connectFullMesh failure")
        return real_init(*args, **kwargs)

    return init


def _count_calls(rank: int, world_size: int, marker_dir: str) -> int:
    open(os.path.join(marker_dir, f"ran_{rank}_{os.getpid()}"), "w").close()
    return rank


def test_failed_setup_is_retried_before_the_test_runs(tmp_path, monkeypatch, capfd) -> None:
    markers, runs = tmp_path / "failures", tmp_path / "runs"
    markers.mkdir()
    runs.mkdir()
    monkeypatch.setattr(dist, "init_process_group", _flaky_init(str(markers), fail_times=1))
    assert run_ranks(_count_calls, 2, str(runs), timeout=60) == [0, 1]
    assert len(os.listdir(runs)) == 2  # the test body ran once per rank: never during the failed launch
    assert "retrying" in capfd.readouterr().err


def test_setup_failing_every_time_is_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dist, "init_process_group", _flaky_init(str(tmp_path), fail_times=100))
    with pytest.raises(RankError, match="rank 1 failed(.|\n)*simulated gloo connectFullMesh failure"):
        run_ranks(_count_calls, 2, str(tmp_path), timeout=60)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("ran_")]) == 0
