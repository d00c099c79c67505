"""Dead-rank detection in one process: heartbeats in a shared ``HashStore``, the verdict, the error text, and
the ``strategy.timeout_s`` key. The multi-process behaviour is in ``tests/distributed/test_dead_rank.py``."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from lightning_moe.config import ConfigError, to_train_config
from lightning_moe.parallel.health import (
    Heartbeat,
    RankFailureError,
    is_communication_error,
    rank_failure,
    store_host_rank,
)
from lightning_moe.train import build_strategy
from tests.unit.test_config import _compose

GLOO_RESET = RuntimeError(
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4242:"
    " Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
)


def _heartbeats(store: dist.Store, world: int, alive: list[int]) -> list[Heartbeat]:
    beats = [Heartbeat(store, r, world, interval=0.05) for r in range(world)]
    for r in range(world):
        beats[r].start()
        if r not in alive:
            beats[r].stop()  # its key exists but stops moving, like a killed process
    return beats


def test_communication_errors_are_recognised_and_others_are_not():
    assert is_communication_error(GLOO_RESET)
    assert is_communication_error(RuntimeError("[..unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"))
    assert is_communication_error(dist.DistBackendError("anything"))
    assert not is_communication_error(ValueError("Connection reset by peer"))  # not a RuntimeError
    assert not is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_silent_rank_is_named_and_live_ranks_are_not():
    store = dist.HashStore()
    beats = _heartbeats(store, 3, alive=[0, 2])
    try:
        error = rank_failure(GLOO_RESET, beats[0], "training_step at global step 7")
        assert isinstance(error, RankFailureError) and error.ranks == [1] and error.world_size == 3
        text = str(error)
        assert text.startswith("rank 1 (of 3) stopped responding during training_step at global step 7")
        assert "rank 0 saw: Read error [127.0.0.1]:4242: Connection reset by peer." in text  # no source path
        assert "checkpoint.resume=auto" in text
        # the verdict is recorded: a rank checking later names rank 1, not rank 0 that has left meanwhile
        beats[0].stop()
        assert beats[2].check().unresponsive == [1]
    finally:
        for b in beats:
            b.stop()


def test_every_rank_alive_gives_a_timeout_message_without_ranks():
    store = dist.HashStore()
    beats = _heartbeats(store, 2, alive=[0, 1])
    try:
        cause = RuntimeError("[unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete")
        error = rank_failure(cause, beats[1], "barrier", timeout=timedelta(seconds=3))
        assert error is not None and error.ranks == []
        assert "every rank is still alive" in str(error) and "(timeout 3 s)" in str(error)
    finally:
        for b in beats:
            b.stop()


def test_other_errors_pass_through_without_waiting():
    beat = Heartbeat(dist.HashStore(), 0, 2, interval=10.0)  # a check would take 40 s
    assert rank_failure(RuntimeError("shapes do not match"), beat, "training_step") is None


def test_unreachable_store_names_its_host():
    server = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 2, is_master=False, timeout=timedelta(seconds=5))
    beat = Heartbeat(client, 1, 2, interval=0.05).start()
    assert store_host_rank(dist.PrefixStore("x", client)) == 0
    del server  # the store's host goes away
    error = rank_failure(GLOO_RESET, beat, "backward at global step 3", store_host=0)
    beat.stop()
    assert error is not None and error.ranks == [0]
    assert str(error).startswith("rank 0 (of 2) stopped responding during backward at global step 3: the process")


def test_heartbeat_beats_until_stopped():
    store = dist.HashStore()
    beat = Heartbeat(store, 0, 1, interval=0.02).start()
    done = threading.Event()
    done.wait(0.2)
    beat.stop()
    count = beat._counters([0])[0]
    assert count >= 3
    done.wait(0.1)
    assert beat._counters([0])[0] == count and not beat.running


def test_timeout_key_reaches_the_strategy_and_is_validated():
    cfg = to_train_config(_compose(["strategy=moe_zero", "trainer.devices=2", "strategy.timeout_s=42"]))
    assert build_strategy(cfg)._timeout == timedelta(seconds=42)
    assert build_strategy(to_train_config(_compose(["strategy=moe_zero"])))._timeout == timedelta(seconds=600)
    for bad in ("0", "-5", "inf"):
        with pytest.raises(ConfigError, match="strategy.timeout_s"):
            to_train_config(_compose(["strategy=moe_zero", f"strategy.timeout_s={bad}"]))


def test_a_user_timeout_with_every_rank_alive_is_left_alone():
    store = dist.HashStore()
    beats = _heartbeats(store, 2, alive=[0, 1])
    try:
        assert rank_failure(RuntimeError("my data server timed out"), beats[0], "training_step") is None
    finally:
        for b in beats:
            b.stop()
