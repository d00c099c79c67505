"""Reader for line-aligned multilingual corpora in the Multi30k layout.

A corpus folder holds one file per (split, language): ``{root}/{split}.{lang}.gz`` (gzip, UTF-8) or the
uncompressed ``{root}/{split}.{lang}``; line *i* of every language of a split is a translation of line *i*
of the others. Multi30k task 1 is one such folder; any other corpus written the same way (for example by
:func:`write_split`) works too.

Loading a split keeps the lines aligned: a line that is empty, too long or (with ``on_error="filter"``) not
valid UTF-8 in *any* language is dropped from *every* language, and counted by reason in a
:class:`CorpusReport` that the caller can log.

Usage::

    corpus = load_split("data/multi30k", "train", ["en", "de"], max_len_chars=400)
    print(corpus.report.summary())      # train [en, de]: kept 29000 of 29000 lines
    en, de = corpus.sentences["en"][0], corpus.sentences["de"][0]
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CorpusError",
    "CorpusReport",
    "ParallelCorpus",
    "DROP_REASONS",
    "ON_ERROR",
    "available_languages",
    "available_splits",
    "corpus_file",
    "load_split",
    "write_split",
]

PathLike = str | os.PathLike

DROP_REASONS = ("invalid_utf8", "empty", "too_long", "too_many_tokens")
"""Why a line can be dropped, in the order they are checked: a line is counted under the first that applies.
``too_many_tokens`` is counted by the data module after tokenizing (training lines over ``max_len`` tokens)."""

ON_ERROR = ("raise", "filter")
"""What to do with a line that is not valid UTF-8: raise a :class:`CorpusError`, or drop (and count) it."""

_GZ = ".gz"
_LANG_CODE = re.compile(r"[A-Za-z]{2,3}(?:[_-][A-Za-z0-9]{2,8})?")  # en, de, pt_br, zh-Hans
_NOT_SPLITS = ("README", "LICENSE", "CHECKSUM")


class CorpusError(ValueError):
    """A corpus folder or file that cannot be read as a line-aligned corpus (a ``ValueError``)."""


@dataclass
class CorpusReport:
    """What :func:`load_split` read and what it dropped, for logging.

    Attributes:
        split: the split that was read (``"train"``, ``"val"``, ...).
        langs: the languages that were read, in the order asked for.
        files: the file read for each language.
        total_lines: aligned lines in the files (the same in every language).
        kept: lines kept in every language.
        dropped: lines dropped from every language, by reason (keys: :data:`DROP_REASONS`).
        truncated: lines left out by ``max_sentences`` (not counted as dropped).
        tokens_cut: sentences whose ids were cut to the token limit (evaluation splits keep every line).
    """

    split: str
    langs: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)
    total_lines: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in DROP_REASONS})
    truncated: int = 0
    tokens_cut: int = 0

    @property
    def num_dropped(self) -> int:
        """Lines dropped for any reason."""
        return sum(self.dropped.values())

    def summary(self) -> str:
        """One line for a log: ``"train [en, de]: kept 28990 of 29000 lines (dropped: too_long=10)"``."""
        text = f"{self.split} [{', '.join(self.langs)}]: kept {self.kept} of {self.total_lines} lines"
        reasons = [f"{reason}={n}" for reason, n in self.dropped.items() if n]
        if reasons:
            text += f" (dropped: {', '.join(reasons)})"
        if self.truncated:
            text += f" (left out after max_sentences: {self.truncated})"
        if self.tokens_cut:
            text += f" (sentences cut to the token limit: {self.tokens_cut})"
        return text


@dataclass
class ParallelCorpus:
    """Aligned sentences of one split: ``sentences[lang][i]`` are translations of each other for every ``lang``.

    Attributes:
        split: the split name.
        langs: languages, in the order asked for.
        sentences: the kept sentences per language (stripped of surrounding whitespace).
        report: what was read and dropped.
    """

    split: str
    langs: tuple[str, ...]
    sentences: dict[str, list[str]]
    report: CorpusReport

    def __post_init__(self) -> None:
        sizes = {lang: len(self.sentences[lang]) for lang in self.langs}
        if len(set(sizes.values())) > 1:
            raise CorpusError(f"sentences are not aligned: sentences per language {sizes}")

    def __len__(self) -> int:
        return len(self.sentences[self.langs[0]]) if self.langs else 0

    def __getitem__(self, index: int) -> dict[str, str]:
        """The sentences of line ``index`` in every language."""
        return {lang: self.sentences[lang][index] for lang in self.langs}

    def pairs(self, src: str, tgt: str) -> list[tuple[str, str]]:
        """``(source, target)`` sentence pairs for one direction."""
        for name, lang in (("src", src), ("tgt", tgt)):
            if lang not in self.sentences:
                raise ValueError(f"{name}={lang!r} is not a language of this corpus: use one of {list(self.langs)}")
        return list(zip(self.sentences[src], self.sentences[tgt]))


def corpus_file(root: PathLike, split: str, lang: str) -> Path | None:
    """The file of ``(split, lang)`` under ``root``: ``{split}.{lang}.gz`` if present, else ``{split}.{lang}``.

    Returns None when neither exists.
    """
    base = Path(root) / f"{split}.{lang}"
    compressed = base.with_name(base.name + _GZ)
    if compressed.is_file():
        return compressed
    if base.is_file():
        return base
    return None


def _parse_name(name: str) -> tuple[str, str] | None:
    """``"train.en.gz"`` -> ``("train", "en")``; None for names outside the layout (README.md, ...)."""
    if name.endswith(_GZ):
        name = name[: -len(_GZ)]
    split, dot, lang = name.rpartition(".")
    if not dot or not split or _LANG_CODE.fullmatch(lang) is None or split.upper().startswith(_NOT_SPLITS):
        return None
    return split, lang


def _layout(root: Path) -> dict[str, set[str]]:
    """Languages per split found in ``root``."""
    found: dict[str, set[str]] = {}
    for entry in root.iterdir():
        parsed = _parse_name(entry.name) if entry.is_file() else None
        if parsed is not None:
            found.setdefault(parsed[0], set()).add(parsed[1])
    return found


def _check_root(root: PathLike) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise CorpusError(
            f"root={str(root)!r} is not a folder: pass the folder that holds the {{split}}.{{lang}}[.gz] files"
        )
    return path


def available_splits(root: PathLike) -> list[str]:
    """Splits that have at least one language file under ``root``, sorted."""
    return sorted(_layout(_check_root(root)))


def available_languages(root: PathLike, split: str) -> list[str]:
    """Languages that have a file for ``split`` under ``root``, sorted (empty if the split is absent)."""
    return sorted(_layout(_check_root(root)).get(split, ()))


def _read_lines(path: Path) -> list[bytes]:
    """Raw lines of a (possibly gzip) file, without line terminators; a final newline adds no empty line."""
    try:
        if path.name.endswith(_GZ):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise CorpusError(f"cannot read {path}: {err} (is it a complete gzip/text file?)") from err
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _decode(path: Path, lines: list[bytes], on_error: str) -> tuple[list[str | None], int]:
    """Decode every line as UTF-8; invalid lines raise (``on_error="raise"``) or become None."""
    decoded: list[str | None] = []
    invalid = 0
    for number, raw in enumerate(lines, start=1):
        try:
            decoded.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            if on_error == "raise":
                raise CorpusError(
                    f"{path}, line {number}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                    f"fix the file or pass on_error='filter' to drop such lines"
                ) from err
            decoded.append(None)
            invalid += 1
    return decoded, invalid


def load_split(
    root: PathLike,
    split: str,
    langs: Sequence[str],
    max_len_chars: int | None = None,
    *,
    on_error: str = "raise",
    max_sentences: int | None = None,
) -> ParallelCorpus:
    """Read the aligned sentences of ``split`` in each of ``langs`` from ``root``.

    Arguments:
        root: the corpus folder.
        split: the split to read, e.g. ``"train"``; its files are ``{root}/{split}.{lang}[.gz]``.
        langs: languages to read (at least one, no repeats).
        max_len_chars: drop lines longer than this many characters (after stripping) in any language;
            None keeps every length.
        on_error: ``"raise"`` (default) stops at the first line that is not valid UTF-8, naming the file and
            line; ``"filter"`` drops such a line from every language and counts it.
        max_sentences: keep only the first this many lines that pass the filters (a small preset); None = all.

    Returns:
        A :class:`ParallelCorpus` whose ``report`` counts what was dropped, by reason.

    Raises:
        CorpusError (a ``ValueError``): a missing folder, split or language (the message lists what is
        available), files of one split with different line counts (naming both files and their counts),
        an unreadable file, or invalid UTF-8 with ``on_error="raise"``.
    """
    path = _check_root(root)
    langs = tuple(langs)
    if not langs:
        raise ValueError("langs is empty: pass at least one language code, e.g. ['en', 'de']")
    if len(set(langs)) != len(langs):
        raise ValueError(f"langs={list(langs)} repeats a language: list each language once")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is invalid: use one of {list(ON_ERROR)}")
    if max_len_chars is not None and (isinstance(max_len_chars, bool) or max_len_chars < 1):
        raise ValueError(f"max_len_chars={max_len_chars!r} is invalid: use a positive integer or None")
    if max_sentences is not None and (isinstance(max_sentences, bool) or max_sentences < 1):
        raise ValueError(f"max_sentences={max_sentences!r} is invalid: use a positive integer or None")

    layout = _layout(path)
    if split not in layout:
        raise CorpusError(f"split={split!r} has no files in {path}: available splits are {sorted(layout)}")
    files: dict[str, Path] = {}
    for lang in langs:
        found = corpus_file(path, split, lang)
        if found is None:
            raise CorpusError(
                f"language {lang!r} has no file {split}.{lang}[.gz] in {path}: "
                f"languages available for split {split!r} are {sorted(layout[split])}"
            )
        files[lang] = found

    raw = {lang: _read_lines(files[lang]) for lang in langs}
    first = langs[0]
    for lang in langs[1:]:
        if len(raw[lang]) != len(raw[first]):
            raise CorpusError(
                f"line counts differ: {files[first]} has {len(raw[first])} lines but {files[lang]} has "
                f"{len(raw[lang])}; the files of one split must be line-aligned translations"
            )

    report = CorpusReport(split=split, langs=langs, files=files, total_lines=len(raw[first]))
    text: dict[str, list[str | None]] = {}
    for lang in langs:
        text[lang], _ = _decode(files[lang], raw[lang], on_error)
    del raw

    kept: dict[str, list[str]] = {lang: [] for lang in langs}
    for i in range(report.total_lines):
        row = [text[lang][i] for lang in langs]
        reason = _drop_reason(row, max_len_chars)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        if max_sentences is not None and len(kept[first]) >= max_sentences:
            report.truncated += 1
            continue
        for lang, sentence in zip(langs, row):
            kept[lang].append(sentence.strip())  # type: ignore[union-attr]
    report.kept = len(kept[first])
    return ParallelCorpus(split=split, langs=langs, sentences=kept, report=report)


def _drop_reason(row: list[str | None], max_len_chars: int | None) -> str | None:
    """The first reason in :data:`DROP_REASONS` that applies to one aligned line, or None to keep it."""
    if any(sentence is None for sentence in row):
        return "invalid_utf8"
    stripped = [sentence.strip() for sentence in row]  # type: ignore[union-attr]
    if any(not sentence for sentence in stripped):
        return "empty"
    if max_len_chars is not None and any(len(sentence) > max_len_chars for sentence in stripped):
        return "too_long"
    return None


def write_split(
    root: PathLike, split: str, sentences: Mapping[str, Iterable[str]], *, compress: bool = True
) -> dict[str, Path]:
    """Write ``sentences[lang]`` as ``{root}/{split}.{lang}[.gz]``, one sentence a line (creates ``root``).

    The inverse of :func:`load_split`, for building small corpora (tests, examples). Sentences must not
    contain newlines. Returns the file written for each language.
    """
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for lang, lines in sentences.items():
        lines = list(lines)
        for number, line in enumerate(lines, start=1):
            if "\n" in line:
                raise ValueError(f"sentences[{lang!r}][{number - 1}] contains a newline: one sentence a line")
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        target = folder / (f"{split}.{lang}" + (_GZ if compress else ""))
        target.write_bytes(gzip.compress(data, mtime=0) if compress else data)
        written[lang] = target
    return written
