"""NonFiniteGuard never applies a non-finite step; ExpertLoadMonitor logs per-layer load and a heatmap."""

from __future__ import annotations

import copy
import logging

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE
from lightning_moe.callbacks import ExpertLoadMonitor, NonFiniteGuard, NonFiniteLossError
from tests.quiet_trainer import QUIET


class TinyMoEModule(pl.LightningModule):
    """A linear head over one MoE layer; ``bad_steps`` produce a NaN loss."""

    def __init__(self, bad_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.moe = MoE(8, 4, 16, k=2, drop_tokens=False)
        self.head = torch.nn.Linear(8, 1)
        self.bad_steps = set(bad_steps)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        self.snapshots[self.global_step] = copy.deepcopy(self.state_dict())
        x, y = batch
        out, aux, _ = self.moe(x)
        loss = torch.nn.functional.mse_loss(self.head(out).squeeze(-1), y) + aux
        if self.global_step in self.bad_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(module: pl.LightningModule, callbacks: list, steps: int = 5) -> pl.Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randn(64))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        **QUIET,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer


def test_nonfinite_step_is_skipped_and_parameters_stay_finite(caplog):
    module = TinyMoEModule(bad_steps=(2,))
    guard = NonFiniteGuard("skip")
    with caplog.at_level(logging.WARNING):
        trainer = _fit(module, [guard])
    assert guard.skipped == 1
    assert "optimizer step skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # the bad step changed nothing: the parameters before step 3 equal those before step 2
    before, after = module.snapshots[2], module.snapshots[3]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.global_step == 5


def test_without_the_guard_a_nonfinite_step_poisons_the_parameters():
    module = TinyMoEModule(bad_steps=(2,))
    _fit(module, [])
    assert not all(torch.isfinite(p).all() for p in module.parameters())


def test_stop_policies():
    with pytest.raises(NonFiniteLossError, match="nonfinite='stop'"):
        _fit(TinyMoEModule(bad_steps=(1,)), [NonFiniteGuard("stop")])
    guard = NonFiniteGuard("stop_after", max_skips=2)
    with pytest.raises(NonFiniteLossError, match="2 so far"):
        _fit(TinyMoEModule(bad_steps=(1, 3)), [guard], steps=6)
    with pytest.raises(ValueError, match="policy='ignore'"):
        NonFiniteGuard("ignore")


def test_expert_load_monitor_accumulates_and_draws(tmp_path):
    class WithVal(TinyMoEModule):
        def validation_step(self, batch, batch_idx):
            pass

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64)), batch_size=8)
    monitor = ExpertLoadMonitor()
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        **QUIET,
        callbacks=[monitor],
        val_check_interval=4,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(WithVal(), data, data)
    assert monitor.last_load is not None and monitor.last_load.shape == (1, 4)
    torch.testing.assert_close(monitor.last_load.sum(), torch.tensor(1.0, dtype=monitor.last_load.dtype))
    assert list(tmp_path.glob("expert_load_step*.png"))
    assert "moe/dropped_fraction" in trainer.callback_metrics and "moe/router_entropy" in trainer.callback_metrics


def test_validation_gives_the_training_generators_back():
    """A checkpoint saved right before a validation (a preemption at that step) resumes with the random numbers
    an uninterrupted run draws after its validation: validation must not move the generators."""
    from lightning_moe.callbacks import RNGStateCheckpoint

    callback = RNGStateCheckpoint()
    torch.manual_seed(3)
    callback.on_validation_start(None, None)
    torch.rand(7)  # whatever validation draws
    callback.on_validation_end(None, None)
    after_validation = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), after_validation)
