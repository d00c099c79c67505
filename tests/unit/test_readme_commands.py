"""The README's quick start is what CI runs: its install+train command in a fresh environment and its test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _quick_start_commands() -> list[str]:
    """The command lines of the README's first code block under '## Quick start'."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's quick start has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_has_two_commands_install_and_test() -> None:
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    train, test = commands
    assert "lightning_moe.train" in train and "pip install" in train
    assert ".[dev]" not in train, "the first command must work without the dev extra"
    assert "pytest" in test


def test_ci_runs_the_readme_commands() -> None:
    train, test = _quick_start_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines, f"CI does not run the README's test command {test!r}"
    # CI runs the first command quietly, with a short run: only `-q` and key=value overrides may be added.
    runs = [line.replace(" -q ", " ") for line in ci_lines if "lightning_moe.train" in line and "pip install" in line]
    assert runs, "CI does not run the README's first command"
    first = runs[0]
    assert first.startswith(train), f"CI's quick-start line {first!r} differs from the README's {train!r}"
    extra = shlex.split(first[len(train) :])
    assert extra and all("=" in arg for arg in extra), extra
    assert any(arg.startswith("trainer.max_steps=") for arg in extra)
