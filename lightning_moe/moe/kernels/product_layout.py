"""How the CPU loop path lays out an expert's bf16 products for oneDNN: which way round the backward runs (by rows
or by columns), and whether whole experts go to threads whatever their row counts.

oneDNN, which runs torch's bf16 products on CPU, repacks the second operand of every product into its
matrix-unit layout, and reads the first in place when it is row-major. In the rows-first backward an expert's
input gradient ``g @ w.t()`` makes its weight the second operand, repacked at every call: for a weight larger
than a core's L2 cache and a few hundred rows, the repacking costs as much as the product. Computed by columns,
``(w @ g.t())`` gives the transposed gradient with the weight read in place, and the weight gradient
``x_t @ g`` takes its first operand from a transposed copy of the rows; the copies of the expert's ``[n, h]``
and ``[n, d]`` activations this needs cost less than the repacking where :func:`backward_by_columns` says so
(README, issue 15: 1.2-1.6x faster backward at 64-256 rows and 1M-4M-element weights, 0.8-0.9x where the weight
fits in L2). fp32 products run in MKL without this repacking and gain nothing.

With a weight of 1 MiB or more, bf16 experts also run whole experts per thread at any row count
(:func:`whole_experts_per_thread`): the layer at E=8 with 512-1,024 rows per expert is 8-11% faster than with each
product split over the intra-op threads; with smaller weights (the translator's) it is 6-8% slower, in fp32 no
faster.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BY_COLUMNS_MIN_WEIGHT_BYTES",
    "WHOLE_EXPERTS_MIN_WEIGHT_BYTES",
    "backward_by_columns",
    "experts_by_columns",
    "whole_experts_per_thread",
    "columns_of",
]

BY_COLUMNS_MIN_WEIGHT_BYTES = 2 * 2**20
"""Smallest expert weight (bytes) whose backward runs by columns: below it the weight stays in a core's L2
cache (2 MiB on the Xeons measured) and repacking it is cheaper than transposing the activations."""


def backward_by_columns(rows: int, in_width: int, out_width: int, weight: Tensor) -> bool:
    """Whether an expert with ``rows`` rows and an ``[in_width, out_width]`` weight like ``weight`` runs its
    backward products by columns (bf16 on CPU, a weight of at least :data:`BY_COLUMNS_MIN_WEIGHT_BYTES`, and
    ``rows`` at most ``in_width * out_width / (in_width + out_width)``: the transposed copies grow with the rows
    times the widths, the repacking it saves with the weight)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return False
    weight_elements = in_width * out_width
    if weight_elements * weight.element_size() < BY_COLUMNS_MIN_WEIGHT_BYTES:
        return False
    return 0 < rows * (in_width + out_width) <= weight_elements


def experts_by_columns(bounds: list[int], in_width: int, out_width: int, weight: Tensor) -> list[bool]:
    """:func:`backward_by_columns` for every expert of the row offsets ``bounds`` (``[0, n_0, n_0+n_1, ..., N]``)."""
    return [backward_by_columns(hi - lo, in_width, out_width, weight) for lo, hi in zip(bounds, bounds[1:])]


WHOLE_EXPERTS_MIN_WEIGHT_BYTES = 2**20
"""Smallest expert weight (bytes) whose bf16 experts go to threads whole at any row count."""


def whole_experts_per_thread(in_width: int, out_width: int, weight: Tensor) -> bool:
    """Whether experts with ``[in_width, out_width]`` weights like ``weight`` run whole experts per thread
    whatever their row counts (bf16 on CPU, a weight of at least :data:`WHOLE_EXPERTS_MIN_WEIGHT_BYTES`); otherwise
    only experts with few rows do (``expert_threads.MAX_ROWS_PER_EXPERT``)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return False
    return in_width * out_width * weight.element_size() >= WHOLE_EXPERTS_MIN_WEIGHT_BYTES


def columns_of(buffer: Tensor, rows: int) -> Tensor:
    """The first ``rows * width`` elements of the contiguous ``[max_rows, width]`` ``buffer`` as a contiguous
    ``[width, rows]`` matrix: working memory for an expert's transposed activations."""
    width = buffer.shape[-1]
    return buffer.view(-1)[: rows * width].view(width, rows)
