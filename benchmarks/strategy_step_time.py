"""Step time of ``moe_zero`` at ZeRO stage 0 against Lightning's ``ddp`` on the same MoE model (CPU, gloo).

Both strategies run inside the same forked ranks and process group (``tests.distributed.harness.run_ranks``),
alternating (DDP first in even repetitions, moe_zero first in odd ones) so that drift in the machine's load
hits both alike. Each run trains ``--steps`` steps; the step time of a run is the median over the steps after
``--warmup``, measured on rank 0 from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
gradient reduction, optimizer step). The reported figure is the median over repetitions of the per-repetition
ratio moe_zero / ddp. Goal: stage 0 no more than 5% slower than DDP. The CPU time of rank 0 during the
step is reported beside the wall time: on a loaded machine it is the steadier of the two.

Run from the repository root::

    python benchmarks/strategy_step_time.py               # 2 ranks, 5 repetitions
    python benchmarks/strategy_step_time.py --reps 9 --steps 30 --hidden 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric.plugins.environments import LightningEnvironment  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import tests.conftest  # noqa: E402,F401 - pre-imports heavy modules once, before forking the ranks
from lightning_moe.moe import MoE  # noqa: E402
from lightning_moe.strategy import MoEZeroStrategy  # noqa: E402
from tests.distributed.harness import run_ranks  # noqa: E402


class _Block(nn.Module):
    """Pre-norm MoE block: ``h + MoE(LN(h))``."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(args.hidden)
        self.moe = MoE(args.hidden, args.experts, args.ffn, k=2, drop_tokens=False, use_rts=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        out = self.moe(self.norm(h))
        return h + out.output, out.aux_loss


class _Net(LightningModule):
    """Next-token model: embedding -> ``layers`` MoE blocks -> head."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.hidden)
        self.blocks = nn.ModuleList([_Block(args) for _ in range(args.layers)])
        self.head = nn.Linear(args.hidden, args.vocab)
        g = torch.Generator().manual_seed(0)
        n = args.batch * (args.steps + 1) * args.world
        self.tokens = torch.randint(0, args.vocab, (n, args.seq), generator=g)  # [N, T]
        self.batch = args.batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        h = self.embed(tokens)  # [B, T, d]
        aux = h.new_zeros(())
        for block in self.blocks:
            h, block_aux = block(h)
            aux = aux + block_aux
        logits = self.head(h)  # [B, T, V]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + aux

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.tokens), batch_size=self.batch, shuffle=False)


class _StepTimer(Callback):
    """Wall time and this process's CPU time of every training step."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, *args: Any) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def _strategy(name: str) -> Any:
    env = LightningEnvironment()
    if name == "ddp":
        return DDPStrategy(cluster_environment=env)
    return MoEZeroStrategy(zero_stage=0, expert_parallel_size=1, cluster_environment=env)


def _one_run(name: str, world_size: int, args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    module = _Net(args)
    timer = _StepTimer()
    trainer = Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=_strategy(name),
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module)
    return statistics.median(timer.wall[args.warmup :]), statistics.median(timer.cpu[args.warmup :])


def _bench(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for rep in range(args.reps):
        order = ["ddp", "moe_zero"] if rep % 2 == 0 else ["moe_zero", "ddp"]
        row: dict[str, Any] = {"rep": rep, "first": order[0]}
        for name in order:
            row[name], row[name + "_cpu"] = _one_run(name, world_size, args)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (each runs both strategies)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")

    rows = run_ranks(_bench, args.world, args, timeout=3600)[0]
    ratios = [r["moe_zero"] / r["ddp"] for r in rows]
    cpu_ratios = [r["moe_zero_cpu"] / r["ddp_cpu"] for r in rows]
    print(
        f"moe_zero (stage 0, ep 1) vs ddp: {args.world} gloo ranks on CPU, torch {torch.__version__}, "
        f"d={args.hidden} ffn={args.ffn} E={args.experts} layers={args.layers} batch={args.batch}x{args.seq}/rank, "
        f"median step time (rank 0) over steps {args.warmup}..{args.steps - 1}"
    )
    print(f"{'rep':>3}  {'first':<8}  {'ddp ms':>8}  {'moe_zero ms':>11}  {'ratio':>6}  {'cpu-time ratio':>14}")
    for r, ratio, cpu_ratio in zip(rows, ratios, cpu_ratios):
        print(
            f"{r['rep']:>3}  {r['first']:<8}  {1e3 * r['ddp']:>8.2f}  {1e3 * r['moe_zero']:>11.2f}  {ratio:>6.3f}"
            f"  {cpu_ratio:>14.3f}"
        )
    median, cpu_median = statistics.median(ratios), statistics.median(cpu_ratios)
    verdict = "OK" if median <= 1.05 else "SLOWER than the 5% goal"
    print(f"median ratio moe_zero/ddp = {median:.3f} wall ({verdict}), {cpu_median:.3f} CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
