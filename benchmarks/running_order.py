"""The order in which a side-by-side benchmark runs its contenders in each round.

Used by ``moe_layer.py`` and ``train_throughput.py --side-by-side``. On a CPU the first step after another
contender pays for that one's freed memory and cold caches; with one fixed order the same contender would pay
it for the same predecessor in every round, and without untimed steps first (``--round-warmup``) every timed
step would include it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["running_order", "add_round_warmup_argument", "time_in_rounds"]

K = TypeVar("K")


def add_round_warmup_argument(parser: argparse.ArgumentParser) -> None:
    """``--round-warmup N`` (default 1): untimed steps of a contender right before each of its timed ones."""
    parser.add_argument(
        "--round-warmup",
        type=int,
        default=1,
        metavar="N",
        help="untimed steps of a contender right before each of its timed ones in a round (the first step after "
        "another contender refills the caches and the heap; 0 times it)",
    )


def running_order(names: list[str], turn: int) -> list[str]:
    """Round ``turn``'s running order of ``names``: a balanced Latin square (Williams design), so that over
    ``n`` rounds (``2n`` for an odd ``n``) every contender runs right after every other one equally often.

    A plain turning order would keep each contender behind the same one in every round.
    """
    n = len(names)
    if n == 0:
        return []
    base, low, high = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...: consecutive differences cover 1..n-1 once
    while len(base) < n:
        base.append(low)
        low += 1
        if len(base) < n:
            base.append(high)
            high -= 1
    order = [names[(b + turn) % n] for b in base]
    return order[::-1] if n % 2 and (turn // n) % 2 else order


def time_in_rounds(steps: Mapping[K, Callable[[], float]], rounds: int, untimed: int = 1) -> dict[K, list[float]]:
    """Each contender's timed steps over ``rounds`` rounds in :func:`running_order`: in every round each contender
    runs ``untimed`` steps and then one timed step; a step returns its own duration (seconds)."""
    names = list(steps)
    step_s: dict[K, list[float]] = {name: [] for name in names}
    for turn in range(rounds):
        for name in running_order(names, turn):
            for _ in range(untimed):
                steps[name]()
            step_s[name].append(steps[name]())
    return step_s
