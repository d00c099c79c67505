"""A shared subword vocabulary for every language of the corpus, trained with sentencepiece and cached.

Ids of the special tokens are fixed, so a model can rely on them without reading the tokenizer::

    0 <pad>   1 <unk>   2 <s> (BOS)   3 </s> (EOS)   4 <mask>   5... <2xx>, one per language, in the order given

``<2xx>`` is a *target-language tag*: tasks put it first in the source sequence to say which language the
decoder must produce (see ``lightning_moe.tasks``). ``<mask>`` and the tags are sentencepiece
``user_defined_symbols``: they are single pieces even when they occur in raw text.

:func:`build_tokenizer` trains a model on the given sentences, or loads it from the cache: the cache key is a
SHA-256 of the training text itself (every sentence of every language, in order) and of the training options
(languages, vocabulary size, model type, character coverage), so a changed corpus, a cut to the first N
sentences or a changed option trains a new model while an unchanged one is loaded. Model files are written
atomically (temporary file + ``os.replace``) under a file lock, so processes that build the same tokenizer at
once train it once (the others wait and load it): calling it on every rank is safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lightning_moe.data.download import cache_lock

__all__ = [
    "MODEL_TYPES",
    "PAD_ID",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "MASK_ID",
    "MASK_TOKEN",
    "SubwordTokenizer",
    "build_tokenizer",
    "lang_tag",
    "tokenizer_cache_key",
]

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_TOKEN = "<mask>"
MODEL_TYPES = ("unigram", "bpe")
"""sentencepiece model types that :func:`build_tokenizer` accepts."""

_CACHE_FORMAT = "lightning_moe-spm-v1"  # bump when the training recipe changes, to invalidate old caches
_WORD_BOUNDARY = "\u2581"  # sentencepiece's whitespace marker, first character of a word-initial piece


def lang_tag(lang: str) -> str:
    """The target-language tag piece of ``lang``: ``"de"`` -> ``"<2de>"``."""
    return f"<2{lang}>"


class SubwordTokenizer:
    """A sentencepiece model with fixed special ids, a ``<mask>`` token and target-language tags.

    Picklable (DataLoader workers receive a copy). Build one with :func:`build_tokenizer`,
    :meth:`train` or :meth:`load`.

    Arguments:
        model_proto: the serialized sentencepiece model.
    """

    def __init__(self, model_proto: bytes) -> None:
        self._proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except RuntimeError as err:  # sentencepiece's parser rejects bytes that are not a model
            raise ValueError(
                f"model_proto ({len(self._proto)} bytes) is not a sentencepiece model"
                f" ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
            ) from None
        self.from_cache = False
        """True when :func:`build_tokenizer` loaded this model from its cache instead of training it."""
        expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>", MASK_ID: MASK_TOKEN}
        for index, piece in expected.items():
            if index >= self._sp.get_piece_size() or self._sp.id_to_piece(index) != piece:
                raise ValueError(
                    f"model_proto is not a lightning_moe tokenizer: id {index} should be {piece!r}; "
                    f"train it with SubwordTokenizer.train or build_tokenizer"
                )
        langs = []
        for index in range(MASK_ID + 1, self._sp.get_piece_size()):
            piece = self._sp.id_to_piece(index)
            if not (piece.startswith("<2") and piece.endswith(">") and self._sp.is_control(index) is False):
                break
            langs.append(piece[2:-1])
        self._langs = tuple(langs)
        self._tag_ids = {lang: MASK_ID + 1 + i for i, lang in enumerate(langs)}
        self._special = np.zeros(self.vocab_size, dtype=bool)
        self._special[[PAD_ID, BOS_ID, EOS_ID, MASK_ID, *self._tag_ids.values()]] = True
        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        # [V] True where a piece begins a word; special tokens are words of their own
        self._word_start = np.array([p.startswith(_WORD_BOUNDARY) for p in pieces], dtype=bool) | self._special

    # ------------------------------------------------------------------ construction and storage
    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        langs: Sequence[str],
        vocab_size: int = 8000,
        *,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        num_threads: int | None = None,
    ) -> SubwordTokenizer:
        """Train a model on ``sentences`` (all languages mixed) with a tag for each of ``langs``.

        Raises:
            ValueError: invalid options, or a ``vocab_size`` the text cannot fill (the message says so).
        """
        langs = _check_langs(langs)
        _check_options(vocab_size, model_type, character_coverage, len(langs))
        writer = _BytesSink()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=writer,
                model_type=model_type,
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_piece="<pad>",
                unk_piece="<unk>",
                bos_piece="<s>",
                eos_piece="</s>",
                user_defined_symbols=[MASK_TOKEN, *(lang_tag(lang) for lang in langs)],
                num_threads=num_threads or max(1, min(os.cpu_count() or 1, 16)),
                minloglevel=2,
            )
        except RuntimeError as err:
            raise ValueError(
                f"sentencepiece could not train vocab_size={vocab_size} ({model_type}) on this text: "
                f"{str(err).rstrip('.')}. "
                f"Lower vocab_size (or give more text)"
            ) from err
        return cls(writer.data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubwordTokenizer:
        """Load a model file written by :meth:`save`."""
        return cls(Path(path).read_bytes())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
        return _atomic_write(Path(path), self._proto)

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model."""
        return self._proto

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "from_cache": self.from_cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"])  # type: ignore[misc]
        self.from_cache = state["from_cache"]

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids (size of the model's embedding and output layers)."""
        return self._sp.get_piece_size()

    pad_id = property(lambda self: PAD_ID, doc="Id of ``<pad>`` (0).")
    unk_id = property(lambda self: UNK_ID, doc="Id of ``<unk>`` (1).")
    bos_id = property(lambda self: BOS_ID, doc="Id of ``<s>``, the first decoder input (2).")
    eos_id = property(lambda self: EOS_ID, doc="Id of ``</s>``, which ends sources and targets (3).")
    mask_id = property(lambda self: MASK_ID, doc="Id of ``<mask>``, which replaces a masked span (4).")

    @property
    def langs(self) -> tuple[str, ...]:
        """Languages that have a tag, in id order."""
        return self._langs

    def lang_tag_id(self, lang: str) -> int:
        """Id of the target-language tag ``<2{lang}>``."""
        try:
            return self._tag_ids[lang]
        except KeyError:
            raise ValueError(f"lang={lang!r} has no tag in this tokenizer: use one of {list(self._langs)}") from None

    def id_to_piece(self, index: int) -> str:
        """The piece of an id."""
        return self._sp.id_to_piece(int(index))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (``unk_id`` if the piece is not in the vocabulary)."""
        return self._sp.piece_to_id(piece)

    @property
    def word_start(self) -> np.ndarray:
        """``[vocab_size]`` bool: True for pieces that begin a word (and for special tokens)."""
        return self._word_start

    def is_special(self, index: int) -> bool:
        """True for pad, BOS, EOS, ``<mask>`` and language tags."""
        return bool(self._special[index])

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text``, without BOS/EOS or tags."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """:meth:`encode` for many texts (sentencepiece's own threads; -1 = all cores)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``.

        With ``skip_special_tokens`` (default) everything from the first EOS on is cut, and pad, BOS,
        ``<mask>`` and language tags are left out, so a generated sequence decodes to its plain sentence.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            if EOS_ID in ids:
                ids = ids[: ids.index(EOS_ID)]
            ids = [i for i in ids if not self._special[i]]
        return self._sp.decode(ids)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` for many sequences (a ``[B, T]`` tensor works too)."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __repr__(self) -> str:
        return f"SubwordTokenizer(vocab_size={self.vocab_size}, langs={list(self._langs)})"


class _BytesSink:
    """The ``model_writer`` sentencepiece writes the trained model into."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _check_langs(langs: Sequence[str]) -> tuple[str, ...]:
    if isinstance(langs, str):
        raise ValueError(f"langs={langs!r} is a string: pass a list of language codes, e.g. ['en', 'de']")
    langs = tuple(langs)
    if not langs or len(set(langs)) != len(langs) or not all(isinstance(x, str) and x for x in langs):
        raise ValueError(f"langs={list(langs)} is invalid: pass distinct, non-empty language codes")
    return langs


def _check_options(vocab_size: int, model_type: str, character_coverage: float, num_langs: int) -> None:
    smallest = MASK_ID + 1 + num_langs + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size!r} is invalid: use an integer >= {smallest} (5 special ids + a tag per language)"
        )
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is invalid: use one of {list(MODEL_TYPES)}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage={character_coverage!r} is invalid: use a number in (0, 1]")


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def tokenizer_cache_key(
    sentences: Mapping[str, Sequence[str]],
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> str:
    """SHA-256 hex digest of the training text (per language, in order) and the training options."""
    digest = hashlib.sha256()
    header = f"{_CACHE_FORMAT}\0{list(sentences)}\0{vocab_size}\0{model_type}\0{character_coverage!r}\0"
    digest.update(header.encode("utf-8"))
    for lang, lines in sentences.items():
        digest.update(f"\0lang={lang}\0{len(lines)}\0".encode())
        for line in lines:
            digest.update(line.encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


def build_tokenizer(
    sentences: Mapping[str, Sequence[str]],
    cache_dir: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    num_threads: int | None = None,
) -> SubwordTokenizer:
    """Load the tokenizer trained on ``sentences`` from ``cache_dir``, or train and cache it.

    Arguments:
        sentences: training sentences per language (usually the train split); the keys, in order, are the
            languages that get a tag.
        cache_dir: folder of cached models; the model goes to ``{cache_dir}/tokenizers/spm-<key>.model``.
        vocab_size: size of the shared vocabulary, special tokens included (default 8000).
        model_type: ``"unigram"`` (default) or ``"bpe"``.
        character_coverage: fraction of characters the vocabulary covers (1.0 = every character seen).
        num_threads: training threads (None = the machine's cores, at most 16).

    Returns:
        The tokenizer; its ``from_cache`` says whether it was loaded rather than trained.
    """
    langs = _check_langs(list(sentences))
    _check_options(vocab_size, model_type, character_coverage, len(langs))
    key = tokenizer_cache_key(sentences, vocab_size, model_type, character_coverage)
    path = Path(cache_dir).expanduser() / "tokenizers" / f"spm-{model_type}-{vocab_size}-{key[:24]}.model"
    cached = _load_cached(path, langs, vocab_size)
    if cached is not None:
        return cached
    with cache_lock(path):  # other processes wait here, then load what the first one trained
        cached = _load_cached(path, langs, vocab_size)
        if cached is not None:
            return cached
        tokenizer = _train(sentences, langs, vocab_size, model_type, character_coverage, num_threads)
        tokenizer.save(path)
    return tokenizer


def _load_cached(path: Path, langs: tuple[str, ...], vocab_size: int) -> SubwordTokenizer | None:
    if not path.is_file():
        return None
    try:
        tokenizer = SubwordTokenizer.load(path)
    except (ValueError, RuntimeError, OSError) as err:  # an unreadable cache entry: train again
        log.warning("ignoring unreadable cached tokenizer %s: %s", path, err)
        return None
    if tokenizer.langs != langs or tokenizer.vocab_size != vocab_size:
        log.warning("cached tokenizer %s does not match its key: training again", path)
        return None
    tokenizer.from_cache = True
    return tokenizer


def _train(
    sentences: Mapping[str, Sequence[str]],
    langs: tuple[str, ...],
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    num_threads: int | None,
) -> SubwordTokenizer:
    sizes = {lang: len(lines) for lang, lines in sentences.items()}
    log.info("training a %d-piece %s tokenizer on %s sentences", vocab_size, model_type, sizes)
    corpus = (line for lines in sentences.values() for line in lines)
    return SubwordTokenizer.train(
        corpus,
        langs,
        vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        num_threads=num_threads,
    )
