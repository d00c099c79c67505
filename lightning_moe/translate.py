"""``python -m lightning_moe.translate checkpoint=PATH source_lang=en target_lang=de``: a Unix filter.

Reads one sentence per line from stdin (or ``input=FILE``) and writes exactly one translation per line to
stdout (or ``output=FILE``), in input order. Any checkpoint layout works (file or sharded folder).

* Streaming: the input is read ``chunk_size`` lines at a time; each chunk is sorted by length for
  batching, translated, written in input order and flushed before the next chunk is read, so memory does
  not grow with the input and output appears while the input still flows. A chunk is translated when it
  is full or the input ends: ``chunk_size=1`` answers each line as soon as it arrives.
* Lines: the input is split only at ``\\n`` (other Unicode line breaks stay inside their line); one
  trailing ``\\r`` is dropped (CRLF files); a last line without ``\\n`` still counts; an empty or
  whitespace-only line gives an empty output line. Output lines end with ``\\n``.
* Errors (missing or unreadable checkpoint, a language the model lacks, input that is not UTF-8) are one
  line on stderr and exit status 1; the translations of the lines before a bad input line are written first.
* A progress bar goes to stderr when stderr is a terminal and the input is a file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from lightning_moe.cli import fail, is_terminal, one_line, parse_args, progress_bar

if TYPE_CHECKING:
    from lightning_moe.module import MultitaskTranslationModule

__all__ = ["TranslateConfig", "InputError", "read_lines", "read_chunks", "main"]

USAGE = (
    "usage: python -m lightning_moe.translate checkpoint=PATH source_lang=en target_lang=de "
    "[input=FILE] [output=FILE] [beam_size=4] [chunk_size=512]"
)

_READ_BLOCK = 1 << 20  # bytes read at a time when counting the lines of an input file


@dataclass
class TranslateConfig:
    """Arguments of ``lightning_moe.translate``."""

    checkpoint: str = "???"
    """A checkpoint written by ``lightning_moe.train`` (file or folder)."""
    source_lang: str = "en"
    """Language of the input sentences: one of the model's languages (its encoder input has no source
    tag, so this only checks that the model knows the language)."""
    target_lang: str = "de"
    """Language to translate into: one of the model's languages."""
    input: str | None = None
    """File of sentences, one a line (UTF-8); null = stdin."""
    output: str | None = None
    """File for the translations; null = stdout."""
    beam_size: int = 1
    """1 = greedy; more = beam search."""
    batch_size: int = 64
    """Sentences decoded together."""
    chunk_size: int = 512
    """Lines read, translated and written at a time (bounds memory; 1 = answer each line at once)."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto``."""

    def __post_init__(self) -> None:
        for key in ("beam_size", "batch_size", "chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: use an integer >= 1")
        if self.source_lang == self.target_lang:
            raise ValueError(f"source_lang and target_lang are both {self.source_lang!r}: pick two languages")


class InputError(ValueError):
    """An input line cannot be read as text (the message names the line)."""


def read_lines(stream: BinaryIO) -> Iterator[str]:
    """The lines of a binary ``stream`` as text, split only at ``\\n``, without it and one trailing ``\\r``.

    Raises:
        InputError: a line is not valid UTF-8 (the message gives its number and the byte).
    """
    for number, raw in enumerate(stream, start=1):  # binary iteration splits at b"\n" only
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"input line {number} is not valid UTF-8 (byte {raw[err.start]:#04x} at byte {err.start + 1} "
                f"of the line): convert the input to UTF-8"
            ) from None


def read_chunks(stream: BinaryIO, size: int) -> Iterator[list[str]]:
    """:func:`read_lines` in lists of ``size`` lines (the last may be shorter), each as soon as it is read.

    A bad line first yields the lines read before it, then raises its :class:`InputError`.
    """
    chunk: list[str] = []
    lines = read_lines(stream)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            break
        except InputError:
            if chunk:
                yield chunk
            raise
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _count_lines(path: str) -> int:
    """Lines of file ``path`` as :func:`read_lines` counts them (for the progress bar's total)."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _load(cfg: TranslateConfig) -> MultitaskTranslationModule:
    """The checkpoint's translator, its languages checked; one-line errors."""
    from lightning_moe.inference import check_language, load_translator, resolve_device

    generation = {"beam_size": cfg.beam_size, "batch_size": cfg.batch_size}
    try:
        module = load_translator(cfg.checkpoint, resolve_device(cfg.device), generation=generation)
    except (OSError, ValueError) as err:
        fail(f"cannot load checkpoint={cfg.checkpoint}: {one_line(err)}")
    try:
        check_language(module, cfg.source_lang, "source_lang")
        check_language(module, cfg.target_lang, "target_lang")
    except ValueError as err:
        fail(err)
    return module


def _translate(
    cfg: TranslateConfig, module: MultitaskTranslationModule, source: BinaryIO, sink: BinaryIO, total: int | None
) -> None:
    from lightning_moe.inference import translate_sentences

    with progress_bar(total, "translate", enabled=total is not None) as bar:
        for chunk in read_chunks(source, cfg.chunk_size):
            translations = translate_sentences(module, chunk, cfg.target_lang, cfg.batch_size)
            # a translation never spans lines, whatever the tokenizer decodes
            text = "".join(t.replace("\r", " ").replace("\n", " ") + "\n" for t in translations)
            sink.write(text.encode("utf-8"))
            sink.flush()
            bar.update(len(chunk))


def _open_or_fail(path: str, mode: str, what: str) -> BinaryIO:
    """``open(path, mode)``, or the one-line error ``cannot {what}={path}: ...`` (exit status 1)."""
    try:
        return open(path, mode)
    except OSError as err:
        fail(f"cannot {what}={path}: {err.strerror or one_line(err)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    cfg = parse_args(TranslateConfig, argv, USAGE)
    with ExitStack() as stack:
        if cfg.input:
            source = stack.enter_context(_open_or_fail(cfg.input, "rb", "read input"))
        else:
            source = getattr(sys.stdin, "buffer", sys.stdin)
        module = _load(cfg)  # before the output file is created (or emptied)
        if cfg.output:
            sink = stack.enter_context(_open_or_fail(cfg.output, "wb", "write output"))
        else:
            sys.stdout.flush()
            sink = getattr(sys.stdout, "buffer", sys.stdout)
        total = _count_lines(cfg.input) if cfg.input and is_terminal() else None
        try:
            _translate(cfg, module, source, sink, total)
        except InputError as err:
            fail(err)
        except BrokenPipeError:
            # the reader went away (e.g. `| head -1`): stop quietly, as a filter killed by SIGPIPE would
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return 141
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
