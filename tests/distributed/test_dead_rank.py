"""A rank that dies (SIGKILL) or freezes (SIGSTOP) mid-training: the others fail within a bound, with an error
that names it, instead of gloo's "Connection reset by peer" (which names no rank) or a hang.

The ranks are forked by ``run_ranks``; the killed rank shows up there as "exited (exit code -9)", and the
survivors' tracebacks are read from ``RankError.tracebacks``.
"""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback

from lightning_moe.parallel.health import Heartbeat, RankFailureError, rank_failure, set_collective_timeout
from lightning_moe.strategy import MoEZeroStrategy
from tests.distributed.harness import RankError, run_ranks
from tests.distributed.test_strategy_models import TinyMoEModule, make_trainer

pytestmark = pytest.mark.distributed

KILL_STEP = 3


class _DieAt(Callback):
    """Send ``signum`` to this process at the start of training step ``step`` on rank ``rank``."""

    def __init__(self, rank: int, step: int, signum: int) -> None:
        self.rank, self.step, self.signum = rank, step, signum

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _fit_until_a_rank_dies(rank: int, world_size: int, victim: int, signum: int, timeout_s: float) -> None:
    torch.manual_seed(0)
    module = TinyMoEModule(n_samples=400, num_experts=4)
    strategy = MoEZeroStrategy(zero_stage=3, timeout=timedelta(seconds=timeout_s))
    trainer = make_trainer(world_size, strategy, max_steps=100, callbacks=[_DieAt(victim, KILL_STEP, signum)])
    start = time.monotonic()
    try:
        trainer.fit(module)
    except RankFailureError as exc:
        raise RankFailureError(
            f"{exc} [after {time.monotonic() - start:.1f} s]", exc.ranks, exc.world_size, exc.where
        ) from exc
    raise AssertionError(f"rank {rank}: fit finished although rank {victim} died")


def _seconds_to_fail(text: str) -> float:
    """The "[after X s]" that ``_fit_until_a_rank_dies`` appends: from the start of ``fit`` to the error."""
    match = re.search(r"\[after ([0-9.]+) s\]", text)
    assert match, text[-2000:]
    return float(match.group(1))


def _survivor_messages(info: pytest.ExceptionInfo[RankError], victim: int, world_size: int) -> dict[int, str]:
    tracebacks = info.value.tracebacks
    assert "exit code -9" in tracebacks[victim] or "exit code -19" in tracebacks[victim], tracebacks[victim]
    survivors = {r: tracebacks.get(r, "") for r in range(world_size) if r != victim}
    for rank, text in survivors.items():
        assert "RankFailureError" in text, f"rank {rank} did not raise RankFailureError:\n{text[-3000:]}"
    return survivors


def test_sigkilled_rank_is_named_by_every_survivor_within_seconds() -> None:
    world, victim = 3, 1
    with pytest.raises(RankError) as info:
        run_ranks(_fit_until_a_rank_dies, world, victim, signal.SIGKILL, 30.0, timeout=90, failure_grace_s=30)
    for _rank, text in _survivor_messages(info, victim, world).items():
        assert f"rank {victim} (of {world}) stopped responding during" in text, text[-2000:]
        assert f"at global step {KILL_STEP}" in text, text[-2000:]
        assert "resume from the last complete checkpoint" in text
        # a killed process closes its sockets: nobody waits for the 30 s collective timeout
        assert _seconds_to_fail(text) < 20, text[-2000:]


def test_frozen_rank_is_named_after_the_collective_timeout() -> None:
    world, victim, timeout_s = 2, 0, 3.0
    with pytest.raises(RankError) as info:
        # SIGSTOP: the victim keeps its sockets open and never answers; the harness kills it at the end
        run_ranks(_fit_until_a_rank_dies, world, victim, signal.SIGSTOP, timeout_s, timeout=60)
    text = info.value.tracebacks[1]
    assert "RankFailureError" in text, info.value.tracebacks
    assert f"rank {victim} (of {world}) stopped responding during" in text
    assert timeout_s <= _seconds_to_fail(text) < timeout_s + 15, text[-2000:]


# ------------------------------------------------------------------------------------------------------
# plain collectives (no Lightning): the stuck-survivor case and the store host's death
# ------------------------------------------------------------------------------------------------------


def _all_reduce_until_a_rank_dies(rank: int, world_size: int, victim: int, timeout_s: float) -> None:
    set_collective_timeout(timedelta(seconds=timeout_s), [None])
    heartbeat = Heartbeat.for_default_group(interval=0.25).start()
    dist.barrier()
    t = torch.ones(4096)
    try:
        for step in range(100_000):
            if rank == victim and step == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.all_reduce(t)
    except RuntimeError as exc:
        error = rank_failure(exc, heartbeat, "the all-reduce loop", timeout=timedelta(seconds=timeout_s))
        assert error is not None, f"not recognised as a communication error: {exc}"
        raise RankFailureError(f"{error} [ranks={error.ranks}]", error.ranks, world_size, error.where) from exc
    raise AssertionError("unreachable")


def test_ranks_not_connected_to_the_dead_one_still_name_only_it() -> None:
    # In gloo's ring all-reduce over 4 ranks, rank 3 does not exchange data with rank 1: it sees no closed
    # connection and fails only when a neighbour exits or its collective times out. By then the neighbours
    # have left too; their recorded verdicts keep rank 3 from naming them.
    world, victim, timeout_s = 4, 1, 4.0
    with pytest.raises(RankError) as info:
        run_ranks(_all_reduce_until_a_rank_dies, world, victim, timeout_s, timeout=60, failure_grace_s=30)
    tracebacks = info.value.tracebacks
    assert "exit code -9" in tracebacks[victim]
    for rank in (0, 2, 3):
        assert f"rank {victim} (of {world}) stopped responding during the all-reduce loop" in tracebacks[rank]
        assert "[ranks=[1]]" in tracebacks[rank], tracebacks[rank][-1500:]


def test_store_host_death_names_rank_0() -> None:
    def fn(rank: int, world_size: int) -> dict[str, Any]:
        # a TCPStore served by rank 0, as under env:// and Lightning's launcher
        box = [None]
        if rank == 0:
            server = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
            box = [server.port]
        dist.broadcast_object_list(box, src=0)
        store = server if rank == 0 else dist.TCPStore("127.0.0.1", box[0], world_size, is_master=False)
        heartbeat = Heartbeat(store, rank, world_size, interval=0.25).start()
        dist.barrier()
        if rank == 0:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            while True:
                dist.all_reduce(torch.ones(8))
        except RuntimeError as exc:
            error = rank_failure(exc, heartbeat, "the test loop", store_host=0)
            assert error is not None
            raise error from exc

    with pytest.raises(RankError) as info:
        run_ranks(fn, 3, timeout=60, failure_grace_s=30)
    for rank in (1, 2):
        text = info.value.tracebacks[rank]
        assert "rank 0 (of 3) stopped responding during the test loop: the process group's store it hosts" in text


def _mesh_timeouts(rank: int, world_size: int) -> dict[str, float]:
    from lightning_moe.parallel import submesh

    strategy = MoEZeroStrategy(expert_parallel_size=2, timeout=timedelta(seconds=7))
    trainer = make_trainer(world_size, strategy, max_steps=1)
    trainer.fit(TinyMoEModule(n_samples=16))
    mesh = strategy.device_mesh
    groups = {name: submesh(mesh, name).get_group() for name in ("efsdp", "ep", "dp")}
    groups["default"] = dist.distributed_c10d._get_default_group()
    return {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for name, g in groups.items()}


def test_every_mesh_group_gets_the_strategy_timeout() -> None:
    # the efsdp and ep groups of a 2 x 2 mesh are subgroups, created with torch's 30 min default
    for timeouts in run_ranks(_mesh_timeouts, 4, timeout=120):
        assert timeouts == {"efsdp": 7.0, "ep": 7.0, "dp": 7.0, "default": 7.0}
