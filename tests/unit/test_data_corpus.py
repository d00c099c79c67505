"""Reading line-aligned corpora: layout, alignment checks, filters and their report."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from lightning_moe.data import SAMPLE_DIR
from lightning_moe.data.corpus import (
    CorpusError,
    available_languages,
    available_splits,
    corpus_file,
    load_split,
    write_split,
)

MULTI30K = Path(os.environ.get("MULTI30K_ROOT", Path(__file__).resolve().parents[2].parent / "shared/data/multi30k"))
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "val.en.gz").is_file(), reason=f"no Multi30k copy at {MULTI30K} (set MULTI30K_ROOT)"
)


def test_round_trip_gzip_and_plain(tmp_path: Path) -> None:
    write_split(tmp_path, "train", {"en": ["a cat", "a dog"], "de": ["eine Katze", "ein Hund"]})
    write_split(tmp_path, "dev", {"en": ["hello"], "fr": ["bonjour"]}, compress=False)
    assert corpus_file(tmp_path, "train", "en") == tmp_path / "train.en.gz"
    assert corpus_file(tmp_path, "dev", "fr") == tmp_path / "dev.fr"
    assert corpus_file(tmp_path, "dev", "de") is None
    corpus = load_split(tmp_path, "train", ["de", "en"])
    assert corpus.langs == ("de", "en")
    assert corpus.sentences == {"de": ["eine Katze", "ein Hund"], "en": ["a cat", "a dog"]}
    assert corpus[1] == {"de": "ein Hund", "en": "a dog"}
    assert corpus.pairs("en", "de") == [("a cat", "eine Katze"), ("a dog", "ein Hund")]
    assert load_split(tmp_path, "dev", ["en", "fr"]).sentences["fr"] == ["bonjour"]
    assert available_splits(tmp_path) == ["dev", "train"]
    assert available_languages(tmp_path, "train") == ["de", "en"]


def test_gzip_preferred_over_plain_and_crlf_and_missing_final_newline(tmp_path: Path) -> None:
    (tmp_path / "x.en").write_bytes(b"plain\n")
    (tmp_path / "x.en.gz").write_bytes(gzip.compress(b"one\r\ntwo"))  # CRLF and no final newline
    (tmp_path / "x.de").write_bytes(b"eins\nzwei\n")
    corpus = load_split(tmp_path, "x", ["en", "de"])
    assert corpus.sentences["en"] == ["one", "two"]
    assert corpus.report.total_lines == 2


def test_mismatched_line_counts_name_both_files(tmp_path: Path) -> None:
    write_split(tmp_path, "train", {"en": ["a", "b", "c"], "de": ["x", "y"]})
    with pytest.raises(ValueError, match=r"train\.en\.gz has 3 lines but .*train\.de\.gz has 2"):
        load_split(tmp_path, "train", ["en", "de"])


def test_unknown_language_lists_available(tmp_path: Path) -> None:
    write_split(tmp_path, "train", {"en": ["a"], "de": ["b"]})
    write_split(tmp_path, "test", {"fr": ["c"]})
    with pytest.raises(ValueError, match=r"'fr'.*split 'train' are \['de', 'en'\]"):
        load_split(tmp_path, "train", ["en", "fr"])


def test_unknown_split_and_missing_root(tmp_path: Path) -> None:
    write_split(tmp_path, "train", {"en": ["a"]})
    (tmp_path / "README.md").write_text("not a corpus file")
    with pytest.raises(ValueError, match=r"split='valid'.*available splits are \['train'\]"):
        load_split(tmp_path, "valid", ["en"])
    with pytest.raises(ValueError, match="is not a folder"):
        load_split(tmp_path / "nope", "train", ["en"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"langs": []}, "langs is empty"),
        ({"langs": ["en", "en"]}, "repeats a language"),
        ({"langs": ["en"], "on_error": "skip"}, "on_error='skip'"),
        ({"langs": ["en"], "max_len_chars": 0}, "max_len_chars=0"),
        ({"langs": ["en"], "max_sentences": 0}, "max_sentences=0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    write_split(tmp_path, "train", {"en": ["a"]})
    with pytest.raises(ValueError, match=match):
        load_split(tmp_path, "train", **kwargs)


def test_invalid_utf8_raises_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "train.en").write_bytes(b"good\nbad \xff byte\nfine\n")
    (tmp_path / "train.de").write_bytes(b"gut\nschlecht\nfein\n")
    with pytest.raises(CorpusError, match=r"train\.en, line 2: not valid UTF-8"):
        load_split(tmp_path, "train", ["en", "de"])


def test_invalid_utf8_filtered_from_every_language(tmp_path: Path) -> None:
    (tmp_path / "train.en").write_bytes(b"good\nbad \xff byte\nfine\n")
    (tmp_path / "train.de").write_bytes(b"gut\nschlecht\nfein\n")
    corpus = load_split(tmp_path, "train", ["en", "de"], on_error="filter")
    assert corpus.sentences == {"en": ["good", "fine"], "de": ["gut", "fein"]}
    assert corpus.report.dropped["invalid_utf8"] == 1
    assert corpus.report.kept == 2 and corpus.report.total_lines == 3


def test_empty_and_long_lines_dropped_together_and_counted(tmp_path: Path) -> None:
    en = ["short one", "", "x" * 30, "  padded  ", "ok", "also long " * 5]
    de = ["kurz", "nicht leer", "kurz", "aufgefüllt", "   ", "kurz"]
    write_split(tmp_path, "train", {"en": en, "de": de})
    corpus = load_split(tmp_path, "train", ["en", "de"], max_len_chars=20)
    assert corpus.sentences["en"] == ["short one", "padded"]
    assert corpus.sentences["de"] == ["kurz", "aufgefüllt"]
    assert corpus.report.dropped == {"invalid_utf8": 0, "empty": 2, "too_long": 2, "too_many_tokens": 0}
    assert corpus.report.num_dropped == 4
    summary = corpus.report.summary()
    assert "kept 2 of 6" in summary and "empty=2" in summary and "too_long=2" in summary


def test_max_sentences_keeps_the_first_valid_lines(tmp_path: Path) -> None:
    write_split(tmp_path, "train", {"en": ["a", "", "c", "d", "e"], "de": ["A", "B", "C", "D", "E"]})
    corpus = load_split(tmp_path, "train", ["en", "de"], max_sentences=2)
    assert corpus.sentences["de"] == ["A", "C"]
    assert corpus.report.truncated == 2 and corpus.report.dropped["empty"] == 1


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "train.en.gz").write_bytes(gzip.compress(b"a\nb\n")[:-6])
    with pytest.raises(CorpusError, match=r"cannot read .*train\.en\.gz"):
        load_split(tmp_path, "train", ["en"])


@needs_multi30k
def test_multi30k_layout_and_sizes() -> None:
    assert available_languages(MULTI30K, "test_2017_flickr") == ["de", "en", "fr"]
    assert available_languages(MULTI30K, "val") == ["cs", "de", "en", "fr"]
    corpus = load_split(MULTI30K, "val", ["en", "de", "fr", "cs"])
    assert len(corpus) == 1014 and corpus.report.num_dropped == 0
    assert corpus.sentences["en"][0].startswith("A group of men")
    with pytest.raises(ValueError, match=r"'cs'.*\['de', 'en', 'fr'\]"):
        load_split(MULTI30K, "test_2017_flickr", ["en", "cs"])


def test_embedded_sample_is_aligned() -> None:
    sizes = {"train": 3000, "val": 300, "test_2016_flickr": 300}
    assert available_splits(SAMPLE_DIR) == sorted(sizes)
    for split, n in sizes.items():
        corpus = load_split(SAMPLE_DIR, split, ["en", "de", "fr"])
        assert len(corpus) == n and corpus.report.num_dropped == 0


@needs_multi30k
def test_embedded_sample_is_a_prefix_of_multi30k() -> None:
    for split in ("train", "val", "test_2016_flickr"):
        sample = load_split(SAMPLE_DIR, split, ["en", "de", "fr"])
        full = load_split(MULTI30K, split, ["en", "de", "fr"], max_sentences=len(sample))
        assert sample.sentences == full.sentences
