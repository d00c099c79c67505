"""The translator under ``strategy=moe_zero`` on 2 CPU processes started by Lightning's own launcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_moe.checkpoint import COMPLETE_MARKER
from tests.e2e.test_cli import TINY, _run, _steps

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_moe_zero_two_processes_train_checkpoint_translate_resume(tmp_path: Path):
    run_dir = tmp_path / "run"
    command = [
        "lightning_moe.train",
        *TINY,
        f"hydra.run.dir={run_dir}",
        "strategy=moe_zero_stage3",
        "trainer.devices=2",
        "strategy.expert_parallel_size=2",
        "test_after_fit=false",
    ]
    _run([*command, "trainer.max_steps=4"], tmp_path)
    ckpts = run_dir / "checkpoints"
    assert _steps(ckpts) == ["step-000004.ckpt"]
    folder = ckpts / "step-000004.ckpt"
    assert folder.is_dir() and (folder / COMPLETE_MARKER).exists()  # a sharded DCP folder

    # translating reads the sharded folder in one process (consolidated on the fly)
    out = _run(
        ["lightning_moe.translate", f"checkpoint={folder}", "source_lang=en", "target_lang=de"],
        tmp_path,
        stdin="A man rides a bike.\n",
    )
    assert len(out.stdout.splitlines()) == 1

    # the same command with more steps resumes from the folder on 2 processes
    resumed = _run([*command, "trainer.max_steps=8"], tmp_path)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert "step-000008.ckpt" in _steps(ckpts)
    meta = torch.load(ckpts / "step-000008.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 8
