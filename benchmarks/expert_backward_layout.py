"""The CPU loop path's expert backward by rows against by columns, side by side in one process.

For each shape (expert kind, experts, rows per expert, model width d, hidden width h) this builds the grouped
experts, runs one forward, then times the backward again and again (the graph kept), alternating the two ways
round of :mod:`lightning_moe.moe.kernels.product_layout` by forcing its rule: ``rows`` (weights repacked by
oneDNN for the input gradients) and ``cols`` (weights read in place, activations transposed). Median of the
rounds, and which way the rule picks for that shape. Both run at one setting of threads, every round on the
same memory (glibc keeps freed blocks, ``benchmarks/host_memory.py``), so only the way round differs.

    python benchmarks/expert_backward_layout.py --threads 2            # the README's table (bf16)
    python benchmarks/expert_backward_layout.py --shapes ffn:8:1024:256:1024   # the translator's experts
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from host_memory import retain_freed_host_memory  # noqa: E402  (benchmarks/host_memory.py, beside this file)

from lightning_moe.moe.experts import GroupedFFNExperts, GroupedGLUExperts  # noqa: E402
from lightning_moe.moe.kernels import product_layout  # noqa: E402
from lightning_moe.moe.kernels.product_layout import backward_by_columns  # noqa: E402

DEFAULT_SHAPES = [
    "ffn:64:64:512:2048",  # the layer benchmark's E=64, k=1
    "ffn:64:128:512:2048",  # E=64, k=2
    "ffn:8:512:512:2048",  # E=8, k=1 (the rule keeps rows)
    "ffn:8:1024:256:1024",  # the translator's experts (small weights: rows)
    "ffn:16:256:1024:2048",
    "glu:32:64:2048:1024",
    "glu:16:256:2048:1024",
    "glu:32:128:1024:2048",
]


def parse_shape(text: str) -> tuple[str, int, int, int, int]:
    """``kind:experts:rows:d:h`` -> its parts (kind ``ffn`` or ``glu``)."""
    kind, *numbers = text.split(":")
    if kind not in ("ffn", "glu") or len(numbers) != 4:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected kind:experts:rows:d:h, e.g. ffn:64:64:512:2048")
    experts, rows, d, h = (int(n) for n in numbers)
    return kind, experts, rows, d, h


def measure(kind: str, num_experts: int, rows: int, d: int, h: int, rounds: int) -> dict[str, float | str]:
    """Backward time by rows and by columns (median seconds), alternating within each round."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    if kind == "glu":
        experts = GroupedGLUExperts(num_experts, d, h)
    else:
        experts = GroupedFFNExperts(num_experts, d, h, activation="gelu", bias=False)
    experts = experts.to(dtype)
    x = torch.randn(num_experts * rows, d, dtype=dtype, requires_grad=True)
    grad = torch.randn(num_experts * rows, d, dtype=dtype)
    out = experts(x, torch.full((num_experts,), rows))
    rule = product_layout.backward_by_columns
    ways = {"rows": lambda *args: False, "cols": lambda *args: True}
    times: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for round_index in range(rounds + 1):  # round 0 warms up
            for way, forced in ways.items():
                product_layout.backward_by_columns = forced
                experts.zero_grad(set_to_none=True)
                x.grad = None
                start = time.perf_counter()
                out.backward(grad, retain_graph=True)
                if round_index:
                    times[way].append(time.perf_counter() - start)
    finally:
        product_layout.backward_by_columns = rule
    by_rows, by_columns = statistics.median(times["rows"]), statistics.median(times["cols"])
    picks = "cols" if backward_by_columns(rows, d, h, experts.w1) else "rows"
    return {
        "shape": f"{kind}:{num_experts}:{rows}:{d}:{h}",
        "rows_ms": by_rows * 1e3,
        "cols_ms": by_columns * 1e3,
        "rows_over_cols": by_rows / by_columns,
        "rule_picks": picks,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_host_memory()
    print(f"# torch {torch.__version__}, bf16, {args.threads} threads, backward only, median of {args.rounds} rounds")
    print(f"{'kind:E:rows:d:h':>22} {'rows ms':>9} {'cols ms':>9} {'rows/cols':>9} {'rule':>5}")
    results = []
    for shape in args.shapes:
        row = measure(*shape, rounds=args.rounds)
        results.append(row)
        print(
            f"{row['shape']:>22} {row['rows_ms']:>9.1f} {row['cols_ms']:>9.1f}"
            f" {row['rows_over_cols']:>9.2f} {row['rule_picks']:>5}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": results}, indent=1)
        )
    return results


if __name__ == "__main__":
    main()
