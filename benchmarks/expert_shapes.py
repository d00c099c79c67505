"""The six matrix products of one expert (forward and backward) at fixed, changing and rounded row counts.

Routing gives every expert a new row count at every step. On CPU, oneDNN builds a kernel for each product shape
and keeps the last ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (1,024 by default) of them, so many different counts make
it build kernels again and again. This benchmark runs the same products over a stream of row counts in three
ways, interleaved in rounds (median and best round, time per 1,024 real rows):

* ``fixed``: every expert gets ``--rows`` rows (one shape per product: the kernels are always cached);
* ``changing``: counts drawn uniformly from ``--rows-min .. --rows-max`` (what routing does);
* ``rounded``: the same counts rounded up as the loop path does on CPU
  (:func:`lightning_moe.moe.kernels.loop_experts.rounded_rows`), the padding rows computed too.

Example (the README's figures, bf16, 2 threads)::

    python benchmarks/expert_shapes.py --threads 2
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=8192 python benchmarks/expert_shapes.py --threads 2   # a larger cache
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_moe.moe.kernels.loop_experts import rounded_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def expert_products(width: int, hidden: int, most_rows: int, dtype: torch.dtype) -> Callable[[int], None]:
    """The six products of an FFN expert with ``n`` rows: forward (two), backward (four)."""
    x = torch.randn(most_rows, width, dtype=dtype)  # input rows
    h = torch.randn(most_rows, hidden, dtype=dtype)  # activations / their gradient
    g = torch.randn(most_rows, width, dtype=dtype)  # output gradient
    w1 = torch.randn(width, hidden, dtype=dtype)
    w2 = torch.randn(hidden, width, dtype=dtype)

    def run(n: int) -> None:
        x[:n] @ w1  # [n, h]
        h[:n] @ w2  # [n, d]
        h[:n].t() @ g[:n]  # grad w2 [h, d]: n is the contraction
        g[:n] @ w2.t()  # grad of the activations [n, h]
        x[:n].t() @ h[:n]  # grad w1 [d, h]
        h[:n] @ w1.t()  # grad x [n, d]

    return run


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--width", type=int, default=256, help="model width d (the translator's small preset)")
    parser.add_argument("--hidden", type=int, default=1024, help="expert inner width h")
    parser.add_argument("--rows", type=int, default=1024, help="rows per expert, fixed variant")
    parser.add_argument("--rows-min", type=int, default=900)
    parser.add_argument("--rows-max", type=int, default=1200)
    parser.add_argument("--experts", type=int, default=200, help="expert calls per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    most_rows = rounded_rows(args.rows_max)
    run = expert_products(args.width, args.hidden, max(most_rows, args.rows), DTYPES[args.dtype])

    def timed(counts: list[int], real_rows: int) -> float:
        start = time.perf_counter()
        for n in counts:
            run(n)
        return (time.perf_counter() - start) / real_rows * 1024 * 1e3  # ms per 1,024 real rows

    times: dict[str, list[float]] = {"fixed": [], "changing": [], "rounded": []}
    timed([args.rows] * 20, 20 * args.rows)  # the fixed shape's kernels built before any timing
    for _ in range(args.rounds):
        counts = [rng.randint(args.rows_min, args.rows_max) for _ in range(args.experts)]
        for name in sorted(times, key=lambda _: rng.random()):  # a new order every round
            if name == "fixed":
                times[name].append(timed([args.rows] * args.experts, args.rows * args.experts))
            elif name == "changing":
                times[name].append(timed(counts, sum(counts)))
            else:
                times[name].append(timed([rounded_rows(n) for n in counts], sum(counts)))
    cache = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default (1024)")
    print(
        f"# torch {torch.__version__}, {args.dtype}, {torch.get_num_threads()} threads, d={args.width} h={args.hidden}, "
        f"{args.rounds} rounds of {args.experts} experts; ONEDNN_PRIMITIVE_CACHE_CAPACITY={cache}"
    )
    fixed = statistics.median(times["fixed"])
    result = {}
    for name, values in times.items():
        median, best = statistics.median(values), min(values)
        result[name] = {"ms_per_1024_rows_median": median, "ms_per_1024_rows_best": best}
        print(f"{name:<9} {median:7.3f} ms per 1,024 rows (best {best:.3f})   {median / fixed:.2f}x fixed")
    return result


if __name__ == "__main__":
    main()
