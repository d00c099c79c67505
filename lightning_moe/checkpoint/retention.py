"""Keeping the newest ``keep_last`` step checkpoints of a run, judged from what is on disk."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.checkpoint.files import is_complete
from lightning_moe.checkpoint.manifest import file_manifest_path
from lightning_moe.checkpoint.resume import checkpoint_step
from lightning_moe.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionSignals

__all__ = ["RetainingModelCheckpoint", "prune_checkpoints"]

log = logging.getLogger(__name__)


def prune_checkpoints(folder: str | os.PathLike, keep_last: int, current_step: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete ``step-<N>.ckpt`` in ``folder``, and any incomplete
    one older than the newest complete one (left by a killed run). Returns what was deleted.

    ``current_step``: the step the run just saved. Checkpoints of later steps belong to a history the run
    abandoned (it fell back from a damaged checkpoint, or resumed an older one on purpose) and are deleted
    too, so they can never outrank the run's own newest one. A checkpoint file's manifest goes with it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = [(checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None]
    abandoned = [p for s, p in steps if current_step is not None and s > current_step]
    steps = [(s, p) for s, p in steps if current_step is None or s <= current_step]
    complete = sorted((s, p) for s, p in steps if is_complete(p))
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for _, p in complete[:-keep_last]] if len(complete) > keep_last else []
    doomed += [p for s, p in steps if not is_complete(p) and s < newest]
    doomed += abandoned
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        file_manifest_path(path).unlink(missing_ok=True)
    return doomed


class RetainingModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the newest ``keep_last`` checkpoints found on disk, and saves at the
    current step when the run is preempted (:mod:`lightning_moe.preemption`).

    Retention looks at the folder, not at the callback's own bookkeeping, so it holds across restarts
    (and changes of ``keep_last``) of the same run. When training starts, checkpoints of later steps than
    the one resumed from (an abandoned history: a damaged checkpoint was skipped, or an older one chosen)
    are deleted, so the run's next checkpoints take their names.

    Args:
        keep_last: how many complete checkpoints to keep.
        preempt_signals: signals that stop training after the current optimizer step with a checkpoint at
            that step on every rank, then raise :class:`~lightning_moe.preemption.Preempted` (exit code 75).
            Empty: none (the signals keep their previous handlers).
        **kwargs: ``ModelCheckpoint``'s arguments.
    """

    def __init__(self, keep_last: int, preempt_signals: Sequence[str | int] = (), **kwargs: Any) -> None:
        super().__init__(save_top_k=-1, **kwargs)
        self.keep_last = keep_last
        self._signals = PreemptionSignals(preempt_signals) if preempt_signals else None
        self._checked_step: int | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and self.dirpath:
            folder = Path(self.dirpath)
            later = (
                [p for p in folder.iterdir() if (checkpoint_step(p) or -1) > trainer.global_step]
                if folder.is_dir()
                else []
            )
            if later:
                log.warning(
                    "deleting %d checkpoint(s) of steps after %d, the step this run continues from: %s",
                    len(later),
                    trainer.global_step,
                    ", ".join(sorted(p.name for p in later)),
                )
                prune_checkpoints(folder, self.keep_last, current_step=trainer.global_step)
        trainer.strategy.barrier("checkpoint-abandoned")
        self._checked_step = trainer.global_step
        if self._signals is not None:
            if getattr(trainer, "received_sigterm", False):  # arrived before our handlers: Lightning's caught it
                self._signals.received = signal.SIGTERM
                connector = getattr(trainer, "_signal_connector", None)
                if connector is not None:  # else Lightning's loop stops this rank alone at a batch end, unsaved
                    connector.received_sigterm = False
            # replaces Lightning's SIGTERM handler (see lightning_moe.preemption for why); Lightning puts the
            # handlers from before `fit` back when it tears down
            self._signals.install()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._signals is None or trainer.global_step == self._checked_step:
            return  # no optimizer step since the last check (gradient accumulation): not a step boundary
        self._checked_step = trainer.global_step
        # collective: every rank stops after the same step if any one of them got a signal (the largest
        # signal number names it)
        local = torch.tensor(int(self._signals.received or 0), device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(local, reduce_op="max"))
        if agreed == 0:
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
        raise Preempted(
            f"preempted ({signal.Signals(agreed).name}): saved {self.best_model_path} at step {trainer.global_step};"
            f" run the same command again to continue (exit code {PREEMPTED_EXIT_CODE})"
        )

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._signals is not None:
            self._signals.restore()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._signals is not None:
            self._signals.restore()

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        trainer.strategy.barrier("checkpoint-retention")
        if trainer.is_global_zero:
            prune_checkpoints(Path(filepath).parent, self.keep_last, current_step=checkpoint_step(Path(filepath)))
