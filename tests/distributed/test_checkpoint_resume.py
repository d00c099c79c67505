"""Save -> ``Trainer.fit(ckpt_path=...)`` resumes exactly (2 gloo ranks, same layout).

A run of 2 epochs is compared with a run of 1 epoch, a checkpoint, and a resumed run of the second epoch
(checkpoints at epoch boundaries, where Lightning's loops resume without replaying batches): parameters,
optimizer state, global step and the losses of the resumed steps must be identical.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe import checkpoint as ckpt
from lightning_moe.strategy import MoEZeroStrategy
from tests.distributed.harness import run_ranks
from tests.distributed.test_strategy_models import TinyMoEModule, full_optimizer_state, full_state, make_trainer

pytestmark = pytest.mark.distributed

WORLD = 2
MODULE = dict(n_samples=8, aux_loss_coef=0.05, z_loss_coef=0.01)  # 2 steps per epoch per rank


def _run(
    rank: int,
    world_size: int,
    strategy_kwargs: dict[str, Any],
    epochs: int,
    save_to: str | None,
    resume_from: str | None,
    seed: int,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    module = TinyMoEModule(**MODULE)
    trainer = make_trainer(world_size, MoEZeroStrategy(**strategy_kwargs), max_steps=-1, max_epochs=epochs)
    trainer.fit(module, ckpt_path=resume_from)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return {
        "state": full_state(module),
        "optim": full_optimizer_state(module, trainer.optimizers[0]),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "losses": module.losses,
    }


@pytest.mark.slow  # three 2-rank runs
@pytest.mark.parametrize(
    "strategy_kwargs",
    [
        dict(zero_stage=3, expert_parallel_size=2),
        dict(zero_stage=1, expert_parallel_size=2, save_distributed_checkpoint=False),
        dict(zero_stage=2, expert_parallel_size=1, offload="optimizer"),
    ],
    ids=["dcp-stage3-ep2", "full-file-stage1-ep2", "dcp-stage2-offload"],
)
def test_resume_is_exact(tmp_path: Path, strategy_kwargs: dict[str, Any]) -> None:
    path = str(tmp_path / "epoch1.ckpt")
    straight = run_ranks(_run, WORLD, strategy_kwargs, 2, None, None, 0, timeout=120)
    first = run_ranks(_run, WORLD, strategy_kwargs, 1, path, None, 0, timeout=120)
    if strategy_kwargs.get("save_distributed_checkpoint", True):
        assert ckpt.is_complete_distributed_checkpoint(path)
    else:
        assert os.path.isfile(path)
    # resume into a module with other initial weights: only the checkpoint can make it match
    resumed = run_ranks(_run, WORLD, strategy_kwargs, 2, None, path, 123, timeout=120)

    assert first[0]["global_step"] == 2
    for rank in range(WORLD):
        assert resumed[rank]["global_step"] == straight[rank]["global_step"] == 4
        assert resumed[rank]["losses"] == straight[rank]["losses"][2:]  # only the second epoch ran
        for name, value in straight[rank]["state"].items():
            torch.testing.assert_close(resumed[rank]["state"][name], value, rtol=0, atol=0, msg=name)
        assert resumed[rank]["optim"].keys() == straight[rank]["optim"].keys()
        for name, entries in straight[rank]["optim"].items():
            for key, value in entries.items():
                torch.testing.assert_close(resumed[rank]["optim"][name][key], value, rtol=0, atol=0)


def _run_with_callback(rank: int, world_size: int, dirpath: str) -> list[str]:
    torch.manual_seed(0)
    callback = ModelCheckpoint(dirpath=dirpath, every_n_epochs=1, save_top_k=1, save_last=True)
    trainer = make_trainer(
        world_size,
        MoEZeroStrategy(zero_stage=3, expert_parallel_size=2),
        max_steps=-1,
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[callback],
    )
    trainer.fit(TinyMoEModule(**MODULE))
    return [os.path.basename(callback.best_model_path), os.path.basename(callback.last_model_path)]


def test_model_checkpoint_callback_writes_and_prunes_folders(tmp_path: Path) -> None:
    best, last = run_ranks(_run_with_callback, WORLD, str(tmp_path), timeout=120)[0]
    # save_top_k=1 without a monitor keeps the latest epoch only: the epoch-0 folder was removed
    assert sorted(os.listdir(tmp_path)) == sorted([best, last]) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    for name in (best, last):
        assert ckpt.is_complete_distributed_checkpoint(tmp_path / name)
    meta = torch.load(tmp_path / last / ckpt.META_FILENAME, weights_only=True)
    assert meta["global_step"] == 4
    assert any("ModelCheckpoint" in key for key in meta["callbacks"])
