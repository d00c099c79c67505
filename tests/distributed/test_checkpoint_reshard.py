"""A checkpoint saved on one layout loads on others: parameters and optimizer state, exactly.

Saved once on 4 gloo ranks (expert_parallel_size=2, ZeRO stage 3), loaded through ``Trainer.fit(ckpt_path=...)``
on 2 ranks with ep=1, on 1 rank, at stage 1, and into the CPU-offloaded optimizer; the DCP folder is also
consolidated into one ``weights_only`` file. The full-file option is saved on 2 ranks and loaded on 1.
Experts are compared by name over their global ``[E, ...]`` shape, so an expert that moved to another
index would fail the comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_moe import checkpoint as ckpt
from lightning_moe.strategy import MoEZeroStrategy
from tests.distributed.harness import run_ranks
from tests.distributed.test_strategy_models import TinyMoEModule, full_optimizer_state, full_state, make_trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODULE = dict(n_samples=16, aux_loss_coef=0.05, z_loss_coef=0.01)  # 4 ranks x batch 2 -> 2 steps per epoch


def _train_and_save(rank: int, world_size: int, strategy_kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    torch.manual_seed(0)
    module = TinyMoEModule(**MODULE)
    trainer = make_trainer(world_size, MoEZeroStrategy(**strategy_kwargs), max_steps=2)
    trainer.fit(module)
    trainer.save_checkpoint(path)
    return {
        "state": full_state(module),
        "optim": full_optimizer_state(module, trainer.optimizers[0]),
        "global_step": trainer.global_step,
    }


def _load(rank: int, world_size: int, strategy_kwargs: dict[str, Any], path: str, global_step: int) -> dict[str, Any]:
    torch.manual_seed(1)  # other initial weights than the saved run
    module = TinyMoEModule(**MODULE)
    trainer = make_trainer(world_size, MoEZeroStrategy(**strategy_kwargs), max_steps=global_step)
    trainer.fit(module, ckpt_path=path)  # restores, then stops: max_steps already reached
    return {
        "state": full_state(module),
        "optim": full_optimizer_state(module, trainer.optimizers[0]),
        "global_step": trainer.global_step,
        "losses": module.losses,
        "optimizer": type(trainer.optimizers[0]).__name__,
    }


def _assert_equal_states(saved: dict[str, Any], loaded: dict[str, Any]) -> None:
    assert loaded["state"].keys() == saved["state"].keys()
    for name, value in saved["state"].items():
        assert loaded["state"][name].shape == value.shape, name
        torch.testing.assert_close(loaded["state"][name], value, rtol=0, atol=0, msg=name)
    assert loaded["optim"].keys() == saved["optim"].keys() and saved["optim"]
    for name, entries in saved["optim"].items():
        assert loaded["optim"][name].keys() == entries.keys(), name
        for key, value in entries.items():
            torch.testing.assert_close(
                loaded["optim"][name][key].float(), value.float(), rtol=0, atol=0, msg=f"{name}.{key}"
            )


@pytest.fixture(scope="module")
def saved_4_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path_factory.mktemp("reshard") / "ep2-stage3.ckpt")
    results = run_ranks(_train_and_save, 4, dict(zero_stage=3, expert_parallel_size=2), path, timeout=180)
    assert results[0]["global_step"] == 2
    assert ckpt.is_complete_distributed_checkpoint(path)
    return path, results[0]


@pytest.mark.parametrize(
    ("world_size", "strategy_kwargs"),
    [
        (2, dict(zero_stage=3, expert_parallel_size=1)),
        (1, dict(zero_stage=3, expert_parallel_size=1)),
        (2, dict(zero_stage=1, expert_parallel_size=2)),
        (2, dict(zero_stage=2, expert_parallel_size=2, offload="optimizer")),
    ],
    ids=["2ranks-ep1-stage3", "1rank", "2ranks-ep2-stage1", "2ranks-offload-optimizer"],
)
def test_distributed_checkpoint_loads_on_another_layout(
    saved_4_ranks: tuple[str, dict[str, Any]], world_size: int, strategy_kwargs: dict[str, Any]
) -> None:
    path, saved = saved_4_ranks
    results = run_ranks(_load, world_size, strategy_kwargs, path, saved["global_step"], timeout=120)
    for loaded in results:
        assert loaded["global_step"] == saved["global_step"]
        assert loaded["losses"] == []  # nothing trained after the restore
        _assert_equal_states(saved, loaded)
    if strategy_kwargs.get("offload") == "optimizer":
        assert results[0]["optimizer"] == "CPUOffloadAdamW"


def test_consolidated_folder_equals_the_gathered_state(
    saved_4_ranks: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path, saved = saved_4_ranks
    out = tmp_path / "consolidated.pt"
    assert ckpt.consolidate_main(["consolidate", path, str(out)]) == 0
    loaded = torch.load(out, weights_only=True)
    assert loaded["global_step"] == saved["global_step"]
    state = loaded["state_dict"]
    assert state.keys() == saved["state"].keys()
    for name, value in saved["state"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    expert_w1 = [k for k in state if k.endswith("experts.w1")]
    assert expert_w1 and all(state[k].shape[0] == TinyMoEModule(**MODULE).hparams.num_experts for k in expert_w1)
    optim = loaded["optimizer_states"][0]["state"]
    for name, entries in saved["optim"].items():
        for key, value in entries.items():
            torch.testing.assert_close(torch.as_tensor(optim[name][key]).float(), value.float(), rtol=0, atol=0)


def test_full_file_loads_on_another_layout(tmp_path: Path) -> None:
    path = str(tmp_path / "full.ckpt")
    saved = run_ranks(
        _train_and_save,
        2,
        dict(zero_stage=3, expert_parallel_size=2, save_distributed_checkpoint=False),
        path,
        timeout=120,
    )[0]
    assert Path(path).is_file()
    on_disk = torch.load(path, weights_only=True)
    for name, value in saved["state"].items():
        torch.testing.assert_close(on_disk["state_dict"][name], value, rtol=0, atol=0, msg=name)
    loaded = run_ranks(_load, 1, dict(zero_stage=2, expert_parallel_size=1), path, saved["global_step"], timeout=120)[0]
    assert loaded["global_step"] == saved["global_step"]
    _assert_equal_states(saved, loaded)
