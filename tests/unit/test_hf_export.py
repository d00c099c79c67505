"""``lightning_moe.hf``: export a checkpoint to a ``from_pretrained`` folder; its errors name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", minversion="5")

from lightning_moe.hf import export_main, export_pretrained  # noqa: E402
from tests.distributed.hf_tiny import tiny_model  # noqa: E402


def _checkpoint_file(tmp_path: Path, prefix: str = "model.") -> tuple[Path, Path, dict[str, torch.Tensor]]:
    model = tiny_model("olmoe", seed=3)
    folder = tmp_path / "config_only"
    model.config.save_pretrained(folder)
    state = {f"{prefix}{k}": v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    return path, folder, state


def test_export_writes_a_folder_from_pretrained_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path, folder, state = _checkpoint_file(tmp_path, prefix="net.model.")
    out = export_pretrained(path, tmp_path / "out", config=folder / "config.json", prefix="net.model.")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "OlmoeForCausalLM"
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[f"net.model.{name}"], rtol=0, atol=0, msg=name)


def test_export_names_a_wrong_prefix(tmp_path: Path) -> None:
    path, folder, _ = _checkpoint_file(tmp_path)
    with pytest.raises(ValueError, match="prefix='module.'"):
        export_pretrained(path, tmp_path / "out", config=folder, prefix="module.")


def test_export_command_line_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.ckpt"
    assert export_main([str(missing), str(tmp_path / "out"), "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.ckpt" in err and err.startswith("error:")
    path, _, _ = _checkpoint_file(tmp_path)
    assert export_main([str(path), str(tmp_path / "out"), "--config", str(tmp_path / "none")]) == 2
    assert "config=" in capsys.readouterr().err
