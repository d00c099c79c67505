"""Shared pieces of the strategy and checkpoint tests: a tiny MoE LightningModule, a Trainer factory for
ranks forked by ``run_ranks``, and an independent single-process reference loop. No tests here.

How the multi-rank Lightning tests run: ``run_ranks`` forks the ranks and initialises a gloo process group
in each; inside a rank a plain ``Trainer(strategy=MoEZeroStrategy(cluster_environment=LightningEnvironment()),
devices=world_size)`` finds ``LOCAL_RANK`` set (so no launcher starts processes) and the process group already
initialised (so the strategy reuses it). A 2-rank ``fit`` of a few steps costs about a second this way,
against ~15 s through Lightning's subprocess launcher.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_moe.moe import MoE
from lightning_moe.strategy import MoEZeroStrategy
from tests.quiet_trainer import QUIET

IN_FEATURES = 6
NUM_CLASSES = 3
SEQ_LEN = 3


class _Block(nn.Module):
    """``h + MoE(h)`` (dropless, deterministic routing: independent of how the batch is split)."""

    def __init__(self, hidden: int, num_experts: int, ffn: int, aux_loss_coef: float, z_loss_coef: float) -> None:
        super().__init__()
        self.moe = MoE(
            hidden,
            num_experts,
            ffn,
            k=2,
            drop_tokens=False,
            use_rts=False,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
        )

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        out = self.moe(h)
        return h + out.output, out.aux_loss


class TinyMoEModule(LightningModule):
    """Sequence classifier: linear in -> ``n_layers`` MoE blocks -> mean pool -> linear out.

    Records every micro-batch loss in ``self.losses`` and logs the rank (``rank_synced`` with
    ``sync_dist=True``, ``rank_local`` without) so tests can check the logging sync.
    """

    def __init__(
        self,
        num_experts: int = 4,
        hidden: int = 8,
        ffn: int = 16,
        n_layers: int = 2,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        lr: float = 0.05,
        batch_size: int = 2,
        n_samples: int = 32,
        data_seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.inp = nn.Linear(IN_FEATURES, hidden)
        self.blocks = nn.ModuleList(
            [_Block(hidden, num_experts, ffn, aux_loss_coef, z_loss_coef) for _ in range(n_layers)]
        )
        self.out = nn.Linear(hidden, NUM_CLASSES)
        self.losses: list[float] = []
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(data_seed)
        # explicit device: real data even when the module is built under `Trainer.init_module(empty_init=True)`
        self.x = torch.randn(n_samples, SEQ_LEN, IN_FEATURES, generator=g, device="cpu")  # [N, T, in]
        self.y = torch.randint(0, NUM_CLASSES, (n_samples,), generator=g, device="cpu")  # [N]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.inp(x)  # [B, T, hidden]
        aux = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h, block_aux = block(h)
            aux = aux + block_aux
        return self.out(h.mean(dim=1)), aux  # [B, classes], scalar

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits, aux = self(x)
        return F.cross_entropy(logits.float(), y) + aux

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(x, y)
        self.losses.append(float(loss.detach()))
        self.log("rank_synced", float(self.global_rank), sync_dist=True, on_step=True, on_epoch=False)
        self.log("rank_local", float(self.global_rank), sync_dist=False, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)

    def train_dataloader(self) -> DataLoader:
        # Lightning replaces the sampler by a shuffling DistributedSampler (seed PL_GLOBAL_SEED or 0)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)


def make_trainer(
    world_size: int,
    strategy: MoEZeroStrategy | None = None,
    *,
    max_steps: int = 3,
    default_root_dir: str | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """A quiet CPU Trainer for a rank forked by ``run_ranks`` (or for one process when world_size=1)."""
    if strategy is None:
        strategy = MoEZeroStrategy()
    if strategy.cluster_environment is None:
        strategy.cluster_environment = LightningEnvironment()
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=world_size,
        num_nodes=1,
        strategy=strategy,
        max_steps=max_steps,
        **QUIET,
        num_sanity_val_steps=0,
        default_root_dir=default_root_dir,
    )
    kwargs.update(trainer_kwargs)
    return Trainer(**kwargs)


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) parameters and buffers on every rank; collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_model_state_dict(module)
    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().clone().cpu()
    return out


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Tensor]]:
    """``{param name: {state name: full tensor}}`` on every rank; collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    state = get_optimizer_state_dict(module, optimizer)["state"]
    out: dict[str, dict[str, Tensor]] = {}
    for name, entries in state.items():
        out[name] = {}
        for k, v in entries.items():
            v = torch.as_tensor(v)
            if isinstance(v, DTensor):
                v = v.full_tensor()
            out[name][k] = v.detach().clone().cpu()
    return out


def reference_run(
    module: TinyMoEModule,
    world_size: int,
    steps: int,
    *,
    accumulate: int = 1,
    clip_val: float = 0.0,
    clip_algorithm: str = "norm",
) -> list[float]:
    """Single process, no Lightning: what ``steps`` optimizer steps on ``world_size`` ranks must do.

    Each micro-batch is the union of the per-rank batches that Lightning's ``DistributedSampler`` gives (it
    always shuffles training data, with seed ``PL_GLOBAL_SEED`` or 0, epoch 0 here); the loss is the mean over ranks of the per-rank losses (each rank's MoE aux loss comes from its own
    tokens), divided by ``accumulate`` like Lightning does. Returns the per-micro-batch mean loss over ranks.
    """
    n = module.x.shape[0]
    b = module.batch_size
    if n % world_size or steps * accumulate * b * world_size > n:
        raise ValueError("the reference covers one epoch of a dataset divisible by world_size")
    seed = int(os.getenv("PL_GLOBAL_SEED", 0))
    per_rank = [
        list(DistributedSampler(range(n), num_replicas=world_size, rank=r, shuffle=True, seed=seed))
        for r in range(world_size)
    ]
    optimizer = module.configure_optimizers()
    losses: list[float] = []
    for step in range(steps):
        for micro in range(accumulate):
            batch = step * accumulate + micro
            micro_losses = []
            for r in range(world_size):
                idx = per_rank[r][batch * b : (batch + 1) * b]
                loss = module.loss(module.x[idx], module.y[idx])
                (loss / (world_size * accumulate)).backward()
                micro_losses.append(float(loss.detach()))
            losses.append(sum(micro_losses) / world_size)
        if clip_val > 0:
            if clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip_val)
            else:
                torch.nn.utils.clip_grad_value_(module.parameters(), clip_val)
        optimizer.step()
        optimizer.zero_grad()
    return losses
