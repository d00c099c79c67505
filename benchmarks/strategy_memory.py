"""Per-rank bytes of parameters, gradients and AdamW state under each ZeRO stage, against the ideal.

For 1, 2 and 4 forked gloo ranks (CPU) x ZeRO stages 0-3 x offload, a model with a realistic split
between dense weights (embedding, attention-sized projections, dense FFNs, head) and experts is
parallelized with :func:`lightning_moe.parallel.parallelize` (``expert_parallel_size="auto"``) and
trained for one accumulation micro-batch plus one last micro-batch and an optimizer step. Measured on
rank 0 (``_local_tensor`` bytes of DTensors, see :mod:`lightning_moe.parallel.memory`):

* ``params``: parameters at rest (between steps); ``in-step``: parameters held between forward and
  backward (stages 1-2 keep every unit unsharded; stage 3 only the root's own weights);
* ``grads``: gradients held during gradient accumulation (stages 0-1 accumulate full gradients,
  stages 2-3 reduce-scatter every micro-batch);
* ``optim``: AdamW state (two fp32 moments + step; with ``offload=optimizer`` also the fp32 CPU
  master copies);
* ``device``: what stays on the accelerator: offloaded state (``optimizer``) or parameters, gradients
  and state (``params``) live in host memory. On a CPU-only machine the split is by construction.

``ideal`` is the single-process total (fp32 parameters + gradients + two moments = 16 bytes per
parameter) divided by the number of ranks; ``ratio = (params + grads + optim on device) / ideal``.
Goal: stage 3 (no offload) within 10% of ideal.

Run from the repository root::

    python benchmarks/strategy_memory.py                 # 1/2/4 ranks, d=256, 6 layers
    python benchmarks/strategy_memory.py --ranks 2 4 --hidden 128
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import tests.conftest  # noqa: E402,F401 - pre-imports heavy modules once, before forking the ranks
from lightning_moe.moe import MoE  # noqa: E402
from lightning_moe.parallel import (  # noqa: E402
    ParallelDims,
    expert_counts,
    no_gradient_sync,
    offload_optimizer,
    parallelize,
)
from lightning_moe.parallel.memory import (  # noqa: E402
    gradient_bytes,
    local_bytes,
    optimizer_parameters,
    optimizer_state_bytes,
    parameter_bytes,
)
from tests.distributed.harness import run_ranks  # noqa: E402

CONFIGS: list[tuple[int, str]] = [
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (3, "none"),
    (1, "optimizer"),
    (3, "optimizer"),
    (3, "params"),
]
MiB = 2**20


class Block(nn.Module):
    """Pre-norm block: an attention-sized mixing projection (4 d^2 weights) then a dense FFN or an MoE."""

    def __init__(self, d: int, ffn: int, num_experts: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        if num_experts:
            self.moe: nn.Module = MoE(d, num_experts, ffn, k=2, drop_tokens=False)
        else:
            self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # [B, T, d] each
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        if hasattr(self, "moe"):
            out = self.moe(self.norm2(x))
            return x + out.output, out.aux_loss
        return x + self.ffn(self.norm2(x)), x.new_zeros(())


class Model(nn.Module):
    """Embedding -> blocks (every other one MoE) -> head; returns the loss."""

    def __init__(self, vocab: int, d: int, ffn: int, layers: int, num_experts: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, ffn, num_experts if i % 2 else 0) for i in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)  # [B, T, d]
        aux = x.new_zeros(())
        for block in self.blocks:
            x, block_aux = block(x)
            aux = aux + block_aux
        logits = self.head(self.norm(x))  # [B, T, vocab]
        return F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, dims=1).flatten()) + aux


def _measure(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for stage, offload in CONFIGS:
        torch.manual_seed(0)
        model = Model(args.vocab, args.hidden, args.ffn, args.layers, args.experts)
        num_params = sum(p.numel() for p in model.parameters())
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        dims = ParallelDims(world_size, "auto", zero_stage=stage, offload=offload).resolve(expert_counts(model))
        parallelize(model, dims.build_mesh("cpu"), dims)
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        if offload == "optimizer":
            opt = offload_optimizer(opt)
        resting = optimizer_parameters(opt)
        resting_ids = {id(p) for p in resting}
        tokens = torch.randint(0, args.vocab, (2, args.seq), generator=torch.Generator().manual_seed(rank))

        with no_gradient_sync(model):  # an accumulation micro-batch
            loss = model(tokens)
            in_step = parameter_bytes(resting) + local_bytes(p for p in model.parameters() if id(p) not in resting_ids)
            loss.backward()
        grads = gradient_bytes(resting) + local_bytes(p.grad for p in model.parameters() if id(p) not in resting_ids)
        model(tokens).backward()  # the last micro-batch
        opt.step()
        row = {
            "ranks": world_size,
            "stage": stage,
            "offload": offload,
            "ep": dims.ep,
            "num_params": num_params,
            "expert_share": expert_params / num_params,
            "params": parameter_bytes(resting),
            "in_step": in_step,
            "grads": grads,
            "optim": optimizer_state_bytes(opt),
        }
        row["device"] = (
            row["params"] + row["grads"] + (0 if offload == "optimizer" else row["optim"]) if offload != "params" else 0
        )
        rows.append(row)
        del model, opt
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args()

    header = (
        f"{'ranks':>5} {'stage':>5} {'offload':>9} {'ep':>3} {'params':>8} {'in-step':>8} {'grads':>8} "
        f"{'optim':>8} {'device':>8} {'ideal':>8} {'ratio':>6}"
    )
    first = True
    for world_size in args.ranks:
        rows = run_ranks(_measure, world_size, args, timeout=900)[0]
        if first:
            r = rows[0]
            print(
                f"model: {r['num_params'] / 1e6:.2f} M parameters, {100 * r['expert_share']:.0f}% in experts; "
                "MiB per rank (rank 0); ideal = 16 B/parameter / ranks"
            )
            print(header)
            first = False
        for r in rows:
            ideal = 16 * r["num_params"] / world_size
            device_total = r["params"] + r["grads"] + r["optim"]
            ratio = device_total / ideal if r["offload"] == "none" else r["device"] / ideal
            print(
                f"{r['ranks']:>5} {r['stage']:>5} {r['offload']:>9} {r['ep']:>3} {r['params'] / MiB:>8.2f} "
                f"{r['in_step'] / MiB:>8.2f} {r['grads'] / MiB:>8.2f} {r['optim'] / MiB:>8.2f} "
                f"{r['device'] / MiB:>8.2f} {ideal / MiB:>8.2f} {ratio:>6.3f}"
            )


if __name__ == "__main__":
    main()
