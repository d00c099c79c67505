"""``python -m lightning_moe.translate`` as a Unix filter, run in-process with captured stdin/stdout."""

from __future__ import annotations

import functools
import io
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe import translate
from lightning_moe.data.tokenizer import SubwordTokenizer
from lightning_moe.inference import tokenizer_bytes
from lightning_moe.module import MultitaskTranslationModule
from tests.tiny_translator import LANGS, write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the model "translate" a sentence into its own tokens decoded again (its source read back),
    so tests see which line each output came from; returns the batch sizes decoded."""
    batches: list[int] = []

    def translate_batch(self, src: torch.Tensor, src_padding_mask=None) -> list[str]:
        batches.append(src.shape[0])
        return [self.tokenizer.decode(row.tolist()) for row in src]  # the tag is skipped, EOS ends it

    monkeypatch.setattr(MultitaskTranslationModule, "translate_batch", translate_batch)
    return batches


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def _main(argv: list[str]) -> int:
    return translate.main(argv)


def _error(argv: list[str]) -> str:
    """The message of a command that must stop with a one-line error."""
    with pytest.raises(SystemExit) as stop:
        translate.main(argv)
    message = stop.value.code
    assert isinstance(message, str), f"expected an error message, got exit status {message!r}"
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@functools.cache
def _tokenizer(checkpoint: Path) -> SubwordTokenizer:
    return SubwordTokenizer(tokenizer_bytes(torch.load(checkpoint, weights_only=True)["tokenizer_model"]))


def _reference(checkpoint: Path, line: str) -> str:
    """What the echo model outputs for ``line``: its tokens decoded, or nothing for a blank line."""
    tokenizer = _tokenizer(checkpoint)
    return tokenizer.decode(tokenizer.encode(line)) if line.strip() else ""


def test_one_output_line_per_input_line(checkpoint, echo, monkeypatch, capsysbinary):
    lines = [
        "A dog runs.",
        "",
        "   \t ",
        "two\u2028lines\u0085in\x0cone\x1cline",  # Unicode line breaks that str.splitlines would split at
        "Two men are talking.",
        "crlf line",
        "no final newline",
    ]
    data = "\n".join(lines[:5]) + "\n" + lines[5] + "\r\n" + lines[6]
    _stdin(monkeypatch, data.encode("utf-8"))
    assert _main([f"checkpoint={checkpoint}", "target_lang=de", "chunk_size=3"]) == 0
    out = capsysbinary.readouterr().out.decode("utf-8")
    assert out.endswith("\n")
    got = out[:-1].split("\n")
    assert got == [_reference(checkpoint, line) for line in lines]
    assert got[1] == got[2] == ""  # blank lines give empty lines, not invented text
    assert all(got[i] for i in (0, 3, 4, 5, 6))
    assert sum(echo) == 5  # the two blank lines were not decoded


def test_real_model_gives_empty_output_for_blank_lines_only(checkpoint, monkeypatch, capsysbinary):
    _stdin(monkeypatch, b"A dog runs.\n\n  \nA man.\n")
    assert _main([f"checkpoint={checkpoint}", "target_lang=de"]) == 0
    got = capsysbinary.readouterr().out.decode("utf-8").split("\n")
    assert len(got) == 5 and got[-1] == ""
    assert got[1] == got[2] == "" and got[0] and got[3]  # this untrained model always says something


class _WatchedInput(io.RawIOBase):
    """Binary stdin that records, at each line it hands out, how many output lines were written."""

    def __init__(self, lines: list[bytes], sink: io.BytesIO) -> None:
        self._data = io.BytesIO(b"".join(lines))
        self._sink = sink
        self.seen: list[int] = []  # output lines written when input line i was read

    def readable(self) -> bool:
        return True

    def readline(self, size: int = -1) -> bytes:
        line = self._data.readline(size)
        if line:
            self.seen.append(self._sink.getvalue().count(b"\n"))
        return line


def test_streams_chunk_by_chunk(checkpoint, echo, monkeypatch):
    sink = io.BytesIO()
    lines = [f"sentence number {i} {'word ' * (i % 5)}\n".encode() for i in range(10)]
    source = _WatchedInput(lines, sink)
    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": source})())
    monkeypatch.setattr(sys, "stdout", type("Stdout", (), {"buffer": sink, "flush": lambda self: None})())
    assert _main([f"checkpoint={checkpoint}", "target_lang=de", "chunk_size=4", "batch_size=3"]) == 0
    # the translations of lines 0-3 were out before line 4 was read, those of 4-7 before line 8
    assert source.seen == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    assert max(echo) <= 3 and sum(echo) == 10
    assert sink.getvalue().decode().split("\n")[:-1] == [_reference(checkpoint, line.decode()) for line in lines]


def test_invalid_utf8_names_the_line_after_writing_the_lines_before(checkpoint, echo, monkeypatch, capsysbinary):
    _stdin(monkeypatch, b"good one\ngood two\nbad \xff\xfe here\nnever read\n")
    message = _error([f"checkpoint={checkpoint}", "target_lang=de"])
    assert "line 3" in message and "UTF-8" in message
    out = capsysbinary.readouterr().out.decode("utf-8")
    assert out.split("\n")[:-1] == [_reference(checkpoint, "good one"), _reference(checkpoint, "good two")]


def test_languages_are_checked_against_the_model(checkpoint, monkeypatch):
    _stdin(monkeypatch, b"hello\n")
    message = _error([f"checkpoint={checkpoint}", "target_lang=xx"])
    assert "target_lang='xx'" in message and str(LANGS) in message
    message = _error([f"checkpoint={checkpoint}", "source_lang=zz", "target_lang=de"])
    assert "source_lang='zz'" in message and str(LANGS) in message
    assert "pick two languages" in _error([f"checkpoint={checkpoint}", "source_lang=de", "target_lang=de"])


def test_checkpoint_errors_are_one_line(tmp_path, monkeypatch):
    _stdin(monkeypatch, b"hello\n")
    assert "does not exist" in _error([f"checkpoint={tmp_path / 'missing.ckpt'}"])
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "not a distributed checkpoint" in _error([f"checkpoint={folder}"])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint\n")
    assert "not a checkpoint that torch.load can read" in _error([f"checkpoint={garbage}"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert "holds no 'state_dict'" in _error([f"checkpoint={tmp_path / 'other.pt'}"])


def test_argument_errors_are_one_line(checkpoint, tmp_path):
    message = _error([f"checkpoint={checkpoint}", "beam=4"])
    assert "beam" in message and "valid keys" in message and "chunk_size" in message
    assert "chunk_size=0" in _error([f"checkpoint={checkpoint}", "chunk_size=0"])
    assert "key=value" in _error([str(checkpoint)])
    assert "input=" in _error([f"checkpoint={checkpoint}", f"input={tmp_path / 'none.txt'}"])


def test_input_and_output_files(checkpoint, echo, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b"first line\r\n\r\nthird line")
    target = tmp_path / "out.txt"
    assert _main([f"checkpoint={checkpoint}", "target_lang=fr", f"input={source}", f"output={target}"]) == 0
    assert target.read_text(encoding="utf-8") == (
        f"{_reference(checkpoint, 'first line')}\n\n{_reference(checkpoint, 'third line')}\n"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_for_a_file_on_a_terminal(checkpoint, echo, tmp_path, monkeypatch, capsysbinary):
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\nthree\n", encoding="utf-8")
    argv = [f"checkpoint={checkpoint}", "target_lang=de"]

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert _main([*argv, f"input={source}"]) == 0
    assert "translate" in terminal.getvalue() and "/3 " in terminal.getvalue()  # the file's 3 lines are its total

    terminal = _Terminal()  # stdin: no bar, even on a terminal
    monkeypatch.setattr(sys, "stderr", terminal)
    _stdin(monkeypatch, b"one\ntwo\n")
    assert _main(argv) == 0
    assert terminal.getvalue() == ""

    piped = io.StringIO()  # stderr not a terminal: no bar
    monkeypatch.setattr(sys, "stderr", piped)
    assert _main([*argv, f"input={source}"]) == 0
    assert piped.getvalue() == ""
    assert capsysbinary.readouterr().out.count(b"\n") == 3 + 2 + 3


def test_help_shows_real_defaults_and_docstrings(capsys):
    with pytest.raises(SystemExit) as stop:
        translate.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "chunk_size=512" in text and "input=null" in text and "_MISSING_TYPE" not in text
    assert "Lines read, translated and written at a time" in text
