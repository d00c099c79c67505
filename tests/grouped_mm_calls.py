"""Counting the fused grouped-GEMM calls (``torch._grouped_mm``) a test makes."""

from __future__ import annotations

import pytest
import torch


def count_grouped_mm_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``torch._grouped_mm`` for the test; the returned list grows by one entry per call."""
    calls: list[int] = []
    original = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls
