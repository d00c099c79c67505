"""AdamW step time on FSDP2's DTensor shards against the same shards as plain tensors (CPU, gloo).

``MoEZeroStrategy`` switches AdamW groups of DTensor parameters that left ``foreach``/``fused`` to torch to
``fused=True`` (``lightning_moe.parallel.optim.use_whole_list_update``); this measures why. Per ZeRO layout, rank 0's
median ``optimizer.step()`` time for each implementation, on the DTensor parameters and on plain copies of
their local shards (same shapes, same gradients).

Run from the repository root::

    python benchmarks/dtensor_optimizer_step.py            # d=256, 2 ranks
    python benchmarks/dtensor_optimizer_step.py --d 512 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import tests.conftest  # noqa: E402,F401 - pre-imports heavy modules once, before forking the ranks
from lightning_moe.parallel import ParallelDims, expert_counts, parallelize  # noqa: E402
from tests.distributed.harness import run_ranks  # noqa: E402
from tests.distributed.tiny_moe import TinyMoEModel, make_batches  # noqa: E402

IMPLEMENTATIONS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
LAYOUTS = [(2, 1), (3, 2), (0, 2)]  # (zero stage, ep): DTensor parameters in every one


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _bench(rank: int, world_size: int, stage: int, ep: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    model = TinyMoEModel(vocab=512, d=args.d, num_experts=4, layers=2)
    dims = ParallelDims(world_size, ep, zero_stage=stage).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    ((tokens, targets),) = make_batches(1)
    model(tokens[rank::world_size], targets[rank::world_size]).backward()
    params = list(model.parameters())
    plain = [torch.nn.Parameter(_local(p).detach().clone()) for p in params]
    for p, q in zip(params, plain):
        q.grad = _local(p.grad).clone()
    out = {}
    for kind, tensors in (("DTensor", params), ("plain", plain)):
        for name, kwargs in IMPLEMENTATIONS.items():
            opt = torch.optim.AdamW(tensors, lr=1e-3, **kwargs)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            out[f"{kind} {name}"] = statistics.median(times[2:])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--d", type=int, default=256, help="model width (ffn 2d, vocab 512, 4 experts, 2+2 blocks)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per implementation (2 left out)")
    args = parser.parse_args(argv)
    print(f"AdamW step, rank 0 of {args.world} gloo ranks, torch {torch.__version__}, d={args.d}; ms (x plain fused)")
    for stage, ep in LAYOUTS:
        row = run_ranks(_bench, args.world, stage, ep, args, timeout=1200)[0]
        base = row["plain fused"]
        cells = "  ".join(f"{k}: {1e3 * v:.2f} ({v / base:.1f}x)" for k, v in row.items())
        print(f"stage {stage} ep {ep}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
