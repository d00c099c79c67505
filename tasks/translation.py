"""Translation between two languages of the corpus, in one or both directions.

Sequence layout (the convention of every task, see ``lightning_moe.data.examples``): the source is
``[<2tgt>] + source tokens + [</s>]`` -- the *target*-language tag is the first source token, so one
encoder-decoder serves every direction -- and the decoder starts with ``<s>`` (it gets no tag), reading
``[<s>] + target tokens`` and predicting ``target tokens + [</s>]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_moe.data.examples import Example, TokenizedCorpus
from lightning_moe.data.tokenizer import EOS_ID, SubwordTokenizer
from lightning_moe.tasks.base import Task, TaskStream
from lightning_moe.tasks.registry import register_task

__all__ = ["TranslationTaskConfig", "TranslationTask", "TranslationStream", "translation_label"]


def translation_label(src: str, tgt: str) -> str:
    """Stream label of a direction: ``("en", "de")`` -> ``"translate:en-de"``."""
    return f"translate:{src}-{tgt}"


@dataclass
class TranslationTaskConfig:
    """Options of the ``translation`` task."""

    src_lang: str = "en"
    """Source language code (a language of the corpus)."""
    tgt_lang: str = "de"
    """Target language code (a language of the corpus, different from ``src_lang``)."""
    bidirectional: bool = True
    """Also train ``tgt_lang -> src_lang`` (a second stream)."""

    def __post_init__(self) -> None:
        for key in ("src_lang", "tgt_lang"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"translation.{key}={value!r} is invalid: use a language code such as 'en'")
        if self.src_lang == self.tgt_lang:
            raise ValueError(
                f"translation.src_lang and tgt_lang are both {self.src_lang!r}: use two different languages "
                f"(for same-language training use the 'denoising' task)"
            )
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"translation.bidirectional={self.bidirectional!r} is invalid: use true or false")


class TranslationStream(TaskStream):
    """Sentence pairs ``src -> tgt`` of a tokenized corpus.

    Arguments:
        corpus: the tokenized corpus (must hold both languages).
        src, tgt: the direction.
        tokenizer: gives the target-language tag.
        with_text: put the raw source and reference sentences into each example (evaluation).
    """

    def __init__(
        self, corpus: TokenizedCorpus, src: str, tgt: str, tokenizer: SubwordTokenizer, with_text: bool = False
    ) -> None:
        corpus.check_lang(src, "src_lang")
        corpus.check_lang(tgt, "tgt_lang")
        self.corpus, self.src, self.tgt = corpus, src, tgt
        self.name = translation_label(src, tgt)
        self.tag_id = tokenizer.lang_tag_id(tgt)
        self.with_text = with_text
        # [N] source = tag + tokens + eos; decoder side = tokens + 1
        self._lengths = np.maximum(corpus.lengths(src) + 2, corpus.lengths(tgt) + 1)

    def __len__(self) -> int:
        return len(self.corpus)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def example(self, index: int, epoch: int = 0) -> Example:
        source = [self.tag_id, *self.corpus.ids(self.src, index).tolist(), EOS_ID]
        target = self.corpus.ids(self.tgt, index).tolist()
        if self.with_text:
            return Example(
                source,
                target,
                self.name,
                src_text=self.corpus.text[self.src][index],
                ref_text=self.corpus.text[self.tgt][index],
            )
        return Example(source, target, self.name)


@register_task("translation")
class TranslationTask(Task):
    """Translation ``src_lang -> tgt_lang`` (and back, with ``bidirectional``)."""

    config_class = TranslationTaskConfig
    config: TranslationTaskConfig

    def directions(self) -> list[tuple[str, str]]:
        """``(src, tgt)`` pairs trained, in stream order."""
        pairs = [(self.config.src_lang, self.config.tgt_lang)]
        if self.config.bidirectional:
            pairs.append((self.config.tgt_lang, self.config.src_lang))
        return pairs

    def langs(self) -> tuple[str, ...]:
        return (self.config.src_lang, self.config.tgt_lang)

    def stream_names(self) -> list[str]:
        return [translation_label(s, t) for s, t in self.directions()]

    def streams(self, corpus: TokenizedCorpus, tokenizer: SubwordTokenizer, seed: int = 0) -> list[TaskStream]:
        return [TranslationStream(corpus, s, t, tokenizer) for s, t in self.directions()]

    def eval_streams(self, corpus: TokenizedCorpus, tokenizer: SubwordTokenizer) -> list[TaskStream]:
        return [TranslationStream(corpus, s, t, tokenizer, with_text=True) for s, t in self.directions()]
