"""Expert activations and their derivatives (for the hand-written backward of the CPU loop path)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "ACTIVATION_BACKWARD", "ACTIVATION_OUT", "ACTIVATION_BACKWARD_OUT"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
"""Activation of the experts (and of dense FFNs), by name."""

ACTIVATION_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gelu": lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre),
    "gelu_tanh": lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre, approximate="tanh"),
    "relu": lambda grad, pre: torch.ops.aten.threshold_backward(grad, pre, 0),
    "silu": lambda grad, pre: torch.ops.aten.silu_backward(grad, pre),
}
"""``grad * d act(pre) / d pre``, for each key of :data:`ACTIVATIONS`."""

ACTIVATION_OUT: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gelu": lambda pre, out: torch.ops.aten.gelu.out(pre, approximate="none", out=out),
    "gelu_tanh": lambda pre, out: torch.ops.aten.gelu.out(pre, approximate="tanh", out=out),
    "relu": lambda pre, out: torch.clamp_min(pre, 0, out=out),
    "silu": lambda pre, out: torch.ops.aten.silu.out(pre, out=out),
}
"""``act(pre)`` written into ``out`` (same shape), for each key of :data:`ACTIVATIONS`."""

ACTIVATION_BACKWARD_OUT: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "gelu": lambda grad, pre, out: torch.ops.aten.gelu_backward.grad_input(
        grad, pre, approximate="none", grad_input=out
    ),
    "gelu_tanh": lambda grad, pre, out: torch.ops.aten.gelu_backward.grad_input(
        grad, pre, approximate="tanh", grad_input=out
    ),
    "relu": lambda grad, pre, out: torch.ops.aten.threshold_backward.grad_input(grad, pre, 0, grad_input=out),
    "silu": lambda grad, pre, out: torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=out),
}
""":data:`ACTIVATION_BACKWARD` written into ``out``."""
