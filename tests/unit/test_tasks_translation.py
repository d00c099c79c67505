"""Translation streams (tag convention, lengths, text) and the task registry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from lightning_moe.data.batching import SampleIndex
from lightning_moe.data.corpus import CorpusReport, ParallelCorpus
from lightning_moe.data.examples import TokenizedCorpus
from lightning_moe.data.tokenizer import EOS_ID, SubwordTokenizer
from lightning_moe.tasks import (
    StreamDataset,
    Task,
    TranslationTask,
    TranslationTaskConfig,
    available_tasks,
    build_task,
    registry,
)


@pytest.fixture(scope="module")
def toy():
    gen = np.random.default_rng(1)
    en_words = "the a man woman dog runs sits on in park red blue".split()
    de_words = "der die ein Mann Frau Hund läuft sitzt auf im Park rot blau".split()
    en = [" ".join(gen.choice(en_words, size=gen.integers(2, 12))) for _ in range(200)]
    de = [" ".join(gen.choice(de_words, size=gen.integers(2, 12))) for _ in range(200)]
    tok = SubwordTokenizer.train(en + de, ["en", "de"], 50)
    sentences = {"en": en, "de": de}
    corpus = ParallelCorpus("val", ("en", "de"), sentences, CorpusReport("val", ("en", "de")))
    return tok, TokenizedCorpus.build(corpus, tok), sentences


def test_streams_follow_the_tag_convention(toy) -> None:
    tok, corpus, text = toy
    task = build_task("translation", src_lang="en", tgt_lang="de")
    assert isinstance(task, TranslationTask) and task.name == "translation"
    assert task.stream_names() == ["translate:en-de", "translate:de-en"]
    forward, backward = task.streams(corpus, tok)
    ex = forward.example(3)
    assert ex.task == "translate:en-de"
    assert ex.source_ids == [tok.lang_tag_id("de"), *tok.encode(text["en"][3]), EOS_ID]  # target-language tag
    assert ex.target_ids == tok.encode(text["de"][3])  # no BOS/EOS: the collate adds them
    assert ex.ref_text is None
    back = backward.example(3)
    assert back.source_ids[0] == tok.lang_tag_id("en") and back.target_ids == tok.encode(text["en"][3])


def test_lengths_bound_both_sides(toy) -> None:
    tok, corpus, _ = toy
    (stream, _) = build_task("translation", src_lang="en", tgt_lang="de").streams(corpus, tok)
    lengths = stream.lengths()
    assert len(lengths) == len(stream) == 200
    for i in range(len(stream)):
        ex = stream.example(i)
        assert lengths[i] == max(len(ex.source_ids), len(ex.target_ids) + 1)


def test_eval_streams_carry_text_and_repeat_flag(toy) -> None:
    tok, corpus, text = toy
    task = build_task("translation", src_lang="de", tgt_lang="en", bidirectional=False)
    (stream,) = task.eval_streams(corpus, tok)
    dataset = StreamDataset(stream)
    ex = dataset[SampleIndex(5, epoch=2, repeat=True)]
    assert ex.src_text == text["de"][5] and ex.ref_text == text["en"][5] and ex.is_repeat
    assert not dataset[5].is_repeat


def test_missing_language_in_corpus(toy) -> None:
    tok, corpus, _ = toy
    with pytest.raises(ValueError, match=r"tgt_lang='fr' is not a language.*\['en', 'de'\]"):
        build_task("translation", src_lang="en", tgt_lang="fr").streams(corpus, tok)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"src_lang": "en", "tgt_lang": "en"}, "both 'en'"),
        ({"src_lang": ""}, "translation.src_lang=''"),
        ({"bidirectional": "no"}, "bidirectional='no'"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TranslationTaskConfig(**kwargs)


def test_registry_errors_name_the_fix() -> None:
    assert {"translation", "denoising"} <= set(available_tasks())
    with pytest.raises(ValueError, match=r"task 'summarize' is not registered: use one of \[.*'translation'"):
        build_task("summarize")
    with pytest.raises(ValueError, match=r"no options \['beam'\]: valid options are \['bidirectional'"):
        build_task("translation", beam=4)


def test_register_a_new_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))

    @dataclass
    class CopyConfig:
        """Options of a toy task."""

        lang: str = "en"
        """Language to copy."""

    @registry.register_task("copy")
    class CopyTask(Task):
        config_class = CopyConfig

        def langs(self):
            return (self.config.lang,)

        def stream_names(self):
            return [f"copy:{self.config.lang}"]

        def streams(self, corpus, tokenizer, seed=0):
            return []

    task = build_task("copy", lang="de")
    assert isinstance(task, CopyTask) and task.langs() == ("de",) and "copy" in available_tasks()
    with pytest.raises(ValueError, match="already registered"):
        registry.register_task("copy")(type("Other", (CopyTask,), {}))
    with pytest.raises(ValueError, match="must be a subclass of Task"):
        registry.register_task("plain")(object)
    with pytest.raises(ValueError, match="name='not a name'"):
        registry.register_task("not a name")
    with pytest.raises(ValueError, match="needs a CopyConfig"):
        CopyTask(TranslationTaskConfig())
