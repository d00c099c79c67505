"""Short-sequence attention on CPU: the mask applied by ``masked_fill`` (before) against an additive mask, alternating.

``lightning_moe.models.attention.attend`` runs short sequences on CPU as two batched products and a softmax. It
used to scale the queries and then ``masked_fill`` the ``[B, H, Tq, Tk]`` scores with a boolean mask broadcast over
the heads, which torch's CPU kernel does 3-6x slower than an add. It now turns the mask into a 0 / -inf tensor of
the mask's own (small) shape and adds it to the unscaled scores with the scale in one pass (``torch.add(bias,
scores, alpha=scale)``). The reference here is the former code, kept as :func:`attend_masked_fill`.

Both run forward and backward on the same queries, keys and values, laid out as the attention module hands them
on (``[B, T, H, hd]`` memory seen as ``[B, H, T, hd]``), in bf16 (or ``--dtype fp32``), with each of three masks:
padding (``[B, 1, 1, S]``: the encoder's self-attention and the cross-attention), causal and padding
(``[B, 1, T, T]``: the decoder's self-attention) and none (the scale alone). Every round times one step of each
right after an untimed one of its own, the order alternating; printed per mask: median and best step and the median
of the rounds' ratios before / now (above 1: now is faster).

    python benchmarks/attention_mask.py --threads 2 --rounds 60
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_moe.models.attention import attend, causal_keep_mask, key_padding_keep_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from running_order import time_in_rounds  # noqa: E402  (beside this file)
from train_throughput import step_summary, write_table_record  # noqa: E402

KINDS = ("padding", "causal", "none")


def attend_masked_fill(q: Tensor, k: Tensor, v: Tensor, keep_mask: Tensor | None = None) -> Tensor:
    """The short path of ``attend`` as it was: scaled queries, then ``masked_fill`` of the scores."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # [B, H, Tq, Tk]
    if keep_mask is not None:
        scores = scores.masked_fill(~keep_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [B, H, Tq, hd]


def _heads(batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype) -> Tensor:
    """``[B, H, T, hd]`` over ``[B, T, H, hd]`` memory, as ``MultiHeadAttention`` splits a projection."""
    return torch.randn(batch, length, heads, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()


def _inputs(kind: str, batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype):
    """Queries, keys, values and the keep mask (or None) of one kind (a quarter of each row is padding)."""
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[:, length - length // 4 :] = True
    q, k, v = (_heads(batch, length, heads, head_dim, dtype) for _ in range(3))
    if kind == "causal":
        return q, k, v, causal_keep_mask(length, length, q.device, 0, padding)  # [B, 1, T, T]
    if kind == "padding":
        return q, k, v, key_padding_keep_mask(padding)  # [B, 1, 1, S]
    return q, k, v, None


def _step(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, grad: Tensor) -> float:
    start = time.perf_counter()
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v, mask).backward(grad)
    return time.perf_counter() - start


def time_kind(kind: str, batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype, rounds: int):
    """Median and best step of both versions and the median ratio before / now for one kind of attention."""
    torch.manual_seed(0)
    q, k, v, mask = _inputs(kind, batch, length, heads, head_dim, dtype)
    grad = torch.randn(batch, heads, length, head_dim, dtype=dtype)
    versions = {"before": attend_masked_fill, "now": attend}
    steps = {name: functools.partial(_step, fn, q, k, v, mask, grad) for name, fn in versions.items()}
    for step in steps.values():
        step()
    step_s = time_in_rounds(steps, rounds)
    ratios = [before / now for before, now in zip(step_s["before"], step_s["now"])]
    return {
        "kind": kind,
        **step_summary(step_s),
        "before_over_now_median": statistics.median(ratios),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=64, help="tokens per sentence (queries and keys)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the result record to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch_size} T={args.length} "
        f"H={args.heads} hd={args.head_dim}, {args.dtype}, forward + backward, median of {args.rounds} rounds"
    )
    print(f"{'mask':>8} {'before ms':>10} {'now ms':>8} {'before best':>12} {'now best':>9} {'before/now':>10}")
    rows = []
    for kind in args.kinds:
        row = time_kind(kind, args.batch_size, args.length, args.heads, args.head_dim, dtype, args.rounds)
        rows.append(row)
        print(
            f"{kind:>8} {row['before step_ms_median']:10.2f} {row['now step_ms_median']:8.2f} "
            f"{row['before step_ms_best']:12.2f} {row['now step_ms_best']:9.2f} {row['before_over_now_median']:9.3f}x"
        )
    return write_table_record("attention_mask", args, rows)


if __name__ == "__main__":
    main()
