"""A plain LightningModule holding an unmodified transformers MoE model under ``MoEZeroStrategy``: the model
loaded with ``from_pretrained`` trains with its experts split over ``ep``, the checkpoint written at ep=2 loads
at ep=1, and it exports to a folder ``AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

pytest.importorskip("transformers", minversion="5")

from lightning_moe.checkpoint import consolidate  # noqa: E402
from lightning_moe.hf import export_pretrained  # noqa: E402
from lightning_moe.strategy import MoEZeroStrategy  # noqa: E402
from tests.distributed.harness import run_ranks  # noqa: E402
from tests.distributed.hf_tiny import NUM_EXPERTS, VOCAB, experts_of, tiny_model  # noqa: E402
from tests.distributed.test_strategy_models import full_state, make_trainer  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2


class HFCausalLM(L.LightningModule):
    """What a user writes: the HF model as an attribute, its own loss, an optimizer."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data() -> DataLoader:
    ids = torch.randint(0, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=2)


def _train(rank: int, world_size: int, folder: str, ckpt: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    module = HFCausalLM(folder)
    strategy = MoEZeroStrategy(expert_parallel_size=2, zero_stage=3)
    trainer = make_trainer(world_size, strategy, max_steps=3, gradient_clip_val=0.5)  # one norm over both meshes
    trainer.fit(module, train_dataloaders=_data())
    local_experts = [
        tuple(p.to_local().shape) for e in experts_of(module.model) for p in e.parameters() if isinstance(p, DTensor)
    ]
    trainer.save_checkpoint(ckpt)
    return {
        "losses": module.losses,
        "state": full_state(module),
        "local": local_experts,
        "ep": strategy.expert_parallel_size,
    }


def _load(rank: int, world_size: int, folder: str, ckpt: str) -> dict[str, Any]:
    torch.manual_seed(123)  # weights differ from the checkpoint's until it is loaded
    module = HFCausalLM(folder)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    strategy = MoEZeroStrategy(expert_parallel_size=1, zero_stage=2)
    trainer = make_trainer(world_size, strategy)
    trainer.validate(module, dataloaders=_data(), ckpt_path=ckpt, verbose=False)
    return {"state": full_state(module), "val_loss": float(trainer.callback_metrics["val_loss"])}


def test_hf_model_trains_with_expert_parallelism_and_checkpoints_reshard_and_export(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pretrained"
    tiny_model("mixtral").save_pretrained(folder)
    ckpt = tmp_path / "ep2.ckpt"
    trained = run_ranks(_train, WORLD, str(folder), str(ckpt), timeout=120)
    for res in trained:
        assert res["ep"] == 2
        assert res["local"] and all(shape[0] == NUM_EXPERTS // 2 for shape in res["local"])
        assert len(res["losses"]) == 3 and all(torch.isfinite(torch.tensor(res["losses"])))
    # the first step ran the pretrained weights: each rank's first loss is the HF model's on that rank's batch
    # (Lightning's DistributedSampler shuffles training data with seed 0)
    pretrained = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    rows = _data().dataset.tensors[0]
    for rank, res in enumerate(trained):
        order = list(DistributedSampler(range(len(rows)), num_replicas=WORLD, rank=rank, shuffle=True, seed=0))
        batch = rows[order[:2]]
        expected = pretrained(input_ids=batch, labels=batch).loss.item()
        assert res["losses"][0] == pytest.approx(expected, rel=1e-5)
    state = trained[0]["state"]
    initial = pretrained.state_dict()
    # the run started from the pretrained weights, and changed them
    assert state.keys() == {f"model.{k}" for k in initial}
    assert not torch.equal(
        state["model.model.layers.0.mlp.experts.gate_up_proj"], initial["model.layers.0.mlp.experts.gate_up_proj"]
    )

    loaded = run_ranks(_load, WORLD, str(folder), str(ckpt), timeout=120)
    for res in loaded:
        for name, value in state.items():
            torch.testing.assert_close(res["state"][name], value, rtol=0, atol=0, msg=name)

    exported = export_pretrained(ckpt, tmp_path / "exported", config=folder)
    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0, msg=name)
    # a consolidated single file exports the same weights
    consolidate(ckpt, tmp_path / "full.pt")
    from_file = AutoModelForCausalLM.from_pretrained(
        export_pretrained(tmp_path / "full.pt", tmp_path / "exported2", config=folder)
    )
    for name, value in from_file.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0, msg=name)
    # the exported model computes the validation loss the ep=1 run measured
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss for (b,) in _data()]
    assert float(torch.stack(losses).mean()) == pytest.approx(loaded[0]["val_loss"], rel=1e-4)
