"""The MoE layer under bf16-mixed: its experts' weight casts in fresh memory against kept memory, alternating.

Under autocast the experts' fp32 ``[E, ...]`` weights are cast to bf16 every forward, and the cast's backward
makes the fp32 gradient that becomes the parameter's ``.grad``. A plain ``.to()`` takes both blocks fresh from
malloc at every step; glibc maps blocks over 32 MiB afresh (and gives them back when freed), so every step pays
their page faults. The layer takes them from its ``GradientMemory`` instead (``cast_in_kept_memory``).

Two copies of one ``MoE`` layer (same weights, input and output gradient) train side by side in one process
under bf16 autocast with fp32 parameters, gradients set to None between steps as Lightning does: "fresh casts"
gets the casts' blocks anew every step (the kernel's own bf16 gradients still come from kept memory), "kept
casts" is the layer as shipped. Every round times one step of each right after an untimed one of its own, the
order alternating; printed per shape: median and best step, and the median of the rounds' ratios fresh / kept
(above 1: kept memory is faster).

    python benchmarks/expert_weight_casts.py --threads 2 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_moe.moe import MoE
from lightning_moe.moe.kernels.gradient_memory import GradientMemory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from running_order import time_in_rounds  # noqa: E402  (beside this file)
from train_throughput import step_summary, write_table_record  # noqa: E402

SHAPES = ("512:2048:8:1", "512:2048:8:2", "512:2048:64:2", "256:1024:8:2")
"""``d:h:E:k`` timed by default: the layer benchmark's experts at E=8 and 64, and the translator's (small)."""


class FreshCastMemory(GradientMemory):
    """Kept memory for the kernel's own gradients only; the weight casts and their fp32 gradients are fresh
    blocks every step, which is what a plain ``.to()`` gives."""

    def empty(self, key: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key.endswith((".cast", ".grad")):
            return torch.empty(like.shape, dtype=like.dtype if dtype is None else dtype, device=like.device)
        return super().empty(key, like, dtype)


def _step(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x).output
    out.backward(grad)
    return time.perf_counter() - start


def time_shape(d: int, h: int, experts: int, k: int, tokens: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Median and best step of both variants and the median ratio fresh / kept for one layer shape."""
    torch.manual_seed(0)
    kept = MoE(d, experts, h, k=k, capacity_factor=1.25)
    fresh = copy.deepcopy(kept)
    fresh.experts.gradient_memory = FreshCastMemory()
    layers = {"fresh casts": fresh, "kept casts": kept}
    x, grad = torch.randn(tokens, d), torch.randn(tokens, d, dtype=torch.bfloat16)
    for _ in range(warmup):
        for layer in layers.values():
            _step(layer, x, grad)
    step_s = time_in_rounds({name: functools.partial(_step, layer, x, grad) for name, layer in layers.items()}, rounds)
    ratios = [fresh_s / kept_s for fresh_s, kept_s in zip(step_s["fresh casts"], step_s["kept casts"])]
    return {
        "shape": f"{d}:{h}:{experts}:{k}",
        **step_summary(step_s),
        "fresh_over_kept_median": statistics.median(ratios),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="D:H:E:K")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each layer first")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write the result record to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, T={args.tokens}, bf16 autocast, "
        f"fp32 parameters, median of {args.rounds} rounds"
    )
    print(f"{'d:h:E:k':>14} {'fresh ms':>9} {'kept ms':>9} {'fresh best':>10} {'kept best':>10} {'fresh/kept':>10}")
    rows = []
    for shape in args.shapes:
        d, h, experts, k = (int(part) for part in shape.split(":"))
        row = time_shape(d, h, experts, k, args.tokens, args.warmup, args.rounds)
        rows.append(row)
        print(
            f"{shape:>14} {row['fresh casts step_ms_median']:9.1f} {row['kept casts step_ms_median']:9.1f} "
            f"{row['fresh casts step_ms_best']:10.1f} {row['kept casts step_ms_best']:10.1f} "
            f"{row['fresh_over_kept_median']:9.3f}x"
        )
    return write_table_record("expert_weight_casts", args, rows)


if __name__ == "__main__":
    main()
