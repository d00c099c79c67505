"""``trainer.precision=auto``: the one rule that picks a run's precision from the hardware.

* CUDA (``accelerator`` gpu / cuda, or auto with a GPU present): ``bf16-mixed``, what every GPU preset uses.
* CPU with bf16 matrix units (AMX tiles or AVX512-BF16): ``bf16-mixed``. oneDNN runs bf16 matrix products
  on them several times faster than fp32 (about 7x for a 4096x512x2048 product on the project's 2-core
  machine), and the bf16 training run reaches fp32's loss (tests/unit/test_bf16_training.py).
* Any other CPU: ``32-true``. Without those units oneDNN emulates bf16 products through fp32, which is
  slower than fp32 itself, and there is nothing to gain.

Detection reads the CPU's feature flags through torch (``torch.cpu._is_amx_tile_supported`` /
``_is_avx512_bf16_supported``, from cpuinfo) rather than timing a probe product: a flag is instant and
gives the same answer on a busy machine, where a timed probe would not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["AUTO_PRECISION", "cpu_bf16_matrix_units", "resolve_precision"]

AUTO_PRECISION = "auto"
"""The ``trainer.precision`` value that lets :func:`resolve_precision` choose."""


def _flag(name: str) -> bool:
    probe: Callable[[], bool] | None = getattr(torch.cpu, name, None)  # private torch API: absent means no
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def cpu_bf16_matrix_units() -> str | None:
    """The bf16 matrix units this CPU has (``"AMX"`` or ``"AVX512-BF16"``), or None."""
    if _flag("_is_amx_tile_supported"):
        return "AMX"
    if _flag("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return None


def resolve_precision(precision: str, accelerator: str) -> tuple[str, str]:
    """``(precision to train in, why)`` for ``trainer.precision`` and ``trainer.accelerator``.

    A precision other than ``auto`` is kept as given. ``why`` is one line for the log.
    """
    if precision != AUTO_PRECISION:
        return precision, f"trainer.precision={precision} (as configured)"
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed", "trainer.precision=auto -> bf16-mixed: training on GPU"
    units = cpu_bf16_matrix_units()
    if units is not None:
        return "bf16-mixed", f"trainer.precision=auto -> bf16-mixed: this CPU has bf16 matrix units ({units})"
    return "32-true", "trainer.precision=auto -> 32-true: this CPU has no bf16 matrix units (AMX, AVX512-BF16)"
