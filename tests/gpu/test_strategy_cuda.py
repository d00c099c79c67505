"""The MoE transformer trains a few steps under ``MoEZeroStrategy`` on one GPU in bf16-mixed: ZeRO stage 3
without offload, with parameter offload, with optimizer offload (``cuda:nccl,cpu:gloo`` process group),
and stage 0. The fused expert path is used inside the Trainer (autocast from fp32 activations)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_moe.models import MoETransformer, get_preset
from lightning_moe.parallel import CPUOffloadAdamW
from lightning_moe.strategy import MoEZeroStrategy
from tests.gpu.helpers import fused_grouped_mm_device
from tests.grouped_mm_calls import count_grouped_mm_calls
from tests.quiet_trainer import QUIET

pytestmark = pytest.mark.gpu

STEPS = 6


def synthetic_batch(
    vocab: int, batch: int = 16, src_len: int = 24, tgt_len: int = 20, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One fixed batch of random token ids (ids 5.. are ordinary tokens), some padding in source and target."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(5, vocab, (batch, src_len), generator=g)
    tgt = torch.randint(5, vocab, (batch, tgt_len + 1), generator=g)
    src_pad = torch.zeros(batch, src_len, dtype=torch.bool)
    src_pad[::3, src_len - 5 :] = True
    tgt_pad = torch.zeros(batch, tgt_len, dtype=torch.bool)
    tgt_pad[1::4, tgt_len - 4 :] = True
    return {
        "src": src,
        "src_padding_mask": src_pad,
        "tgt_in": tgt[:, :-1],
        "tgt_out": tgt[:, 1:],
        "tgt_padding_mask": tgt_pad,
    }


class _Repeat(Dataset):
    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


class SyntheticTranslation(LightningModule):
    """The encoder-decoder MoE transformer on one repeated synthetic batch (it must learn it quickly)."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.config = get_preset(
            "tiny",
            vocab_size=512,
            d_model=128,
            num_heads=4,
            ffn_hidden_size=256,
            encoder_layers=2,
            decoder_layers=2,
            dropout=0.0,
            max_positions=64,
            num_experts=8,
            k=2,
            moe_every=1,
        )
        self.model = MoETransformer(self.config)
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.model.loss(batch)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(synthetic_batch(self.config.vocab_size), STEPS), batch_size=None)


class _Losses(Callback):
    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.losses.append(float(outputs["loss"]))


@pytest.fixture
def isolated_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A fresh 1-rank process group per Trainer (torn down after), the environment restored, and a count of
    fused grouped-GEMM calls."""
    environ = dict(os.environ)
    yield count_grouped_mm_calls(monkeypatch)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)
    torch.cuda.empty_cache()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@pytest.mark.parametrize(
    ("zero_stage", "offload"),
    [(3, "none"), (3, "params"), (3, "optimizer"), (0, "none")],
    ids=["stage3", "stage3-offload-params", "stage3-offload-optimizer", "stage0"],
)
def test_moe_transformer_trains_on_one_gpu(zero_stage: int, offload: str, isolated_run: list[int]) -> None:
    torch.manual_seed(0)
    module = SyntheticTranslation()
    strategy = MoEZeroStrategy(zero_stage=zero_stage, offload=offload)
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=STEPS,
        **QUIET,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[_Losses()],
    )
    trainer.fit(module)

    assert trainer.global_step == STEPS
    losses = module.losses
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < losses[0], losses  # it learns the repeated batch
    expected_backend = "nccl" if offload == "none" else "cuda:nccl,cpu:gloo"
    assert strategy.process_group_backend == expected_backend
    if fused_grouped_mm_device():
        assert isolated_run, "the experts never took the fused torch._grouped_mm path inside the Trainer"

    optimizer = trainer.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    param_devices = {_local(p).device.type for p in params}
    state_devices = {
        _local(v).device.type
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    }
    if offload == "params":
        assert param_devices == {"cpu"} and state_devices == {"cpu"}
    elif offload == "optimizer":
        assert isinstance(optimizer, CPUOffloadAdamW)
        assert param_devices == {"cuda"} and state_devices == {"cpu"}
    else:
        assert param_devices == {"cuda"} and state_devices == {"cuda"}
