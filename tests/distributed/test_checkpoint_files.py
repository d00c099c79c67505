"""``lightning_moe.checkpoint`` in one process (no process group): layout, atomicity, errors, consolidation.

The multi-rank save/resume/reshard paths are in ``test_checkpoint_resume.py`` / ``test_checkpoint_reshard.py``.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import nn

from lightning_moe import checkpoint as ckpt
from lightning_moe.checkpoint.state import to_plain
from lightning_moe.moe import MoE


class _Net(nn.Module):
    def __init__(self, hidden: int = 8, num_experts: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(5, hidden)
        self.moe = MoE(hidden, num_experts, 16, k=1, drop_tokens=False, use_rts=False)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        out = self.moe(h)
        return self.out(h + out.output).sum() + out.aux_loss


def _trained(seed: int = 0, hidden: int = 8, steps: int = 2) -> tuple[_Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = _Net(hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    for _ in range(steps):
        net(torch.randn(6, 5)).backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def _checkpoint(net: nn.Module, opt: torch.optim.Optimizer, *, full: bool, step: int = 7) -> dict[str, Any]:
    return {
        "state_dict": ckpt.model_state_dict(net, full=full),
        "optimizer_states": [ckpt.optimizer_state_dict(net, opt, full=full)],
        "global_step": step,
        "epoch": 1,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 2}}}},
        "hyper_parameters": AttributeDict(lr=0.01, hidden=8),
        "lr_schedulers": [],
    }


def _assert_same(a: nn.Module, b: nn.Module, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> None:
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    sa = ckpt.optimizer_state_dict(a, opt_a, full=True)["state"]
    sb = ckpt.optimizer_state_dict(b, opt_b, full=True)["state"]
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        for key in sa[name]:
            torch.testing.assert_close(torch.as_tensor(sa[name][key]), torch.as_tensor(sb[name][key]), rtol=0, atol=0)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".raw-" in p.name)


@pytest.mark.parametrize("distributed", [True, False], ids=["dcp-folder", "full-file"])
def test_round_trip_restores_parameters_optimizer_and_meta(tmp_path: Path, distributed: bool) -> None:
    net, opt = _trained(seed=0)
    path = tmp_path / "model.ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=not distributed), path, distributed=distributed)
    if distributed:
        assert path.is_dir() and ckpt.is_complete_distributed_checkpoint(path)
        assert {".metadata", ckpt.META_FILENAME, ckpt.COMPLETE_MARKER} <= set(os.listdir(path))
    else:
        assert path.is_file()
    assert _leftovers(tmp_path) == []

    other, other_opt = _trained(seed=1, steps=1)  # other weights and optimizer state
    meta = ckpt.load_checkpoint(path, other, [other_opt], weights_only=True)
    _assert_same(net, other, opt, other_opt)
    assert meta["global_step"] == 7 and meta["epoch"] == 1
    assert meta["hyper_parameters"] == {"lr": 0.01, "hidden": 8}
    assert "state_dict" not in meta and len(meta["optimizer_states"]) == 1


def test_saving_again_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last"
    net, opt = _trained()
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False, step=1), path)
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False, step=2), path)
    assert ckpt.load_checkpoint(path, _Net())["global_step"] == 2
    # a full file may replace a folder of ours, and the other way round
    ckpt.save_checkpoint(_checkpoint(net, opt, full=True, step=3), path, distributed=False)
    assert path.is_file() and ckpt.load_checkpoint(path, _Net())["global_step"] == 3
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False, step=4), path)
    assert path.is_dir() and ckpt.load_checkpoint(path, _Net())["global_step"] == 4
    assert _leftovers(tmp_path) == []


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "ckpt"
    net, opt = _trained()
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False, step=1), path)

    real_save = dcp.save

    def crash_after_writing(state: Any, *, checkpoint_id: Any, **kwargs: Any) -> Any:
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards are there ...
        raise OSError("disk full")  # ... but the process dies before meta.pt and the marker

    monkeypatch.setattr(dcp, "save", crash_after_writing)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(_checkpoint(net, opt, full=False, step=2), path)
    assert ckpt.load_checkpoint(path, _Net())["global_step"] == 1
    assert _leftovers(tmp_path) == []


def test_half_written_folder_is_rejected(tmp_path: Path) -> None:
    net, opt = _trained()
    path = tmp_path / "ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False), path)
    (path / ckpt.COMPLETE_MARKER).unlink()  # what a crash between the shards and the marker leaves
    assert ckpt.is_distributed_checkpoint(path) and not ckpt.is_complete_distributed_checkpoint(path)
    with pytest.raises(ckpt.IncompleteCheckpointError, match="incomplete"):
        ckpt.load_checkpoint(path, _Net())
    with pytest.raises(ckpt.IncompleteCheckpointError, match="incomplete"):
        ckpt.consolidate(path, tmp_path / "out.pt")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.IncompleteCheckpointError, match="not a distributed checkpoint"):
        ckpt.load_checkpoint(empty, _Net())
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        ckpt.load_checkpoint(tmp_path / "missing", _Net())


def test_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    net, opt = _trained()
    for distributed in (True, False):
        with pytest.raises(IsADirectoryError, match="not a distributed checkpoint"):
            ckpt.save_checkpoint(_checkpoint(net, opt, full=not distributed), folder, distributed=distributed)
    assert (folder / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("distributed", [True, False], ids=["dcp-folder", "full-file"])
def test_other_model_shape_lists_the_mismatching_keys(tmp_path: Path, distributed: bool) -> None:
    net, opt = _trained(hidden=8)
    path = tmp_path / "ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=not distributed), path, distributed=distributed)
    wider = _Net(hidden=12)
    with pytest.raises(ckpt.CheckpointMismatchError) as info:
        ckpt.load_checkpoint(path, wider)
    message = str(info.value)
    assert "inp.weight: checkpoint [8, 5] vs model [12, 5]" in message
    assert "moe.experts." in message and "out.weight" in message


def test_missing_and_unexpected_keys_are_listed_unless_not_strict(tmp_path: Path) -> None:
    net, opt = _trained()
    path = tmp_path / "ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False), path)

    class Extra(_Net):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(
        ckpt.CheckpointMismatchError, match=r"missing from the checkpoint \(2\): extra.bias, extra.weight"
    ):
        ckpt.load_checkpoint(path, Extra())
    model = Extra()
    ckpt.load_checkpoint(path, model, strict=False)  # loads what is there
    torch.testing.assert_close(model.inp.weight, net.inp.weight)


def test_other_optimizer_type_is_reported(tmp_path: Path) -> None:
    net, opt = _trained()
    path = tmp_path / "ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False), path)
    other = _Net()
    sgd = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ckpt.CheckpointMismatchError, match="momentum_buffer"):
        ckpt.load_checkpoint(path, other, [sgd])
    with pytest.raises(ckpt.CheckpointMismatchError, match="1 optimizer"):
        ckpt.load_checkpoint(path, other, [sgd, sgd])


def test_consolidate_gives_a_plain_weights_only_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net, opt = _trained()
    folder = tmp_path / "ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False), folder)
    out = tmp_path / "consolidated.pt"
    assert ckpt.consolidate_main(["consolidate", str(folder), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    loaded = torch.load(out, weights_only=True)  # no process group, no model code, plain types only
    # Lightning's layout: the tensors beside everything else, nothing nested
    assert set(loaded) == {
        "state_dict",
        "optimizer_states",
        "global_step",
        "epoch",
        "loops",
        "hyper_parameters",
        "lr_schedulers",
    }
    assert loaded["state_dict"].keys() == net.state_dict().keys()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(loaded["state_dict"][name], value, rtol=0, atol=0)
    exp_avg = loaded["optimizer_states"][0]["state"]["moe.experts.w1"]["exp_avg"]  # keyed by name
    torch.testing.assert_close(exp_avg, opt.state[net.moe.experts.w1]["exp_avg"])
    assert loaded["global_step"] == 7
    assert type(loaded["hyper_parameters"]) is dict

    # the consolidated file resumes like a full checkpoint
    other, other_opt = _trained(seed=3, steps=1)
    assert ckpt.load_checkpoint(out, other, [other_opt], weights_only=True)["global_step"] == 7
    _assert_same(net, other, opt, other_opt)
    assert _leftovers(tmp_path) == []


def test_consolidate_takes_files_and_older_consolidated_files_still_load(tmp_path: Path) -> None:
    net, opt = _trained()
    full = tmp_path / "full.ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=True), full, distributed=False)
    out = tmp_path / "from-file.pt"
    written = ckpt.consolidate(full, out)
    loaded = torch.load(out, weights_only=True)
    assert loaded.keys() == written.keys() and loaded["global_step"] == 7
    for name, value in net.state_dict().items():
        torch.testing.assert_close(loaded["state_dict"][name], value, rtol=0, atol=0)

    # the layout `consolidate` wrote before: everything but the tensors nested under "meta"
    legacy = tmp_path / "legacy.pt"
    meta = {k: v for k, v in loaded.items() if k not in ("state_dict", "optimizer_states")}
    torch.save(
        {"state_dict": loaded["state_dict"], "optimizer_states": loaded["optimizer_states"], "meta": meta}, legacy
    )
    other, other_opt = _trained(seed=3, steps=1)
    assert ckpt.load_checkpoint(legacy, other, [other_opt], weights_only=True)["global_step"] == 7
    _assert_same(net, other, opt, other_opt)
    ckpt.consolidate(legacy, tmp_path / "again.pt")  # and consolidates into the flat layout
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert "meta" not in again and again["global_step"] == 7


def test_consolidate_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ckpt.consolidate_main([str(tmp_path / "nope"), str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint=") and err.count("\n") == 1


def test_to_plain_keeps_only_weights_only_types() -> None:
    class Color(enum.Enum):
        RED = "red"

    class Custom:
        def __str__(self) -> str:
            return "custom!"

    plain = to_plain(
        {
            "a": AttributeDict(x=1),
            "b": (1, [2.0, Color.RED]),
            "c": Path("/x"),
            "d": Custom(),
            "t": torch.ones(2),
            "dtype": torch.float16,
            3: None,
        }
    )
    assert plain == {
        "a": {"x": 1},
        "b": (1, [2.0, "red"]),
        "c": "/x",
        "d": "custom!",
        "t": plain["t"],
        "dtype": "torch.float16",
        3: None,
    }
    assert type(plain["a"]) is dict


@pytest.mark.slow  # a fresh interpreter imports torch and Lightning
def test_module_cli_consolidates(tmp_path: Path) -> None:
    import subprocess
    import sys

    net, opt = _trained()
    folder = tmp_path / "ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=False), folder)
    out = tmp_path / "out.pt"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_moe.checkpoint", "consolidate", str(folder), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert torch.load(out, weights_only=True)["state_dict"].keys() == net.state_dict().keys()
