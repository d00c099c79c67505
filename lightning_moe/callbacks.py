"""Callbacks that work with any LightningModule containing :class:`lightning_moe.MoE` layers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_moe.moe import MoE

__all__ = [
    "ExpertLoadMonitor",
    "RouterBiasUpdate",
    "ROUTER_METRICS",
    "NonFiniteGuard",
    "RNGStateCheckpoint",
    "RunConfigCheckpoint",
    "NonFiniteLossError",
    "find_moe_layers",
    "expert_load_heatmap",
]

log = logging.getLogger(__name__)


def find_moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, layer)`` of every MoE layer in ``module``, in registration order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]


def expert_load_heatmap(load: Tensor, layer_names: list[str], path: Path | None = None):
    """A matplotlib figure of the expert load fractions ``load [layers, experts]`` (rows sum to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = load.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * experts + 2.5), max(2.5, 0.35 * layers + 1.5)))
    image = ax.imshow(load.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(layers), [_short(n) for n in layer_names], fontsize=7)
    ax.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=7)
    ax.set_title(f"fraction of tokens per expert (uniform = {1 / experts:.3f})", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _short(name: str) -> str:
    return name.replace("model.", "").replace("_layers", "").replace(".ffn", "")


ROUTER_METRICS = ("balance_loss", "z_loss", "dropped_fraction", "max_over_mean_load", "router_entropy")
"""The router metrics :class:`ExpertLoadMonitor` logs per MoE layer (``moe/<layer>/<metric>``) and as means over
layers (``moe/<metric>``)."""


class ExpertLoadMonitor(pl.Callback):
    """Logs, per MoE layer, the router metrics of :data:`ROUTER_METRICS` and an expert-load heatmap.

    At each logging step, the last training batch's statistics of every layer are summed over all ranks in
    one reduction, so the logged values describe the whole global batch, not rank 0's share: the
    unweighted balance loss, z-loss and router entropy are means over ranks; the dropped fraction is the
    dropped assignments of every rank over their routed assignments; ``max_over_mean_load`` is the busiest
    expert's kept tokens over the mean, with the loads of every rank added (1 = perfectly even).
    Every training batch also adds each layer's ``last_stats.tokens_per_expert`` to a running ``[L, E]``
    table; at the end of every validation the table is summed over ranks, logged as an expert-load heatmap
    (TensorBoard image, or ``expert_load_step<N>.png`` in the log folder for other loggers), and reset.
    Layers with different expert counts (PR-MoE) each get their own row width.

    Arguments:
        heatmap: draw the heatmap at validation end.
    """

    def __init__(self, heatmap: bool = True) -> None:
        self.heatmap = heatmap
        self._load: Tensor | None = None
        self.last_load: Tensor | None = None  # [L, E] fractions of the last heatmap
        self.layer_names: list[str] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        layers = find_moe_layers(pl_module)
        stats = [(name, layer.last_stats) for name, layer in layers if layer.last_stats is not None]
        if not stats:
            return
        width = max(s.tokens_per_expert.numel() for _, s in stats)
        if self._load is None or self._load.shape != (len(stats), width):
            # Kept on the device of the counts: no host synchronisation per step.
            self._load = torch.zeros(
                len(stats), width, dtype=torch.float64, device=stats[0][1].tokens_per_expert.device
            )
            self.layer_names = [name for name, _ in stats]
        for row, (_, s) in enumerate(stats):
            counts = s.tokens_per_expert.detach()
            self._load[row, : counts.numel()] += counts.to(self._load.device, torch.float64)
        if (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0:
            metrics = router_metrics(
                [s for _, s in stats], trainer.strategy.reduce if trainer.world_size > 1 else None, trainer.world_size
            )
            for column, metric in enumerate(ROUTER_METRICS):
                pl_module.log(f"moe/{metric}", metrics[:, column].mean(), on_step=True, on_epoch=False)
                for (name, _), value in zip(stats, metrics[:, column]):
                    pl_module.log(f"moe/{_short(name)}/{metric}", value, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._load is None or trainer.sanity_checking:
            return
        load = self._load.to(pl_module.device if pl_module.device.type != "meta" else "cpu")
        if trainer.world_size > 1:
            load = trainer.strategy.reduce(load.float(), reduce_op="sum").double()
        load = load.cpu()
        fractions = load / load.sum(dim=1, keepdim=True).clamp_min(1.0)  # [L, E]
        self.last_load = fractions
        balance = fractions.max(dim=1).values.mean() * fractions.shape[1]
        pl_module.log("moe/max_load_over_uniform", float(balance), rank_zero_only=True)
        if self.heatmap and trainer.is_global_zero:
            self._draw(trainer, fractions)
        self._load = None

    def _draw(self, trainer: pl.Trainer, fractions: Tensor) -> None:
        logger = trainer.logger
        folder = (
            Path(logger.log_dir)
            if logger is not None and getattr(logger, "log_dir", None)
            else Path(trainer.default_root_dir)
        )
        path = folder / f"expert_load_step{trainer.global_step}.png"
        fig = expert_load_heatmap(fractions, self.layer_names, path)
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure("moe/expert_load", fig, global_step=trainer.global_step)
        import matplotlib.pyplot as plt

        plt.close(fig)


def router_metrics(stats: list[Any], reduce_sum: Any = None, world_size: int = 1) -> Tensor:
    """``[L, len(ROUTER_METRICS)]`` fp64 CPU table of the router metrics of ``stats`` (one ``MoEStats`` per
    layer), over every rank when ``reduce_sum(tensor, reduce_op="sum")`` is given (one reduction, which every
    rank must join)."""
    width = max(s.tokens_per_expert.numel() for s in stats)
    device = stats[0].tokens_per_expert.device
    # Per layer: balance, z, entropy, dropped assignments, routed assignments, then the kept load per expert.
    rows = []
    for s in stats:
        kept = s.tokens_per_expert.to(torch.float64)
        head = torch.stack(
            [
                s.balance_loss.to(device, torch.float64),
                s.z_loss.to(device, torch.float64),
                s.router_entropy.to(device, torch.float64),
                torch.as_tensor(s.num_assignments, dtype=torch.float64, device=device) - kept.sum(),
                torch.as_tensor(s.num_assignments, dtype=torch.float64, device=device),
            ]
        )
        load = torch.full((width,), float("nan"), dtype=torch.float64, device=device)  # NaN: no such expert
        load[: kept.numel()] = kept
        rows.append(torch.cat([head, load]))
    table = torch.stack(rows)  # [L, 5 + width]
    if reduce_sum is not None:
        # NaN marks the same missing experts on every rank and survives the sum; a plain sum keeps fp64.
        table = reduce_sum(table, reduce_op="sum")
    table = table.cpu()
    means = table[:, :3] / world_size
    dropped = table[:, 3] / table[:, 4].clamp_min(1.0)
    load = table[:, 5:]
    present = ~torch.isnan(load)
    mean_load = torch.where(present, load, 0.0).sum(1) / present.sum(1)
    max_load = torch.where(present, load, float("-inf")).max(1).values
    max_over_mean = torch.where(mean_load > 0, max_load / mean_load.clamp_min(1e-12), torch.ones_like(mean_load))
    # Columns in ROUTER_METRICS order.
    return torch.stack([means[:, 0], means[:, 1], dropped, max_over_mean, means[:, 2]], dim=1)


class RouterBiasUpdate(pl.Callback):
    """Aux-loss-free balancing in a Lightning run: after every optimizer step, each MoE layer with
    ``router_bias_update_rate > 0`` moves its router bias with the expert loads of all ranks since the last
    step (:func:`lightning_moe.parallel.update_router_biases`). Does nothing for models without such layers.
    With gradient accumulation the loads of every micro-batch of the step count."""

    def __init__(self) -> None:
        self._last_step: int | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        from lightning_moe.parallel.balancing import update_router_biases

        # global_step counts optimizer steps: it moves only when this batch ended an accumulation window.
        if self._last_step is not None and trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        update_router_biases(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step


class RNGStateCheckpoint(pl.Callback):
    """Saves every rank's random-number generator states in checkpoints and restores them on resume.

    Dropout, Random Token Selection and noisy gating draw from torch's generators; with their states
    restored, a resumed run continues with the same random numbers as an uninterrupted one. Every rank
    contributes its states (one all-gather while the checkpoint is assembled, which every rank does)
    and, on resume with the same number of ranks, takes its own back; with another number of ranks
    the generators are left as seeded.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    @staticmethod
    def _local_states() -> dict[str, Any]:
        states: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()
        return states

    def state_dict(self) -> dict[str, Any]:
        import torch.distributed as dist

        local = self._local_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            return {"ranks": gathered}
        return {"ranks": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    @staticmethod
    def _set_local_states(states: dict[str, Any]) -> None:
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation inside training gives the generators back as it found them: a checkpoint saved right before
        # a validation (a preemption at that step) then resumes with the numbers an uninterrupted run draws next.
        self._before_validation = self._local_states()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._before_validation is not None:
            self._set_local_states(self._before_validation)
            self._before_validation = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restored here, after everything that draws random numbers while setting up has run.
        if self._pending is None:
            return
        ranks = self._pending.get("ranks", [])
        if len(ranks) == trainer.world_size:
            self._set_local_states(ranks[trainer.global_rank])
        else:
            log.warning(
                "checkpoint holds RNG states of %d ranks, this run has %d: keeping the seeded generators",
                len(ranks),
                trainer.world_size,
            )
        self._pending = None


class NonFiniteLossError(RuntimeError):
    """Training stopped because of non-finite losses or gradients (see :class:`NonFiniteGuard`)."""


class NonFiniteGuard(pl.Callback):
    """Never applies an optimizer step whose gradients are not all finite.

    Before each optimizer step every rank checks its (local shard of the) gradients; the ranks agree
    with one all-reduce, so all skip or none does. A skipped step clears the gradients, so the
    optimizer leaves every parameter and its state untouched (AdamW skips parameters without a
    gradient). Policies: ``"skip"`` warns and goes on; ``"stop_after"`` raises after ``max_skips``
    skipped steps; ``"stop"`` raises at the first one.

    Arguments:
        policy: ``"skip"``, ``"stop_after"`` or ``"stop"``.
        max_skips: the K of ``"stop_after"``.
    """

    POLICIES = ("skip", "stop_after", "stop")

    def __init__(self, policy: str = "skip", max_skips: int = 10) -> None:
        if policy not in self.POLICIES:
            raise ValueError(f"policy={policy!r} is not supported; use one of {list(self.POLICIES)}")
        if max_skips < 1:
            raise ValueError(f"max_skips={max_skips!r} must be >= 1")
        self.policy = policy
        self.max_skips = max_skips
        self.skipped = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = pl_module.device if pl_module.device.type != "meta" else torch.device("cpu")
        # One flag for all gradients: a single host synchronisation per step, not one per parameter.
        flag = torch.zeros((), device=device)
        if grads:
            flag = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float().to(device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if float(flag) == 0.0:
            return
        self.skipped += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        message = (
            f"non-finite loss or gradient at step {trainer.global_step}: optimizer step skipped ({self.skipped} so far)"
        )
        if self.policy == "stop" or (self.policy == "stop_after" and self.skipped >= self.max_skips):
            raise NonFiniteLossError(message + f"; stopping (trainer.nonfinite={self.policy!r})")
        log.warning(message)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class RunConfigCheckpoint(pl.Callback):
    """Stores the run's resolved configuration in every checkpoint (key ``run_config``, plain types), so
    that a re-run can tell whether it continues the same run (:mod:`lightning_moe.config.resume`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from lightning_moe.config.resume import RUN_CONFIG_KEY

        checkpoint[RUN_CONFIG_KEY] = self.config
