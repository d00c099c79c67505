"""End to end through Lightning's own subprocess launcher: ``Trainer(strategy="moe_zero", devices=2)`` in a
script, as a user runs it. The strategy creates the gloo process group itself and the child process that the
launcher starts re-imports ``lightning_moe`` (registration). Slow (~15 s): the other tests fork the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.distributed.test_strategy_models import TinyMoEModule, reference_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import lightning_moe  # registers "moe_zero"
    from lightning.pytorch import Trainer
    from tests.distributed.test_strategy_models import TinyMoEModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = TinyMoEModule(n_samples=16, aux_loss_coef=0.05)
    trainer = Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy="moe_zero_stage3", max_steps=2,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module)
    strategy = trainer.strategy
    out = {"rank": trainer.global_rank, "world": trainer.world_size, "losses": module.losses,
           "strategy": type(strategy).__name__, "stage": strategy.zero_stage, "ep": strategy.expert_parallel_size,
           "backend": strategy.process_group_backend}
    with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)
    """
)


def test_stock_launcher_runs_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env["PYTHONPATH"] = f"{repo}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, r in enumerate(results):
        assert (r["rank"], r["world"], r["strategy"], r["stage"], r["ep"], r["backend"]) == (
            rank,
            2,
            "MoEZeroStrategy",
            3,
            2,
            "gloo",
        )
    torch.manual_seed(0)
    ref = reference_run(TinyMoEModule(n_samples=16, aux_loss_coef=0.05), 2, 2)
    mean = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref), rtol=1e-4, atol=1e-5)
