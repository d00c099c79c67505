"""The chunked cross entropy's chunk size: forward and backward of the training loss at several sizes, alternating.

``lightning_moe.models.cross_entropy`` walks the ``[N, V]`` logits in chunks of rows, converting each to fp32 and
doing all of its work while the chunk is in cache. Every operation on a chunk is split over the intra-op threads,
so the size that stays in cache grows with the threads; the module sets it per thread
(``CHUNK_ELEMENTS_PER_THREAD``). This sweep sets that constant to each ``--sizes`` value in turn (the chunk is then
that many elements times the thread count) and times the loss as training runs it (bf16 logits, label smoothing,
the gradient in the logits' own memory), each size once per round in a balanced order (``running_order.py``); printed per
size: median and best time and the median of the rounds' ratios against the module's own setting (above 1: faster
than it).

    python benchmarks/loss_chunks.py --threads 2 --rounds 20
    python benchmarks/loss_chunks.py --threads 1 --rounds 20
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_moe.models import cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_memory import retain_freed_host_memory  # noqa: E402  (beside this file)
from running_order import time_in_rounds  # noqa: E402
from train_throughput import write_table_record  # noqa: E402

SHIPPED = cross_entropy.CHUNK_ELEMENTS_PER_THREAD


@contextlib.contextmanager
def _chunk_size(per_thread: int) -> Iterator[None]:
    """The module's ``CHUNK_ELEMENTS_PER_THREAD`` set to ``per_thread`` inside the block, the shipped value after."""
    cross_entropy.CHUNK_ELEMENTS_PER_THREAD = per_thread
    try:
        yield
    finally:
        cross_entropy.CHUNK_ELEMENTS_PER_THREAD = SHIPPED


def _loss_step(logits: torch.Tensor, targets: torch.Tensor, smoothing: float, per_thread: int) -> float:
    """Seconds for forward and backward of the loss with ``per_thread`` logits per chunk and thread."""
    with _chunk_size(per_thread):
        fresh = logits.clone().requires_grad_()  # its memory becomes the gradient's (overwrite_logits)
        start = time.perf_counter()
        _, smoothed = cross_entropy.token_cross_entropy(fresh, targets, smoothing, overwrite_logits=True)
        smoothed.sum().backward()
        return time.perf_counter() - start


def _rows_per_chunk(per_thread: int, vocab: int) -> int:
    """Rows per chunk with ``per_thread`` logits per chunk and thread (as the module computes them)."""
    with _chunk_size(per_thread):
        return cross_entropy._chunk_rows(vocab)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="rows of logits (target tokens of a batch)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the result record to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_host_memory()  # the same fresh [N, V] block every step, as in training: no page faults in it
    sizes = list(dict.fromkeys([*args.sizes, SHIPPED]))
    torch.manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab, dtype=torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    for size in sizes:
        _loss_step(logits, targets, args.label_smoothing, size)
    steps = {size: functools.partial(_loss_step, logits, targets, args.label_smoothing, size) for size in sizes}
    step_s = time_in_rounds(steps, args.rounds, untimed=0)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, logits {args.tokens}x{args.vocab} bf16, "
        f"forward + backward, median of {args.rounds} rounds; shipped: {SHIPPED} per thread"
    )
    print(f"{'per thread':>10} {'rows':>5} {'median ms':>10} {'best ms':>8} {'vs shipped':>10}")
    rows = []
    for size in sizes:
        ratio = statistics.median(shipped / s for shipped, s in zip(step_s[SHIPPED], step_s[size]))
        row = {
            "per_thread": size,
            "rows": _rows_per_chunk(size, args.vocab),
            "ms_median": statistics.median(step_s[size]) * 1e3,
            "ms_best": min(step_s[size]) * 1e3,
            "shipped_over_this_median": ratio,
        }
        rows.append(row)
        print(f"{size:>10} {row['rows']:>5} {row['ms_median']:10.2f} {row['ms_best']:8.2f} {ratio:9.3f}x")
    return write_table_record("loss_chunks", args, rows)


if __name__ == "__main__":
    main()
