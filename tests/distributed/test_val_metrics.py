"""Validation BLEU/chrF under several ranks: every rank scores the sentences of all ranks, so the logged
scores are sacrebleu's on the whole validation output (not an average of per-rank scores)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sacrebleu

from lightning_moe.metrics import corpus_scores
from tests.distributed.harness import run_ranks
from tests.unit.test_module_metrics import HYPOTHESES, REFERENCES, _module

pytestmark = pytest.mark.distributed


def _rank(rank: int, world_size: int) -> tuple[list, float, float]:
    module = _module()
    module._trainer = SimpleNamespace(world_size=world_size)  # all _gather_pairs reads of the trainer
    mine = list(zip(HYPOTHESES, REFERENCES))[rank::world_size]  # uneven shares with 4 ranks
    if rank == world_size - 1:
        mine = []  # a rank with only repeated (not scored) batches still joins the collective
    pairs = module._gather_pairs({"en-de": mine, "en-fr": mine[:1]})
    hypotheses, references = zip(*pairs["en-de"])
    scores = corpus_scores(hypotheses, references)
    return sorted(pairs["en-de"]), scores.bleu, scores.chrf


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_scores_all_ranks_sentences(world_size):
    results = run_ranks(_rank, world_size)
    kept = [pair for rank, pair in enumerate(zip(HYPOTHESES, REFERENCES)) if rank % world_size != world_size - 1]
    hypotheses, references = zip(*kept)
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score
    for pairs, rank_bleu, rank_chrf in results:
        assert pairs == sorted(kept)
        assert rank_bleu == pytest.approx(bleu) and rank_chrf == pytest.approx(chrf)
