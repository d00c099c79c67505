"""Denoising noise: mask ratio, span lengths, structure, local shuffle, deletion, reproducibility."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lightning_moe.data.corpus import CorpusReport, ParallelCorpus
from lightning_moe.data.examples import TokenizedCorpus
from lightning_moe.data.tokenizer import EOS_ID, MASK_ID, SubwordTokenizer
from lightning_moe.tasks import DenoisingTask, DenoisingTaskConfig, add_noise, build_task, split_units

TOKENS = np.arange(10, 400)  # distinct ids, none special
ALL_START = np.ones(400, dtype=bool)  # every token starts a word: units = tokens


def cfg(**kwargs) -> DenoisingTaskConfig:
    base = {"mask_ratio": 0.35, "permute_window": 0, "delete_prob": 0.0}
    return DenoisingTaskConfig(**{**base, **kwargs})


def rng(i: int) -> np.random.Generator:
    return np.random.default_rng([123, i])


def test_mask_ratio_is_35_percent_on_average() -> None:
    masked = units = 0
    for i in range(3000):
        n = 1 + i % 25  # short sentences too: stochastic rounding keeps the expectation
        result = add_noise(TOKENS[:n], ALL_START, cfg(), rng(i))
        masked += result.num_masked
        units += result.num_units
        assert result.ids.count(MASK_ID) == result.num_spans <= result.num_masked
    assert abs(masked / units - 0.35) < 0.01


def test_span_lengths_follow_poisson_mean() -> None:
    lengths = []
    for i in range(300):
        result = add_noise(TOKENS[:300], ALL_START, cfg(), rng(i))
        lengths.append(result.num_masked / result.num_spans)
    # max(1, Poisson(3.5)) has mean 3.5 + P(0) = 3.53; trimming the last span lowers it a little
    assert 3.2 < float(np.mean(lengths)) < 3.7


def test_each_mask_replaces_a_contiguous_span() -> None:
    for i in range(200):
        n = 5 + i % 30
        clean = TOKENS[:n]
        result = add_noise(clean, ALL_START, cfg(), rng(i))
        # independent check: the output, with every <mask> read as "one or more tokens", matches the input
        pattern = "".join(r"(?:\d+ )+" if t == MASK_ID else f"{t} " for t in result.ids)
        assert re.fullmatch(pattern, "".join(f"{t} " for t in clean)), (clean.tolist(), result.ids)
        assert len(result.ids) == n - result.num_masked + result.num_spans


def test_whole_words_are_masked_together() -> None:
    word_start = np.zeros(400, dtype=bool)
    word_start[TOKENS[::3]] = True  # words of three tokens
    clean = TOKENS[:60]
    assert [u.tolist() for u in split_units(clean, word_start)][:2] == [[10, 11, 12], [13, 14, 15]]
    result = add_noise(clean, word_start, cfg(), rng(0))
    assert result.num_units == 20
    kept = [t for t in result.ids if t != MASK_ID]
    assert len(kept) % 3 == 0 and len(kept) == 3 * (20 - result.num_masked)


def test_local_permutation_moves_no_unit_beyond_window() -> None:
    for window in (1, 3):
        moved = 0
        for i in range(100):
            clean = TOKENS[:40]
            result = add_noise(clean, ALL_START, cfg(mask_ratio=0.0, permute_window=window), rng(i))
            assert sorted(result.ids) == clean.tolist()
            shift = np.abs(np.array([int(t) - 10 for t in result.ids]) - np.arange(40))
            assert shift.max() <= window
            moved += int((shift > 0).sum())
        assert moved > 0


def test_deletion_rate_and_order() -> None:
    deleted = 0
    for i in range(200):
        result = add_noise(TOKENS[:50], ALL_START, cfg(mask_ratio=0.0, delete_prob=0.2), rng(i))
        assert result.ids == sorted(result.ids)  # survivors keep their order
        assert len(result.ids) == 50 - result.num_deleted
        deleted += result.num_deleted
    assert abs(deleted / (200 * 50) - 0.2) < 0.02


def test_empty_sentence() -> None:
    result = add_noise(TOKENS[:0], ALL_START, cfg(permute_window=2, delete_prob=0.5), rng(0))
    assert result.ids == [] and result.num_units == 0


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    words = "the a man woman dog cat runs sits on in park street red blue small big with ball".split()
    gen = np.random.default_rng(0)
    en = [" ".join(gen.choice(words, size=gen.integers(3, 15))) for _ in range(300)]
    tok = SubwordTokenizer.train(en, ["en", "fr"], 40)  # small: many words split into pieces
    corpus = ParallelCorpus("train", ("en",), {"en": en}, CorpusReport("train", ("en",)))
    return tok, TokenizedCorpus.build(corpus, tok)


def test_stream_examples_reproducible_and_tagged(toy) -> None:
    tok, corpus = toy
    task = build_task("denoising", langs=["en"], permute_window=2)
    assert isinstance(task, DenoisingTask) and task.stream_names() == ["denoise:en"]
    (stream,) = task.streams(corpus, tok, seed=7)
    (again,) = task.streams(corpus, tok, seed=7)
    (other_seed,) = task.streams(corpus, tok, seed=8)
    lengths = stream.lengths()
    changed_epoch = changed_seed = 0
    for i in range(len(stream)):
        ex = stream.example(i, epoch=0)
        assert ex.task == "denoise:en"
        assert ex.source_ids[0] == tok.lang_tag_id("en") and ex.source_ids[-1] == EOS_ID
        assert list(ex.target_ids) == corpus.ids("en", i).tolist()
        assert len(ex.source_ids) <= lengths[i] and len(ex.target_ids) + 1 <= lengths[i]
        assert again.example(i, 0) == ex
        changed_epoch += stream.example(i, epoch=1).source_ids != ex.source_ids
        changed_seed += other_seed.example(i, 0).source_ids != ex.source_ids
    assert changed_epoch > 0.8 * len(stream) and changed_seed > 0.8 * len(stream)


def test_stream_rejects_missing_language(toy) -> None:
    tok, corpus = toy
    with pytest.raises(ValueError, match=r"denoising.langs='fr' is not a language.*\['en'\]"):
        build_task("denoising", langs=["fr"]).streams(corpus, tok)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"langs": []}, "denoising.langs"),
        ({"langs": "en"}, "denoising.langs"),
        ({"langs": ["en", "en"]}, "repeats"),
        ({"mask_ratio": 1.0}, r"mask_ratio=1.0 is invalid: use a number in \[0, 1\)"),
        ({"delete_prob": -0.1}, "delete_prob=-0.1"),
        ({"poisson_lambda": 0}, "poisson_lambda=0"),
        ({"permute_window": -1}, "permute_window=-1"),
        ({"whole_words": "yes"}, "whole_words='yes'"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DenoisingTaskConfig(**kwargs)
