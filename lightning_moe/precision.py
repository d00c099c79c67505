"""Precision plugins of :class:`~lightning_moe.strategy.MoEZeroStrategy`: Lightning's, clipping across meshes.

Lightning clips through ``precision_plugin.clip_grad_by_norm`` / ``clip_grad_by_value``. Torch's versions
cannot take one norm over parameters on different device meshes (dense weights over ``dp``, experts over
``efsdp x ep``), so these plugins clip with :func:`lightning_moe.parallel.clip_grad_norm_` /
:func:`~lightning_moe.parallel.clip_grad_value_`; everything else (autocast, the gradient scaler, bf16
weights) is Lightning's own plugin.
"""

from __future__ import annotations

from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch.optim import Optimizer

from lightning_moe.parallel import clip_grad_norm_, clip_grad_value_
from lightning_moe.strategy_presets import SUPPORTED_PRECISIONS

__all__ = [
    "SUPPORTED_PRECISIONS",
    "MeshClipping",
    "MoEZeroPrecision",
    "MoEZeroMixedPrecision",
    "MoEZeroHalfPrecision",
    "moe_zero_precision",
]


class MeshClipping:
    """Gradient clipping over every parameter of the optimizer, whatever mesh it lives on."""

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        clip_grad_norm_(list(self.main_params(optimizer)), max_norm=float(clip_val))  # type: ignore[attr-defined]

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        clip_grad_value_(list(self.main_params(optimizer)), float(clip_val))  # type: ignore[attr-defined]


class MoEZeroPrecision(MeshClipping, Precision):
    """``"32-true"``."""


class MoEZeroMixedPrecision(MeshClipping, MixedPrecision):
    """``"bf16-mixed"`` or (CUDA) ``"16-mixed"``: autocast, and for fp16 the gradient scaler."""


class MoEZeroHalfPrecision(MeshClipping, HalfPrecision):
    """``"bf16-true"``: bf16 weights and inputs."""


def moe_zero_precision(plugin: Precision) -> Precision:
    """The plugin of this module for the settings of ``plugin`` (the one the Trainer built from its ``precision``
    argument, or the user's); one of ours is returned as it is.

    Raises:
        ValueError: a precision outside :data:`SUPPORTED_PRECISIONS`, another plugin type, or ``"16-mixed"``
            for a device other than CUDA.
    """
    if isinstance(plugin, MeshClipping):
        return plugin
    precision = getattr(plugin, "precision", None)
    if type(plugin) not in (Precision, MixedPrecision, HalfPrecision) or precision not in SUPPORTED_PRECISIONS:
        supported = ", ".join(repr(p) for p in SUPPORTED_PRECISIONS)
        raise ValueError(
            f"`MoEZeroStrategy` does not support precision={precision!r} ({type(plugin).__name__}). Choose one of"
            f" {supported} ('16-mixed' on CUDA only)."
        )
    if isinstance(plugin, MixedPrecision):
        if precision == "16-mixed" and plugin.device != "cuda":
            raise ValueError(
                f"precision='16-mixed' needs CUDA devices (fp16 autocast + gradient scaler), got"
                f" device={plugin.device!r}. On CPU use precision='bf16-mixed' or '32-true'."
            )
        return MoEZeroMixedPrecision(precision, plugin.device, plugin.scaler)  # type: ignore[arg-type]
    if isinstance(plugin, HalfPrecision):
        return MoEZeroHalfPrecision(precision)  # type: ignore[arg-type]
    return MoEZeroPrecision()
