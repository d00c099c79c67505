"""Damaged checkpoints are detected and named in one line, resuming falls back to the newest whole one, a
save that runs out of space leaves the previous checkpoint intact, and pickled code is refused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_moe import checkpoint as ckpt
from lightning_moe.checkpoint.manifest import FOLDER_MANIFEST, file_manifest_path
from tests.distributed.test_checkpoint_files import _checkpoint, _trained


def _save(folder: Path, step: int, *, distributed: bool, seed: int = 0) -> Path:
    net, opt = _trained(seed)
    path = folder / f"step-{step:06d}.ckpt"
    ckpt.save_checkpoint(_checkpoint(net, opt, full=not distributed, step=step), path, distributed=distributed)
    return path


def _shard(path: Path) -> Path:
    return next(path.glob("__0_*.distcp"))


def _truncate(target: Path) -> None:
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def _flip(target: Path) -> None:
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: sizes stay the same
    target.write_bytes(bytes(data))


# (name, what to damage in a checkpoint, what the message must say)
FOLDER_DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated shard", lambda p: _truncate(_shard(p)), "bytes, its manifest says"),
    ("flipped byte in a shard", lambda p: _flip(_shard(p)), "SHA-256 differs"),
    ("missing shard", lambda p: _shard(p).unlink(), "is missing"),
    ("flipped byte in meta.pt", lambda p: _flip(p / ckpt.META_FILENAME), "SHA-256 differs"),
    ("truncated index", lambda p: _truncate(p / ".metadata"), "bytes, its manifest says"),
    ("garbled manifest", lambda p: (p / FOLDER_MANIFEST).write_text("{not json"), "manifest"),
]
FILE_DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated file", _truncate, "bytes, its manifest says"),
    ("flipped byte in file", _flip, "SHA-256 differs"),
    ("file appended to", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10), "bytes, its manifest says"),
]
ALL_DAMAGE = [(name, fn, msg, True) for name, fn, msg in FOLDER_DAMAGE] + [
    (name, fn, msg, False) for name, fn, msg in FILE_DAMAGE
]


@pytest.mark.parametrize(
    ("damage", "message", "distributed"), [a[1:] for a in ALL_DAMAGE], ids=[a[0] for a in ALL_DAMAGE]
)
def test_damage_is_detected_named_in_one_line_and_resume_falls_back(
    tmp_path: Path, damage: Callable[[Path], None], message: str, distributed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    older = _save(tmp_path, 4, distributed=distributed)
    newest = _save(tmp_path, 8, distributed=distributed, seed=1)
    ckpt.verify_checkpoint(newest)  # whole as written
    damage(newest)
    with pytest.raises(ckpt.DamagedCheckpointError, match=message) as info:
        ckpt.check_loadable(newest)
    assert "\n" not in str(info.value) and str(newest) in str(info.value)

    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", tmp_path) == str(older)
    assert any("damaged" in r.getMessage() and str(newest) in r.getMessage() for r in caplog.records)
    with pytest.raises(ckpt.DamagedCheckpointError, match=message):
        ckpt.resolve_resume(str(newest), tmp_path)
    # loading it directly (translate / evaluate / init_from read through consolidate or read_checkpoint)
    from lightning_moe.inference import read_checkpoint

    with pytest.raises(ValueError, match="damaged|not a checkpoint that torch.load can read"):
        read_checkpoint(newest)
    # the older one still loads, and resharding loaders check sizes too
    net, opt = _trained(5)
    ckpt.load_checkpoint(older, net, [opt])


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    for step in (4, 8):
        _truncate(_save(tmp_path, step, distributed=False))
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"no checkpoint .* can be resumed \(2 damaged"):
        ckpt.resolve_resume("auto", tmp_path)
    assert ckpt.resolve_resume("never", tmp_path) is None


def test_a_file_without_manifest_that_does_not_load_is_skipped(tmp_path: Path) -> None:
    older = _save(tmp_path, 4, distributed=False)
    newest = _save(tmp_path, 8, distributed=False)
    file_manifest_path(newest).unlink()  # as written before manifests existed
    assert ckpt.resolve_resume("auto", tmp_path) == str(newest)
    _truncate(newest)
    assert ckpt.resolve_resume("auto", tmp_path) == str(older)


def test_abandoned_later_checkpoints_and_their_manifests_are_pruned(tmp_path: Path) -> None:
    for step in (4, 8, 12):
        _save(tmp_path, step, distributed=False)
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=3, current_step=8)
    assert [p.name for p in deleted] == ["step-000012.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000004.ckpt",
        "step-000004.ckpt.manifest.json",
        "step-000008.ckpt",
        "step-000008.ckpt.manifest.json",
    ]


class Payload:  # a class torch would have to unpickle
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("distributed", [False, True], ids=["file", "folder"])
def test_a_checkpoint_that_needs_pickled_code_is_refused_clearly(tmp_path: Path, distributed: bool) -> None:
    net, opt = _trained()
    state = _checkpoint(net, opt, full=not distributed)
    state["hyper_parameters"] = {"evil": Payload()}
    path = tmp_path / "step-000004.ckpt"
    ckpt.save_checkpoint(state, path, distributed=distributed)
    with pytest.raises(ValueError, match=r"refusing to load .*pickled code.*weights_only=False") as info:
        ckpt.load_checkpoint(path, *(lambda n, o: (n, [o]))(*_trained()))
    assert "\n" not in str(info.value)
    from lightning_moe.inference import read_checkpoint

    with pytest.raises(ValueError, match="refusing to load|weights_only"):
        read_checkpoint(path)
    if not distributed:
        io = ckpt.AtomicCheckpointIO()
        with pytest.raises(ValueError, match="refusing to load"):
            io.load_checkpoint(path)
        file_manifest_path(path).unlink()  # without a manifest, choosing it to resume refuses it too (not "damaged")
        with pytest.raises(ValueError, match="refusing to load") as info:
            ckpt.resolve_resume("auto", tmp_path)
        assert not isinstance(info.value, ckpt.DamagedCheckpointError)


def test_no_torch_load_in_the_package_without_weights_only_true() -> None:
    import re

    root = Path(ckpt.__file__).parents[1]
    offenders = []
    for file in root.rglob("*.py"):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if (
                re.search(r"\btorch\.load\(", line)
                and "weights_only=True" not in line
                and "weights_only=weights_only" not in line
            ):
                offenders.append(f"{file.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, offenders


_FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from lightning_moe import checkpoint as ckpt
    from tests.distributed.test_checkpoint_files import _checkpoint, _trained

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a signal
    for layout in ("file", "folder"):
        folder, distributed = Path(sys.argv[1]) / layout, layout == "folder"
        net, opt = _trained(0)
        ckpt.save_checkpoint(_checkpoint(net, opt, full=not distributed, step=4), folder / "step-000004.ckpt", distributed=distributed)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
        net, opt = _trained(1, hidden=64)
        try:
            for target in ("step-000004.ckpt", "step-000008.ckpt"):  # over the previous one, and a new one
                try:
                    state = _checkpoint(net, opt, full=not distributed, step=8)
                    ckpt.save_checkpoint(state, folder / target, distributed=distributed)
                except ckpt.CheckpointWriteError as err:
                    print(layout, "ERROR", err)
                else:
                    print(layout, "SAVED")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    """
)


def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [
        [layout, "ERROR"] for layout in ("file", "file", "folder", "folder")
    ]
    for layout in ("file", "folder"):
        folder = tmp_path / layout
        for line, target in zip(
            [line for line in lines if line.startswith(layout)], ("step-000004.ckpt", "step-000008.ckpt")
        ):
            assert (
                str(folder / target) in line and "File too large" in line and "previous checkpoints are intact" in line
            )
        # nothing half-written is left, and the previous checkpoint is whole and loads
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["step-000004.ckpt"] + (["step-000004.ckpt.manifest.json"] if layout == "file" else [])
        )
        assert ckpt.resolve_resume("auto", folder) == str(folder / "step-000004.ckpt")
        net, opt = _trained(3)
        reference, _ = _trained(0)
        ckpt.load_checkpoint(folder / "step-000004.ckpt", net, [opt])
        for (name, a), (_, b) in zip(net.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), name


def test_signal_names_are_validated() -> None:
    from lightning_moe.config import CheckpointConfig
    from lightning_moe.preemption import parse_signal

    assert parse_signal("usr1") == signal.SIGUSR1 and parse_signal("SIGTERM") == signal.SIGTERM
    with pytest.raises(ValueError, match="cannot be caught"):
        CheckpointConfig(preempt_signals=["SIGKILL"])
    with pytest.raises(ValueError, match=r"checkpoint.preempt_signals: 'SIGNOPE' is not a signal name"):
        CheckpointConfig(preempt_signals=["SIGNOPE"])


@pytest.mark.parametrize("command", ["translate", "evaluate"])
@pytest.mark.parametrize("distributed", [False, True], ids=["file", "folder"])
def test_translate_and_evaluate_name_a_damaged_checkpoint_in_one_line(
    tmp_path: Path, command: str, distributed: bool
) -> None:
    import importlib

    path = _save(tmp_path, 4, distributed=distributed)
    _flip(_shard(path) if distributed else path)
    main = importlib.import_module(f"lightning_moe.{command}").main
    args = [f"checkpoint={path}"] + (["source_lang=en", "target_lang=de"] if command == "translate" else [])
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "damaged" in message and str(path) in message


@pytest.mark.parametrize(
    "stored", [10**12, "model", [1, 2, 3], torch.zeros(4, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.uint8)]
)
def test_a_stored_tokenizer_is_read_only_as_bytes(stored: object) -> None:
    from lightning_moe.inference import tokenizer_bytes

    with pytest.raises(ValueError, match="not the bytes of a tokenizer model"):
        tokenizer_bytes(stored)  # an int would otherwise allocate that many bytes
    assert tokenizer_bytes(torch.tensor([1, 2], dtype=torch.uint8)) == b"\x01\x02" == tokenizer_bytes(b"\x01\x02")


def test_the_single_process_loader_names_a_sharded_folder(tmp_path: Path) -> None:
    path = _save(tmp_path, 4, distributed=True)
    with pytest.raises(ValueError, match="sharded checkpoint folder, which only strategy=moe_zero resumes"):
        ckpt.AtomicCheckpointIO().load_checkpoint(path)
