"""Checkpoint averaging (``python -m lightning_moe.checkpoint average``): the mean of the weights against a
per-tensor reference, the newest checkpoint's metadata, the folder selection, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.checkpoint import atomic_save, average_checkpoints, checkpoints_to_average
from lightning_moe.checkpoint.average import average_main
from lightning_moe.inference import load_translator
from tests.tiny_translator import write_step_checkpoint


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints"
    for seed, step in enumerate((100, 200, 300)):
        write_step_checkpoint(folder, step, seed)
    return folder


def test_average_is_the_mean_of_every_weight_with_the_newest_metadata(run_folder: Path, tmp_path: Path):
    inputs = [run_folder / "step-000100.ckpt", run_folder / "step-000300.ckpt", run_folder / "step-000200.ckpt"]
    out = tmp_path / "avg.ckpt"
    average_checkpoints(inputs, out)
    states = [torch.load(p, weights_only=True)["state_dict"] for p in inputs]
    averaged = torch.load(out, weights_only=True)
    assert averaged["global_step"] == 300
    assert averaged["averaged_from"] == [str(run_folder / f"step-000{s}00.ckpt") for s in (3, 2, 1)]
    assert not {"optimizer_states", "loops", "lr_schedulers"} & set(averaged)
    for key, value in averaged["state_dict"].items():
        if value.is_floating_point():
            expected = (states[0][key] + states[1][key] + states[2][key]) / 3
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-7, msg=key)
            assert value.dtype == states[0][key].dtype
    differs = [k for k, v in states[0].items() if v.is_floating_point() and not torch.equal(v, states[1][k])]
    assert differs, "the seeds should give different weights, or the test shows nothing"
    # the averaged file is a model evaluate/translate read, with its manifest
    module = load_translator(out)
    torch.testing.assert_close(module.state_dict()[differs[0]], averaged["state_dict"][differs[0]])
    assert (tmp_path / "avg.ckpt.manifest.json").exists()


def test_integer_buffers_come_from_the_newest_checkpoint(tmp_path: Path):
    paths = []
    for step in (1, 2):
        state = {"w": torch.full((2,), float(step)), "count": torch.tensor(step * 10)}
        paths.append(tmp_path / f"step-{step:06d}.ckpt")
        atomic_save({"state_dict": state, "global_step": step}, paths[-1])
    averaged = average_checkpoints(paths, tmp_path / "avg.ckpt")["state_dict"]
    assert torch.equal(averaged["w"], torch.full((2,), 1.5))
    assert int(averaged["count"]) == 20


def test_a_checkpoints_folder_gives_its_newest(run_folder: Path):
    assert checkpoints_to_average([run_folder], last=2) == [
        run_folder / "step-000300.ckpt",
        run_folder / "step-000200.ckpt",
    ]
    assert len(checkpoints_to_average([run_folder])) == 3
    with pytest.raises(ValueError, match="fewer than --last 4"):
        checkpoints_to_average([run_folder], last=4)
    with pytest.raises(ValueError, match="at least 2"):
        checkpoints_to_average([run_folder / "step-000100.ckpt"])


def test_checkpoints_of_different_models_are_refused(run_folder: Path, tmp_path: Path):
    other = torch.load(run_folder / "step-000100.ckpt", weights_only=True)
    first_key = next(iter(other["state_dict"]))
    other["state_dict"][first_key] = torch.zeros(3)
    atomic_save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=f"{first_key}: .* has shape \\(3,\\)"):
        average_checkpoints([run_folder / "step-000200.ckpt", tmp_path / "other.ckpt"], tmp_path / "avg.ckpt")
    del other["state_dict"][first_key]
    atomic_save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="other weights"):
        average_checkpoints([run_folder / "step-000200.ckpt", tmp_path / "other.ckpt"], tmp_path / "avg.ckpt")
    assert not (tmp_path / "avg.ckpt").exists()


def test_command_line_errors_are_one_line_and_lose_nothing(run_folder: Path, tmp_path: Path, capsys):
    newest = run_folder / "step-000300.ckpt"
    before = newest.read_bytes()
    assert average_main([str(run_folder), "--last", "2", "-o", str(newest)]) == 1  # output = an input
    assert average_main([str(tmp_path / "missing.ckpt"), str(newest), "-o", str(tmp_path / "a.ckpt")]) == 1
    damaged = tmp_path / "damaged" / "step-000400.ckpt"
    damaged.parent.mkdir()
    (run_folder / "step-000100.ckpt.manifest.json").rename(damaged.with_name(damaged.name + ".manifest.json"))
    damaged.write_bytes((run_folder / "step-000100.ckpt").read_bytes()[:1000])  # truncated
    assert average_main([str(damaged), str(newest), "-o", str(tmp_path / "a.ckpt")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "is one of the inputs" in errors[0] and "does not exist" in errors[1]
    assert newest.read_bytes() == before and not (tmp_path / "a.ckpt").exists()


def test_module_command_writes_the_average(run_folder: Path, tmp_path: Path):
    out = tmp_path / "avg.ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_moe.checkpoint", "average", str(run_folder), "--last", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mean of 2 checkpoints" in done.stdout
    assert torch.load(out, weights_only=True)["global_step"] == 300


def test_the_test_after_training_scores_the_mean_of_the_last_checkpoints(run_folder: Path, tmp_path: Path, caplog):
    from lightning_moe.config.schema import TrainConfig
    from lightning_moe.train import _averaged

    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    final = run_folder / "step-000300.ckpt"
    assert _averaged(cfg, final) == final  # average_last=1: the final checkpoint alone
    cfg.checkpoint.average_last = 2
    tested = _averaged(cfg, final)
    assert tested == tmp_path / "run" / "average-last2.ckpt"
    reference = average_checkpoints([final, run_folder / "step-000200.ckpt"], tmp_path / "reference.ckpt")
    state = torch.load(tested, weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in reference["state_dict"].items())
    lonely = tmp_path / "lonely"
    only = write_step_checkpoint(lonely, 100, 0)
    assert _averaged(cfg, only) == only and "testing it alone" in caplog.text


def test_average_last_cannot_exceed_the_kept_checkpoints():
    from lightning_moe.config.run import CheckpointConfig

    with pytest.raises(ValueError, match="checkpoint.average_last=4 exceeds checkpoint.keep_last=3"):
        CheckpointConfig(average_last=4)
    with pytest.raises(ValueError, match="checkpoint.average_last"):
        CheckpointConfig(average_last=0)
