"""``python -m lightning_moe.train strategy=moe_zero trainer.devices=2`` (Lightning's own launcher: rank 0 is
the command's process, rank 1 its child) with one rank SIGKILLed mid-training: the job ends within seconds,
non-zero, with an error that names the dead rank; no process is left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_cli import TINY

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BOUND_S = 30  # from the kill to the end of every surviving process


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")  # a zombie has exited
    except FileNotFoundError:
        return True


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("victim", [1, 0], ids=["child-rank-1-dies", "launcher-rank-0-dies"])
def test_a_killed_rank_stops_the_job_naming_it(tmp_path: Path, victim: int) -> None:
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc to find the launcher's child process")
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LIGHTNING_MOE_CACHE=str(tmp_path / "cache"))
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "lightning_moe.train",
        *TINY,
        f"hydra.run.dir={run_dir}",
        "strategy=moe_zero",
        "trainer.devices=2",
        "trainer.max_steps=100000",
        "test_after_fit=false",
        "strategy.timeout_s=60",
    ]
    log = tmp_path / "output.log"
    with open(log, "wb") as out:
        main = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = _wait_until(
            lambda: (run_dir / "checkpoints" / "step-000004.ckpt").exists() or main.poll() is not None, 300
        )
        assert started and main.poll() is None, f"training did not get going:\n{log.read_text()[-3000:]}"
        children = _children(main.pid)
        assert len(children) == 1, children
        ranks = {0: main.pid, 1: children[0]}
        survivor = ranks[1 - victim]

        os.kill(ranks[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        assert _wait_until(lambda: _gone(survivor), BOUND_S), f"rank {1 - victim} still runs {BOUND_S} s after the kill"
        took = time.monotonic() - killed_at
        main.wait(timeout=10)
        assert main.returncode != 0
    finally:
        for pid in [main.pid, *(_children(main.pid) if main.poll() is None else [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        main.wait(timeout=10)
    output = log.read_text(errors="replace")
    ours = f"rank {victim} (of 2) stopped responding during" in output
    if victim == 0:
        # the orphaned child must notice by itself; without the heartbeat it only prints gloo's
        # "Connection closed by peer", which names no rank
        assert ours, output[-4000:]
    else:
        # rank 0 names the child as soon as its next collective fails; Lightning's process observer (a 5 s poll
        # in rank 0) may kill rank 0 first when it was busy outside collectives, with its own message
        lightning = re.search(rf"\[rank: {victim}\] Child process with PID \d+ terminated with code -9", output)
        assert ours or lightning, output[-4000:]
    print(f"rank {1 - victim} stopped {took:.1f} s after rank {victim} was killed")
