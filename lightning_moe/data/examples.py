"""The unit of training data and the tokenized corpus that tasks draw it from.

An :class:`Example` is one (source, target) pair of id sequences with its task label. Conventions shared by
every task (and relied on by the collate function and the model):

- ``source_ids`` = ``[<2xx>] + tokens + [</s>]``: the first token is the tag of the language the decoder must
  produce, the last is EOS.
- ``target_ids`` = the target tokens only, without BOS or EOS. The collate function builds the decoder input
  ``[<s>] + target_ids`` and the decoder output ``target_ids + [</s>]`` from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_moe.data.corpus import ParallelCorpus
from lightning_moe.data.tokenizer import SubwordTokenizer

__all__ = ["Example", "TokenizedCorpus", "OVERFLOW"]

OVERFLOW = ("drop", "truncate")
"""What :meth:`TokenizedCorpus.build` does with a sentence over the token limit."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    Attributes:
        source_ids: encoder input, ``[tag] + tokens + [eos]``.
        target_ids: target tokens without BOS/EOS.
        task: the stream it came from, e.g. ``"translate:en-de"`` or ``"denoise:fr"``.
        src_text: the raw source sentence (evaluation examples only).
        ref_text: the raw reference sentence, for BLEU (evaluation examples only).
        is_repeat: True when the sampler repeated this example only to give every rank the same number
            of batches; evaluation metrics should skip it.
    """

    source_ids: Sequence[int]
    target_ids: Sequence[int]
    task: str
    src_text: str | None = None
    ref_text: str | None = None
    is_repeat: bool = False


@dataclass
class TokenizedCorpus:
    """A :class:`ParallelCorpus` encoded once with the shared tokenizer, stored compactly.

    The ids of every sentence of a language live in one flat ``int32`` array with offsets, so forked
    DataLoader workers share them without copying Python objects.

    Attributes:
        split: the split name.
        langs: languages, in corpus order.
        text: the raw sentences per language (``text[lang][i]``).
        dropped_too_long: rows dropped because a sentence exceeded the token limit (``overflow="drop"``).
        truncated: sentences cut to the token limit (``overflow="truncate"``).
    """

    split: str
    langs: tuple[str, ...]
    text: dict[str, list[str]]
    _flat: dict[str, np.ndarray] = field(repr=False)  # [total tokens] int32 per language
    _offsets: dict[str, np.ndarray] = field(repr=False)  # [rows + 1] int64 per language
    dropped_too_long: int = 0
    truncated: int = 0

    @classmethod
    def build(
        cls,
        corpus: ParallelCorpus,
        tokenizer: SubwordTokenizer,
        max_tokens: int | None = None,
        overflow: str = "drop",
    ) -> TokenizedCorpus:
        """Encode every sentence of ``corpus``.

        Arguments:
            corpus: the sentences.
            tokenizer: the shared tokenizer.
            max_tokens: the most subword tokens a sentence may have (None = no limit). With tag/BOS and
                EOS added, sequences are at most ``max_tokens + 2`` long.
            overflow: ``"drop"`` removes a row whose sentence is too long in any language from every
                language (training); ``"truncate"`` cuts the ids and keeps the row (evaluation, where the
                test set must stay whole; the raw text is kept uncut).
        """
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow={overflow!r} is invalid: use one of {list(OVERFLOW)}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r} is invalid: use a positive integer or None")
        encoded = {lang: tokenizer.encode_batch(corpus.sentences[lang]) for lang in corpus.langs}
        keep = list(range(len(corpus)))
        dropped = truncated = 0
        if max_tokens is not None and overflow == "drop":
            keep = [i for i in keep if all(len(encoded[lang][i]) <= max_tokens for lang in corpus.langs)]
            dropped = len(corpus) - len(keep)
        text: dict[str, list[str]] = {}
        flat: dict[str, np.ndarray] = {}
        offsets: dict[str, np.ndarray] = {}
        for lang in corpus.langs:
            rows = []
            for i in keep:
                ids = encoded[lang][i]
                if max_tokens is not None and len(ids) > max_tokens:
                    ids = ids[:max_tokens]
                    truncated += 1
                rows.append(ids)
            lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
            offsets[lang] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            flat[lang] = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
            text[lang] = [corpus.sentences[lang][i] for i in keep]
        return cls(corpus.split, corpus.langs, text, flat, offsets, dropped, truncated)

    def __len__(self) -> int:
        return len(self._offsets[self.langs[0]]) - 1 if self.langs else 0

    def check_lang(self, lang: str, name: str = "lang") -> None:
        """Raise a ``ValueError`` naming ``name`` if ``lang`` is not a language of this corpus."""
        if lang not in self._flat:
            raise ValueError(
                f"{name}={lang!r} is not a language of the {self.split!r} corpus: use one of {list(self.langs)}"
            )

    def ids(self, lang: str, index: int) -> np.ndarray:
        """``[n]`` int32 ids of sentence ``index`` in ``lang`` (a view; do not modify)."""
        offsets = self._offsets[lang]
        return self._flat[lang][offsets[index] : offsets[index + 1]]

    def lengths(self, lang: str) -> np.ndarray:
        """``[rows]`` token count of every sentence of ``lang``."""
        return np.diff(self._offsets[lang])
