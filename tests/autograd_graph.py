"""What an output's autograd graph is made of (tests of which nodes an op builds)."""

from __future__ import annotations

from torch import Tensor


def graph_node_names(out: Tensor) -> list[str]:
    """Names of the autograd nodes behind ``out``, each node once (parameters' ``AccumulateGrad`` left out)."""
    names, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names
