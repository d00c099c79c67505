"""Issue-18 options from the command line: a dense run upcycled into a PR-MoE pyramid trained with ep=2 +
ZeRO-3 on 2 processes, with aux-loss-free balancing and the global balance loss; checkpointed and read back."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_moe.inference import read_checkpoint
from tests.e2e.test_cli import TINY, _run, _steps

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_dense_checkpoint_upcycled_into_a_pyramid_trains_with_ep2(tmp_path: Path):
    base = [a for a in TINY if not a.startswith("moe.num_experts")] + [
        "test_after_fit=false",
        "trainer.log_every_n_steps=1",
    ]
    dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
    _run(
        ["lightning_moe.train", *base, f"hydra.run.dir={dense_dir}", "moe=dense", "moe.k=1", "trainer.max_steps=4"],
        tmp_path,
    )
    dense_ckpt = dense_dir / "checkpoints" / "step-000004.ckpt"
    options = [
        "moe.num_experts=[2,4]",
        "moe.k=1",
        "moe.upcycle=true",
        "moe.drop_tokens=false",
        "moe.router_bias_update_rate=0.01",
        "moe.aux_loss_scope=global",
        "moe.score_func=sigmoid",
    ]
    _run(
        [
            "lightning_moe.train",
            *base,
            f"hydra.run.dir={moe_dir}",
            f"init_from={dense_ckpt}",
            *options,
            "strategy=moe_zero_stage3",
            "trainer.devices=2",
            "strategy.expert_parallel_size=2",
            "trainer.max_steps=3",
            "checkpoint.every_n_train_steps=3",
        ],
        tmp_path,
    )
    assert _steps(moe_dir / "checkpoints") == ["step-000003.ckpt"]
    ckpt = read_checkpoint(moe_dir / "checkpoints" / "step-000003.ckpt")  # the sharded folder, consolidated
    assert ckpt["hyper_parameters"]["model"]["moe"]["num_experts"] == [2, 4]
    state = ckpt["state_dict"]
    assert state["model.encoder_layers.1.ffn.experts.w1"].shape[0] == 2
    assert state["model.decoder_layers.1.ffn.experts.w1"].shape[0] == 4
    # The bias buffers were updated after the steps (rate x sign: multiples of 0.01) and checkpointed. The
    # zero router of an upcycled model ties every score, so the first step sends every token to one expert
    # and the bias moves (after an even number of steps a 2-expert bias can be back at zero: 3 steps here).
    biases = [state[f"model.{part}_layers.1.ffn.gate.expert_bias"] for part in ("encoder", "decoder")]
    assert any(bias.abs().sum() > 0 for bias in biases)
    for bias in biases:
        assert torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4)
    # The experts started as copies of the dense FFN: after 3 small steps they are still close to it.
    dense = read_checkpoint(dense_ckpt)["state_dict"]["model.encoder_layers.1.ffn.fc1.weight"]
    expert0 = state["model.encoder_layers.1.ffn.experts.w1"][0].t()
    assert (expert0 - dense).norm() < 0.5 * dense.norm()
    # Router metrics reach the logger, per layer.
    rows = list(csv.DictReader(open(next((moe_dir / "logs").rglob("metrics.csv")))))
    keys = set(rows[0])
    for metric in ("balance_loss", "z_loss", "dropped_fraction", "max_over_mean_load", "router_entropy"):
        assert f"moe/{metric}" in keys and f"moe/encoder.1/{metric}" in keys


def test_upcycle_without_init_from_fails_in_one_line(tmp_path: Path):
    bad = _run(["lightning_moe.train", "moe.upcycle=true", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path, check=False)
    assert bad.returncode != 0 and "moe.upcycle=true needs init_from" in bad.stderr
