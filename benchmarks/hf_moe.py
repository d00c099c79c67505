"""A transformers MoE model (Mixtral) under expert parallelism + ZeRO-3 against plain ZeRO-3 and against the
``lightning_moe.MoE`` path: bytes per rank and step time.

All layouts run in the same forked gloo ranks (CPU, ``tests.distributed.harness.run_ranks``) on the same
random ``MixtralForCausalLM`` (fp32), parallelized with :func:`lightning_moe.parallel.parallelize`:

* ``plain``: ``expert_parallel_size=1``, ``zero_stage=3``: the experts are ZeRO-sharded like any weight, so
  each MoE layer all-gathers *all* its experts on every rank and runs every expert there;
* ``ep``: ``expert_parallel_size=ranks``, ``zero_stage=3``: each rank holds ``E/ep`` experts and runs them on
  the tokens sent to it (two all-to-alls per layer);
* ``moe``: the same, with every decoder layer's MoE block swapped for :class:`lightning_moe.moe.MoE` of the same
  shape (SwiGLU experts, top-2, dropless, no aux loss): this project's own MoE layer in the same model.

Bytes on rank 0 (local shards of DTensors, :mod:`lightning_moe.parallel.memory`):

* ``params``: parameters at rest; ``grads``: sharded gradients after backward; ``optim``: AdamW state;
* ``experts-gathered``: expert weights held while one MoE layer runs (its unit all-gathered);
* ``in-step peak``: parameters held at the largest point of forward: at rest + the gathered ones (root, one
  decoder layer and its experts).

Step time: forward + backward + AdamW step, median of ``--steps`` after ``--warmup``, rank 0.

Run from the repository root::

    python benchmarks/hf_moe.py                    # 2 ranks, d=256, 8 experts, 4 layers
    python benchmarks/hf_moe.py --ranks 4 --experts 16
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

import tests.conftest  # noqa: E402,F401 - pre-imports heavy modules once, before forking the ranks
from lightning_moe.moe import MoE  # noqa: E402
from lightning_moe.parallel import ParallelDims, parallelize  # noqa: E402
from lightning_moe.parallel.discovery import expert_modules  # noqa: E402
from lightning_moe.parallel.memory import (  # noqa: E402
    gradient_bytes,
    local_bytes,
    optimizer_parameters,
    optimizer_state_bytes,
    parameter_bytes,
)
from tests.distributed.harness import run_ranks  # noqa: E402

MiB = 2**20


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


class _OwnMoEBlock(torch.nn.Module):
    """``lightning_moe.moe.MoE`` in the place of a transformers MoE block: ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.moe = MoE(args.hidden, args.experts, args.ffn, k=2, expert="glu", drop_tokens=False, aux_loss_coef=0.0,
                       z_loss_coef=0.0)  # fmt: skip

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden).output


def _expert_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for _, e in expert_modules(model) for p in e.parameters()]


def _measure(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    rows = []
    for name, ep in (("plain", 1), ("ep", world_size), ("moe", world_size)):
        model = _model(args)
        if name == "moe":
            torch.manual_seed(0)
            for layer in model.model.layers:
                layer.mlp = _OwnMoEBlock(args)
        num_params = sum(p.numel() for p in model.parameters())
        expert_params = sum(p.numel() for p in _expert_params(model))
        dims = ParallelDims(world_size, ep, zero_stage=3)
        parallelize(model, dims.build_mesh("cpu"), dims)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        resting = optimizer_parameters(opt)
        resting_ids = {id(p) for p in resting}
        gathered: list[tuple[int, int]] = []  # (experts unsharded bytes, all unsharded bytes) per MoE layer call

        def pre_hook(module: torch.nn.Module, _inputs: Any) -> None:
            # runs after FSDP's own pre-forward hook (registered first): the unit is unsharded now
            experts = local_bytes(module.parameters())
            unsharded = local_bytes(p for p in model.parameters() if id(p) not in resting_ids)
            gathered.append((experts, unsharded))

        handles = [e.register_forward_pre_hook(pre_hook) for _, e in expert_modules(model)]
        g = torch.Generator().manual_seed(rank)
        times = []
        for step in range(args.warmup + args.steps):
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                grads = gradient_bytes(resting)
            opt.step()
            opt.zero_grad()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            if step == 0:
                for h in handles:
                    h.remove()
        params = parameter_bytes(resting)
        rows.append(
            {
                "layout": name,
                "ep": ep,
                "num_params": num_params,
                "expert_share": expert_params / num_params,
                "params": params,
                "grads": grads,
                "optim": optimizer_state_bytes(opt),
                "experts_gathered": max(e for e, _ in gathered),
                "peak": params + max(u for _, u in gathered),
                "step_s": statistics.median(times),
            }
        )

    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    rows = run_ranks(_measure, args.ranks, args, timeout=3600)[0]
    r = rows[0]
    print(
        f"MixtralForCausalLM: {r['num_params'] / 1e6:.2f} M parameters, {100 * r['expert_share']:.0f}% in experts"
        f" (moe: {rows[-1]['num_params'] / 1e6:.2f} M); "
        f"{args.ranks} ranks, ZeRO-3, fp32; bytes on rank 0; tokens/rank/step = {args.batch * args.seq}"
    )
    print(
        f"{'layout':>6} {'ep':>3} {'params':>12} {'grads':>12} {'optim':>12} {'experts-gathered':>16} "
        f"{'in-step peak':>12} {'step ms':>8}"
    )
    for r in rows:
        print(
            f"{r['layout']:>6} {r['ep']:>3} {r['params']:>12} {r['grads']:>12} {r['optim']:>12} "
            f"{r['experts_gathered']:>16} {r['peak']:>12} {1000 * r['step_s']:>8.1f}"
        )
    print("(bytes; MiB: " + ", ".join(f"{r['layout']} peak {r['peak'] / MiB:.2f}" for r in rows) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
