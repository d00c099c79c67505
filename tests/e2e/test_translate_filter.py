"""``python -m lightning_moe.translate`` / ``evaluate`` as real processes: pipes, exit status, stderr."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.tiny_translator import write_tiny_checkpoint

pytestmark = pytest.mark.slow

_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")


def test_first_chunk_comes_out_before_stdin_closes(checkpoint: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_moe.translate", f"checkpoint={checkpoint}", "target_lang=de", "chunk_size=2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_ENV,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        proc.stdin.write(b"A dog runs on the grass.\nTwo men are talking.\n")
        proc.stdin.flush()
        # stdin stays open: the first chunk's two translations must arrive anyway
        first = [lines.get(timeout=120), lines.get(timeout=120)]
        assert all(line.endswith(b"\n") and line.strip() for line in first)
        assert proc.poll() is None
        proc.stdin.write(b"\nA woman.")  # a blank line and a last line without newline
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
        reader.join(timeout=10)
        rest = [lines.get_nowait() for _ in range(lines.qsize())]
        assert len(rest) == 2 and rest[0] == b"\n" and rest[1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("command", ["lightning_moe.translate", "lightning_moe.evaluate"])
def test_missing_checkpoint_is_one_line_and_nonzero(command: str, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", command, f"checkpoint={tmp_path / 'nope.ckpt'}"],
        input=b"hello\n",
        capture_output=True,
        env=_ENV,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "nope.ckpt" in stderr, stderr
