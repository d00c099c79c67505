"""Corpus BLEU and chrF exactly as the ``sacrebleu`` command prints them (its ``BLEU()``/``CHRF()``
defaults: 13a tokenization, exponential smoothing; plain chrF, no word n-grams), with their signatures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["CorpusScores", "corpus_scores"]


class CorpusScores(NamedTuple):
    """Scores in sacrebleu's 0-100 scale and the signatures that say how they were computed."""

    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> CorpusScores:
    """BLEU and chrF of ``hypotheses`` against one reference each (line-aligned)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: they must be line-aligned")
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return CorpusScores(bleu_score.score, chrf_score.score, str(bleu.get_signature()), str(chrf.get_signature()))
