"""mBART-style denoising auto-encoding: rebuild a clean sentence from a noised copy in the same language.

Noise, in this order, over *units* (whole words by default: a word is a piece starting with sentencepiece's
``▁`` plus the pieces that follow it; with ``whole_words=False`` every subword token is a unit):

1. **Text infilling** (BART/mBART): span lengths are drawn from Poisson(``poisson_lambda``) (at least 1) until
   they cover ``mask_ratio`` of the units (the count is rounded stochastically, so the expected fraction is
   exactly ``mask_ratio`` also for short sentences); the spans are placed at random without overlapping and
   each span is replaced by a single ``<mask>``. (BART also inserts masks for zero-length spans; this does not.)
2. **Token deletion**: every remaining unmasked unit is dropped with probability ``delete_prob``.
3. **Local permutation**: the remaining items (units and masks) are shuffled so that none moves more than
   ``permute_window`` positions (sort by ``position + U(0, permute_window + 1)``, Lample et al. 2018).

The source is ``[<2lang>] + noised tokens + [</s>]``, the target the clean sentence (the task convention of
``lightning_moe.data.examples``). Noise is a pure function of ``(seed, epoch, stream, index)``: the same on
every run, rank and DataLoader worker, different between epochs.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from lightning_moe.data.examples import Example, TokenizedCorpus
from lightning_moe.data.tokenizer import EOS_ID, MASK_ID, SubwordTokenizer
from lightning_moe.tasks.base import Task, TaskStream
from lightning_moe.tasks.registry import register_task

__all__ = [
    "DenoisingTaskConfig",
    "DenoisingTask",
    "DenoisingStream",
    "NoiseResult",
    "add_noise",
    "denoising_label",
    "split_units",
]


def denoising_label(lang: str) -> str:
    """Stream label of a language: ``"fr"`` -> ``"denoise:fr"``."""
    return f"denoise:{lang}"


@dataclass
class DenoisingTaskConfig:
    """Options of the ``denoising`` task."""

    langs: list[str] = field(default_factory=lambda: ["en"])
    """Languages to denoise; each gets its own stream ``denoise:<lang>``."""
    mask_ratio: float = 0.35
    """Expected fraction of units covered by masked spans, in [0, 1)."""
    poisson_lambda: float = 3.5
    """Mean of the Poisson distribution of span lengths (in units), > 0."""
    whole_words: bool = True
    """Units are whole words (True) or single subword tokens (False)."""
    permute_window: int = 3
    """Largest distance an item may move in the local shuffle; 0 turns the shuffle off (as in mBART)."""
    delete_prob: float = 0.0
    """Probability of deleting each unmasked unit, in [0, 1); 0 turns deletion off."""

    def __post_init__(self) -> None:
        if isinstance(self.langs, str) or not self.langs or not all(isinstance(x, str) and x for x in self.langs):
            raise ValueError(f"denoising.langs={self.langs!r} is invalid: use a list of language codes, e.g. [en, de]")
        if len(set(self.langs)) != len(self.langs):
            raise ValueError(f"denoising.langs={list(self.langs)} repeats a language: list each once")
        self.langs = list(self.langs)
        _check_fraction("denoising.mask_ratio", self.mask_ratio)
        _check_fraction("denoising.delete_prob", self.delete_prob)
        if (
            isinstance(self.poisson_lambda, bool)
            or not isinstance(self.poisson_lambda, (int, float))
            or not (0 < self.poisson_lambda < math.inf)
        ):
            raise ValueError(f"denoising.poisson_lambda={self.poisson_lambda!r} is invalid: use a number > 0")
        if isinstance(self.permute_window, bool) or not isinstance(self.permute_window, int) or self.permute_window < 0:
            raise ValueError(f"denoising.permute_window={self.permute_window!r} is invalid: use an integer >= 0")
        if not isinstance(self.whole_words, bool):
            raise ValueError(f"denoising.whole_words={self.whole_words!r} is invalid: use true or false")


def _check_fraction(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}={value!r} is invalid: use a number in [0, 1)")


def split_units(ids: np.ndarray, word_start: np.ndarray, whole_words: bool = True) -> list[np.ndarray]:
    """Split ``[n]`` ids into units: words (a word-start piece and its continuation pieces) or single tokens."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return []
    if not whole_words:
        return [ids[i : i + 1] for i in range(ids.size)]
    starts = np.flatnonzero(word_start[ids])  # positions that begin a word
    cuts = starts[starts > 0]  # the first token begins a unit even when it is a continuation piece
    return np.split(ids, cuts)


@dataclass(frozen=True)
class NoiseResult:
    """Output of :func:`add_noise`.

    Attributes:
        ids: the noised token ids (no tag, no EOS).
        num_units: units of the clean sentence.
        num_masked: units covered by masked spans.
        num_spans: spans (= ``<mask>`` tokens written).
        num_deleted: units deleted.
    """

    ids: list[int]
    num_units: int
    num_masked: int
    num_spans: int
    num_deleted: int


def add_noise(
    ids: np.ndarray,
    word_start: np.ndarray,
    config: DenoisingTaskConfig,
    rng: np.random.Generator,
    mask_id: int = MASK_ID,
) -> NoiseResult:
    """Noise one sentence (``[n]`` ids without tag/EOS) as described in the module docstring."""
    units = split_units(ids, word_start, config.whole_words)
    n = len(units)
    # 1. text infilling: how many units to mask, in spans of Poisson lengths
    num_masked = min(n, int(math.floor(config.mask_ratio * n + rng.random()))) if n else 0
    span_lengths: list[int] = []
    if num_masked:
        draws = np.maximum(rng.poisson(config.poisson_lambda, size=num_masked), 1)  # enough: each span >= 1
        cumulative = np.cumsum(draws)
        count = int(np.searchsorted(cumulative, num_masked)) + 1  # spans needed to reach num_masked
        span_lengths = draws[:count].tolist()
        span_lengths[-1] -= int(cumulative[count - 1]) - num_masked  # trim the last span to hit the count
    # place the spans among the unmasked units: choose which of the (free + spans) slots hold a span
    free = n - num_masked
    slots = np.zeros(free + len(span_lengths), dtype=bool)
    if span_lengths:
        slots[rng.choice(slots.size, size=len(span_lengths), replace=False)] = True
    items: list[object] = []  # a unit (np.ndarray) or None for a <mask>
    unit, span = 0, 0
    for is_span in slots.tolist():
        if is_span:
            items.append(None)
            unit += span_lengths[span]
            span += 1
        else:
            items.append(units[unit])
            unit += 1
    # 2. deletion of unmasked units
    deleted = 0
    if config.delete_prob > 0 and items:
        drop = rng.random(len(items)) < config.delete_prob
        kept = []
        for item, gone in zip(items, drop.tolist()):
            if gone and item is not None:
                deleted += 1
            else:
                kept.append(item)
        items = kept
    # 3. local permutation: no item moves more than permute_window places
    if config.permute_window > 0 and len(items) > 1:
        keys = np.arange(len(items)) + rng.uniform(0.0, config.permute_window + 1, size=len(items))
        items = [items[j] for j in np.argsort(keys, kind="stable")]
    out: list[int] = []
    for item in items:
        if item is None:
            out.append(mask_id)
        else:
            out.extend(item.tolist())  # type: ignore[attr-defined]
    return NoiseResult(out, n, num_masked, len(span_lengths), deleted)


class DenoisingStream(TaskStream):
    """Noised -> clean sentences of one language.

    Arguments:
        corpus: the tokenized corpus (must hold ``lang``).
        lang: the language.
        tokenizer: gives the language tag and the word starts.
        config: the noise options.
        seed: base seed of the noise.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        lang: str,
        tokenizer: SubwordTokenizer,
        config: DenoisingTaskConfig,
        seed: int = 0,
    ) -> None:
        corpus.check_lang(lang, "denoising.langs")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: use an integer >= 0")
        self.corpus, self.lang, self.config, self.seed = corpus, lang, config, seed
        self.name = denoising_label(lang)
        self.tag_id = tokenizer.lang_tag_id(lang)
        self.word_start = tokenizer.word_start
        self._stream_key = zlib.crc32(self.name.encode("utf-8"))
        # [N] noise never lengthens: source <= tag + n + eos, decoder side = n + 1
        self._lengths = corpus.lengths(lang) + 2

    def __len__(self) -> int:
        return len(self.corpus)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def rng(self, index: int, epoch: int = 0) -> np.random.Generator:
        """The generator of example ``index`` in ``epoch``."""
        return np.random.default_rng([self.seed, epoch, self._stream_key, index])

    def noise(self, index: int, epoch: int = 0) -> NoiseResult:
        """The noise of example ``index`` in ``epoch``, with its statistics."""
        return add_noise(self.corpus.ids(self.lang, index), self.word_start, self.config, self.rng(index, epoch))

    def example(self, index: int, epoch: int = 0) -> Example:
        noised = self.noise(index, epoch)
        source = [self.tag_id, *noised.ids, EOS_ID]
        return Example(source, self.corpus.ids(self.lang, index).tolist(), self.name)


@register_task("denoising")
class DenoisingTask(Task):
    """Denoising auto-encoding in each of ``langs``."""

    config_class = DenoisingTaskConfig
    config: DenoisingTaskConfig

    def langs(self) -> tuple[str, ...]:
        return tuple(self.config.langs)

    def stream_names(self) -> list[str]:
        return [denoising_label(lang) for lang in self.config.langs]

    def streams(self, corpus: TokenizedCorpus, tokenizer: SubwordTokenizer, seed: int = 0) -> list[TaskStream]:
        return [DenoisingStream(corpus, lang, tokenizer, self.config, seed) for lang in self.config.langs]
