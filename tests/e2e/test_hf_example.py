"""``examples/hf_moe_finetune.py`` on 2 CPU processes (ep=2 + ZeRO-3) started by Lightning's launcher: it trains
a tiny random transformers MoE on a local text file and exports a folder ``from_pretrained`` loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", minversion="5")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]


def test_example_finetunes_with_ep2_zero3_and_exports(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    export = tmp_path / "hf"
    command = [
        sys.executable, str(ROOT / "examples" / "hf_moe_finetune.py"), "--text", str(text), "--devices", "2",
        "--max-steps", "4", "--arch", "qwen2_moe", "--checkpoint", str(tmp_path / "ckpt"), "--export", str(export),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.tensor([list(b"the quick brown fox")])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_example_names_a_missing_text_file(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "examples" / "hf_moe_finetune.py"), "--text", str(tmp_path / "none.txt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--text" in result.stderr and "none.txt" in result.stderr
