"""Preemption pieces that need no training run: signal handlers that only set a flag, and SLURM requeue."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from lightning_moe.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionSignals, request_slurm_requeue


def test_handlers_record_the_first_signal_and_restore_the_previous_ones() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    signals = PreemptionSignals(["SIGUSR1", "usr2"])
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR2  # the first one names the preemption
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_preempted_exits_with_75_and_one_line() -> None:
    with pytest.raises(SystemExit) as info:
        raise Preempted("preempted (SIGTERM): saved x at step 3")
    assert info.value.code == PREEMPTED_EXIT_CODE == 75
    assert str(info.value) == "preempted (SIGTERM): saved x at step 3"


def test_slurm_requeue_calls_scontrol_with_the_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not request_slurm_requeue()  # not in a SLURM job
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert request_slurm_requeue()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert request_slurm_requeue()
    assert calls.read_text().split("\n")[:2] == ["requeue 4242", "requeue 77_3"]
    fake.write_text("#!/bin/sh\nexit 1\n")
    assert not request_slurm_requeue()


def test_a_signal_before_training_starts_stops_after_the_first_full_step_with_a_checkpoint(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_moe.checkpoint import RetainingModelCheckpoint, checkpoint_step

    class SignalledEarly(BoringModel):
        def train_dataloader(self):  # runs after Lightning installed its SIGTERM handler, before on_train_start
            os.kill(os.getpid(), signal.SIGTERM)
            return super().train_dataloader()

    callback = RetainingModelCheckpoint(
        keep_last=2,
        preempt_signals=["SIGTERM"],
        dirpath=str(tmp_path),
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=100,
    )
    trainer = pl.Trainer(
        max_steps=10,
        accumulate_grad_batches=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
    )
    torch.manual_seed(0)
    with pytest.raises(Preempted, match=r"preempted \(SIGTERM\): saved .*step-000001.ckpt at step 1"):
        trainer.fit(SignalledEarly())
    # stopped after the first optimizer step (two micro-batches), not after the first micro-batch
    assert [checkpoint_step(p) for p in tmp_path.glob("*.ckpt")] == [1]
    assert torch.load(tmp_path / "step-000001.ckpt", weights_only=True)["global_step"] == 1
    assert signal.getsignal(signal.SIGTERM) is not callback._signals._handle  # handlers restored
