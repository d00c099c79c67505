"""A run killed with SIGKILL and started again with the same command ends with exactly the parameters of
a run that was never interrupted; half-written checkpoints are never resumed from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_moe.checkpoint import (
    COMPLETE_MARKER,
    find_latest_checkpoint,
    is_complete_distributed_checkpoint,
    prune_checkpoints,
    resolve_resume,
)
from tests.e2e.test_cli import TINY

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _command(run_dir: Path, max_steps: int) -> list[str]:
    # dropout and RTS on: the RNG states must be restored too, not only parameters and data order
    return [
        sys.executable,
        "-m",
        "lightning_moe.train",
        *TINY,
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={max_steps}",
        "test_after_fit=false",
        "model.dropout=0.2",
        "moe.use_rts=true",
        "moe.capacity_factor=1.0",
        "trainer.val_check_interval=3",
    ]


def _final_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step-{step:06d}.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkill_then_same_command_reaches_the_uninterrupted_parameters(tmp_path: Path):
    env = dict(ENV, LIGHTNING_MOE_CACHE=str(tmp_path / "cache"))
    steps = 14
    reference = tmp_path / "reference"
    subprocess.run(_command(reference, steps), env=env, check=True, capture_output=True, timeout=600)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        _command(interrupted, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = interrupted / "checkpoints" / "step-000004.ckpt"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere after the first checkpoint, mid-epoch, maybe mid-write of the next
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    assert find_latest_checkpoint(interrupted / "checkpoints") is not None

    result = subprocess.run(_command(interrupted, steps), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr

    expected, actual = _final_state(reference, steps), _final_state(interrupted, steps)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"parameters differ after resuming: {different[:5]}"


def test_incomplete_checkpoints_are_never_the_latest(tmp_path: Path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"x": 1}, folder / "step-000004.ckpt")
    (folder / "step-000008.ckpt.tmp-1234").write_bytes(b"half a file")  # killed during an atomic file write
    (folder / "step-000012.ckpt").mkdir()  # a sharded folder without its completion marker (written last)
    for name in ("__0_0.distcp", ".metadata", "meta.pt"):
        (folder / "step-000012.ckpt" / name).write_bytes(b"")
    assert find_latest_checkpoint(folder) == folder / "step-000004.ckpt"
    assert resolve_resume("auto", folder) == str(folder / "step-000004.ckpt")
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_resume(str(folder / "step-000012.ckpt"), folder)
    (folder / "step-000012.ckpt" / COMPLETE_MARKER).write_text("complete\n")
    assert find_latest_checkpoint(folder) == folder / "step-000012.ckpt"
    # one completeness rule for resuming and loading: a marker without the DCP index is not a checkpoint
    (folder / "step-000016.ckpt").mkdir()
    (folder / "step-000016.ckpt" / COMPLETE_MARKER).write_text("complete\n")
    assert not is_complete_distributed_checkpoint(folder / "step-000016.ckpt")
    assert find_latest_checkpoint(folder) == folder / "step-000012.ckpt"
    assert resolve_resume("never", folder) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(str(folder / "nope.ckpt"), folder)


def test_pruning_keeps_the_newest_complete_and_removes_stale_partials(tmp_path: Path):
    for step in (4, 8, 12, 16):
        torch.save({"step": step}, tmp_path / f"step-{step:06d}.ckpt")
    (tmp_path / "step-000010.ckpt").mkdir()  # an incomplete folder older than the newest complete one
    (tmp_path / "step-000020.ckpt").mkdir()  # an incomplete folder newer: maybe being written, keep it
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step-000004.ckpt", "step-000008.ckpt", "step-000010.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000012.ckpt", "step-000016.ckpt", "step-000020.ckpt"]
