"""Named ``moe_zero`` strategies and the precisions they accept: the one table that both the Lightning
strategy registry (``strategy.py``) and the ``strategy`` group of the command line are built from.

Plain data only (no Lightning, no Hydra), so the configuration can import it cheaply.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning_moe.parallel.dims import OFFLOAD_CHOICES, ZERO_STAGES

__all__ = ["STRATEGY_PRESETS", "SUPPORTED_PRECISIONS", "ZERO_STAGES", "OFFLOAD_CHOICES", "check_strategy_arguments"]

STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    "moe_zero": {"zero_stage": 2, "expert_parallel_size": "auto"},
    "moe_zero_stage1": {"zero_stage": 1, "expert_parallel_size": "auto"},
    "moe_zero_stage2": {"zero_stage": 2, "expert_parallel_size": "auto"},
    "moe_zero_stage3": {"zero_stage": 3, "expert_parallel_size": "auto"},
    "moe_zero_offload": {"zero_stage": 3, "expert_parallel_size": "auto", "offload": "optimizer"},
}
"""Strategy names registered with Lightning (``Trainer(strategy="moe_zero_stage3")``) and offered as
``strategy=<name>`` on the command line, with the ``MoEZeroStrategy`` arguments each one passes."""

SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
"""Precisions ``MoEZeroStrategy`` and ``trainer.precision`` accept. ``16-mixed`` needs CUDA (fp16 autocast
+ gradient scaler)."""


def check_strategy_arguments(
    *, activation_checkpointing: Any, save_distributed_checkpoint: Any, process_group_backend: Any, timeout: Any
) -> None:
    """Check ``MoEZeroStrategy``'s own arguments (the parallel sizes are checked by ``ParallelDims``)."""
    for name, value in (
        ("activation_checkpointing", activation_checkpointing),
        ("save_distributed_checkpoint", save_distributed_checkpoint),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True or False")
    if process_group_backend is not None and (not isinstance(process_group_backend, str) or not process_group_backend):
        raise ValueError(
            f"process_group_backend={process_group_backend!r} is not valid; use None (automatic), 'gloo', 'nccl'"
            " or a per-device spec such as 'cuda:nccl,cpu:gloo'"
        )
    if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
        raise ValueError(f"timeout={timeout!r} must be a positive datetime.timedelta (or None for torch's default)")
