"""The CUDA test subset (marker ``gpu``), run by ``benchmarks/gpu_check.sh`` on a machine with a GPU.

Every test here is skipped when CUDA is not available, so ``pytest`` on a CPU-only machine (CI) reports
them as skipped rather than failing. Run them with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``gpu`` and skip it without CUDA."""
    skip = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
