"""Preemption: SIGTERM / SIGUSR1 make every rank finish its step, save a checkpoint at that step and exit with
code 75; running the same command again ends with exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_moe.preemption import PREEMPTED_EXIT_CODE
from tests.e2e.test_cli import TINY

pytestmark = pytest.mark.slow

STEPS = 14


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LIGHTNING_MOE_CACHE=str(tmp_path / "cache"))
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _command(run_dir: Path, *extra: str) -> list[str]:
    # dropout and RTS on: the RNG states must be restored too, not only parameters and data order
    return [
        sys.executable,
        "-m",
        "lightning_moe.train",
        *TINY,
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={STEPS}",
        "test_after_fit=false",
        "model.dropout=0.2",
        "moe.use_rts=true",
        "moe.capacity_factor=1.0",
        "trainer.val_check_interval=3",
        *extra,
    ]


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step-{STEPS:06d}.ckpt"
    if path.is_dir():  # a moe_zero folder: gather it through the inference reader (one process)
        from lightning_moe.inference import read_checkpoint

        return read_checkpoint(path)["state_dict"]
    return torch.load(path, weights_only=True)["state_dict"]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _preempt_and_resume(tmp_path: Path, extra: tuple[str, ...], sig: signal.Signals, to_child: bool) -> None:
    env = _env(tmp_path)
    reference = tmp_path / "reference"
    subprocess.run(_command(reference, *extra), env=env, check=True, capture_output=True, timeout=600, cwd=tmp_path)

    run_dir = tmp_path / "preempted"
    log = tmp_path / "preempted.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            _command(run_dir, *extra), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
        first = run_dir / "checkpoints" / "step-000004.ckpt"
        deadline = time.time() + 300
        while not first.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the signal: " + log.read_text()[-2000:]
        target = process.pid
        if to_child:  # only the launcher's child (rank 1) gets it: the ranks must agree to stop together
            children = _children(process.pid)
            assert children, "no child rank found"
            target = children[0]
        os.kill(target, sig)
        process.wait(timeout=300)
    output = log.read_text()
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    match = re.search(r"preempted \((\w+)\): saved (\S+) at step (\d+)", output)
    assert match, output[-3000:]
    step = int(match.group(3))
    assert 4 <= step < STEPS, "stopped at a step outside the run, make it longer"
    assert Path(match.group(2)) == run_dir / "checkpoints" / f"step-{step:06d}.ckpt"
    assert Path(match.group(2)).exists()
    assert not (run_dir / "checkpoints" / f"step-{STEPS:06d}.ckpt").exists()

    result = subprocess.run(
        _command(run_dir, *extra), env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{step:06d}.ckpt'}" in result.stdout + result.stderr
    assert "`weights_only` was not set" not in result.stdout + result.stderr  # saved and loaded with it set

    expected, actual = _final_state(reference), _final_state(run_dir)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"parameters differ after resuming: {different[:5]}"


def test_sigterm_saves_at_the_current_step_and_the_same_command_continues_exactly(tmp_path: Path) -> None:
    _preempt_and_resume(tmp_path, (), signal.SIGTERM, to_child=False)

    # the same run folder with another model, optimizer and data: stops before training, naming the keys
    run_dir = tmp_path / "preempted"
    changed = ("model.d_model=64", "optim.lr=0.003", "data.max_train_sentences=200", "trainer.max_steps=20")
    result = subprocess.run(
        _command(run_dir, *changed), env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "3 key(s) differ" in errors[0] and "name=" in errors[0], errors[0]
    for key in ("model.d_model: 32 -> 64", "optim.lr: 0.002 -> 0.003", "data.max_train_sentences: 300 -> 200"):
        assert key in errors[0]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints" / "step-000020.ckpt").exists()

    # fine-tuning from a damaged checkpoint: one line, exit 1
    final = run_dir / "checkpoints" / f"step-{STEPS:06d}.ckpt"
    data = bytearray(final.read_bytes())
    data[len(data) // 2] ^= 0xFF
    final.write_bytes(bytes(data))
    result = subprocess.run(
        _command(tmp_path / "finetune", f"init_from={final}"),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "damaged" in errors[0] and str(final) in errors[0], result.stderr[-3000:]

    # resuming the run itself (two more steps): the damaged newest checkpoint is named, the one before it used,
    # and the damaged one is replaced by the run's own new history
    from lightning_moe.checkpoint import checkpoint_step, resolve_resume

    previous = max(s for s in map(checkpoint_step, (run_dir / "checkpoints").iterdir()) if s is not None and s < STEPS)
    longer = _command(run_dir, f"trainer.max_steps={STEPS + 2}")
    result = subprocess.run(longer, env=_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    damaged = [line for line in output.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and str(final) in damaged[0] and "SHA-256" in damaged[0], output[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{previous:06d}.ckpt'}" in output
    assert resolve_resume("auto", run_dir / "checkpoints") == str(
        run_dir / "checkpoints" / f"step-{STEPS + 2:06d}.ckpt"
    )

    # starting the run over (or from an older checkpoint) would replace whole checkpoints: refused, nothing deleted
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    for resume in ("never", str(run_dir / "checkpoints" / f"step-{previous:06d}.ckpt")):
        result = subprocess.run(
            _command(run_dir, f"trainer.max_steps={STEPS + 2}", f"checkpoint.resume={resume}"),
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "name=" in errors[0], result.stderr[-3000:]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.distributed
def test_sigusr1_to_one_of_two_ranks_stops_both_at_one_step_and_resumes_exactly(tmp_path: Path) -> None:
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc to find the launcher's child process")
    extra = ("strategy=moe_zero", "trainer.devices=2", "strategy.timeout_s=120")
    _preempt_and_resume(tmp_path, extra, signal.SIGUSR1, to_child=True)


def test_a_full_disk_stops_training_with_one_line_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    import resource

    def limit_file_size() -> None:  # in the child: a write past 500 kB fails with EFBIG (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))

    run_dir = tmp_path / "full"
    command = _command(run_dir)
    command[command.index(f"trainer.max_steps={STEPS}")] = "trainer.max_steps=5"
    result = subprocess.run(
        command, env=_env(tmp_path), capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert (
        f"could not write the checkpoint '{run_dir / 'checkpoints' / 'step-000004.ckpt'}': File too large" in errors[0]
    )
    assert list((run_dir / "checkpoints").iterdir()) == []  # no temporary file left behind
