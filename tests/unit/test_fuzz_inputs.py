"""Bad input, tried systematically (hypothesis): random bytes, huge lines, NULs, mixed newlines and empty
files into the corpus reader, the tokenizer, the ``key=value`` parsers and the translate command. Every
outcome is a result or a clear error (the documented type, one line), never another exception or a hang.

The examples are derandomised (the same ones on every run) and the counts are fixed (``EXAMPLES``), so
the test time stays bounded; the README's reliability paragraph quotes these counts.
"""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_moe.data.corpus import CorpusError, load_split

#: Examples per fuzzed entry point (the README quotes these).
EXAMPLES = {
    "corpus": 150,
    "tokenizer_bytes": 100,
    "tokenizer_text": 150,
    "cli_args": 200,
    "train_args": 60,
    "translate": 40,
}

_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
}

# lines built from the troublesome pieces: NUL, lone CR, CRLF, invalid UTF-8, long runs, plain words
_PIECES = st.sampled_from(
    [
        b"\x00",
        b"\r",
        b"\r\n",
        b"\n",
        b"\xff",
        b"\xc3",
        b"\xe2\x82",
        b"caf\xc3\xa9",
        b"word ",
        b"\t",
        b" ",
        b"\xef\xbb\xbf",
    ]
)
_LINEISH = st.one_of(
    st.binary(max_size=300),
    st.lists(_PIECES, max_size=60).map(b"".join),
    st.integers(min_value=10_000, max_value=200_000).map(lambda n: b"x" * n + b"\n"),  # a huge line
    st.just(b""),
)


def _one_line(message: object) -> bool:
    text = str(message)
    return bool(text.strip()) and "\n" not in text.strip()


@settings(max_examples=EXAMPLES["corpus"], **_SETTINGS)
@given(
    en=_LINEISH,
    de=_LINEISH,
    gz=st.booleans(),
    on_error=st.sampled_from(["raise", "filter"]),
    max_len=st.one_of(st.none(), st.integers(1, 50)),
)
def test_corpus_reader_returns_aligned_text_or_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, en: bytes, de: bytes, gz: bool, on_error: str, max_len: int | None
) -> None:
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.en").write_bytes(en)
    if gz:  # a gzip file whose content is random bytes, or random bytes that are no gzip at all
        (root / "train.de.gz").write_bytes(gzip.compress(de) if len(de) % 2 else de)
    else:
        (root / "train.de").write_bytes(de)
    try:
        corpus = load_split(root, "train", ["en", "de"], max_len, on_error=on_error)
    except CorpusError as err:
        assert _one_line(err), err
        return
    assert len(corpus.sentences["en"]) == len(corpus.sentences["de"]) == corpus.report.kept
    for sentences in corpus.sentences.values():
        assert all(isinstance(s, str) and "\n" not in s for s in sentences)


@pytest.fixture(scope="module")
def tokenizer():
    from lightning_moe.data.download import SAMPLE_DIR
    from lightning_moe.data.tokenizer import SubwordTokenizer

    corpus = load_split(SAMPLE_DIR, "train", ["en", "de"], max_sentences=200)
    text = [line for lang in ("en", "de") for line in corpus.sentences[lang]]
    return SubwordTokenizer.train(text, ["en", "de"], vocab_size=200, num_threads=1)


@settings(max_examples=EXAMPLES["tokenizer_bytes"], **_SETTINGS)
@given(data=st.one_of(st.binary(max_size=2000), st.just(b""), st.integers(0, 400)))
def test_tokenizer_model_bytes_load_or_fail_with_a_value_error(tokenizer, data: bytes | int) -> None:
    from lightning_moe.data.tokenizer import SubwordTokenizer

    if isinstance(data, int):  # a real model cut short, or with one byte changed
        proto = bytearray(tokenizer.model_proto)
        data = (
            bytes(proto[: data * 10])
            if data % 2
            else bytes(proto[:data] + bytes([proto[data] ^ 0xFF]) + proto[data + 1 :])
        )
    try:
        loaded = SubwordTokenizer(data)
    except ValueError as err:
        assert _one_line(err), err
        return
    assert loaded.vocab_size > 0


@settings(max_examples=EXAMPLES["tokenizer_text"], **_SETTINGS)
@given(
    text=st.one_of(
        st.text(max_size=500), st.lists(_PIECES, max_size=80).map(lambda b: b"".join(b).decode("utf-8", "replace"))
    )
)
def test_tokenizer_encodes_and_decodes_any_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert isinstance(tokenizer.decode(ids), str)


_ARG = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(["checkpoint", "beam_size", "batch_size", "input", "device", "x.y", ""]),
        st.text(max_size=30),
    ),
    st.sampled_from(
        ["beam_size=-1", "batch_size=1e999", "beam_size=[1,2", "source_lang=${oops}", "a=b=c", "=", "beam_size=\x00"]
    ),
)


@settings(max_examples=EXAMPLES["cli_args"], **_SETTINGS)
@given(args=st.lists(_ARG.filter(lambda a: a not in ("-h", "--help")), max_size=5))
def test_key_value_parser_gives_a_config_or_one_error_line(args: list[str]) -> None:
    from lightning_moe.cli import parse_args
    from lightning_moe.evaluate import EvaluateConfig
    from lightning_moe.translate import TranslateConfig

    for schema in (TranslateConfig, EvaluateConfig):
        try:
            parsed = parse_args(schema, args, "usage")
        except SystemExit as stop:
            assert isinstance(stop.code, str) and stop.code.startswith("error: ") and _one_line(stop.code), stop.code
        else:
            assert isinstance(parsed, schema)


@settings(max_examples=EXAMPLES["train_args"], **_SETTINGS)
@given(
    args=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(
                lambda g, v: f"{g}={v}",
                st.sampled_from(["model", "moe", "data", "strategy", "trainer", "tasks", "logger"]),
                st.text(max_size=20),
            ),
        ),
        max_size=4,
    )
)
def test_train_group_options_are_checked_with_a_config_error(args: list[str]) -> None:
    from lightning_moe.config import ConfigError
    from lightning_moe.config.launch import check_group_options

    try:
        check_group_options(args)
    except ConfigError as err:
        assert _one_line(err), err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_translator import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")


@settings(max_examples=EXAMPLES["translate"], **_SETTINGS)
@given(
    data=st.one_of(
        st.lists(_PIECES, max_size=40).map(b"".join),
        st.binary(max_size=200),
        st.just(b""),
        st.just(b"a" * 50_000 + b"\n"),
    )
)
def test_translate_command_translates_each_line_or_names_the_bad_one(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_moe.translate import main

    folder = tmp_path_factory.mktemp("translate")
    source, target = folder / "in.txt", folder / "out.txt"
    source.write_bytes(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    args = [
        f"checkpoint={checkpoint}",
        f"input={source}",
        f"output={target}",
        "source_lang=en",
        "target_lang=de",
        "batch_size=8",
    ]
    try:
        code = main(args)
    except SystemExit as stop:
        assert isinstance(stop.code, str) and stop.code.startswith("error: ") and _one_line(stop.code), stop.code
        assert "not valid UTF-8" in stop.code
        return
    assert code == 0
    lines_in = data.count(b"\n") + (not data.endswith(b"\n") and len(data) > 0)
    assert target.read_bytes().count(b"\n") == lines_in
