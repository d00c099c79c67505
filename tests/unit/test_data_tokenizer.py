"""The shared sentencepiece tokenizer: special ids, tags, round trip, caching and validation."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import pytest
import sentencepiece as spm

from lightning_moe.data.corpus import load_split
from lightning_moe.data.tokenizer import SubwordTokenizer, build_tokenizer, lang_tag, tokenizer_cache_key

MULTI30K = Path(os.environ.get("MULTI30K_ROOT", Path(__file__).resolve().parents[2].parent / "shared/data/multi30k"))
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "val.en.gz").is_file(), reason=f"no Multi30k copy at {MULTI30K} (set MULTI30K_ROOT)"
)

EN = [
    "A man in an orange hat starring at something.",
    "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
    "A little girl climbing into a wooden playhouse.",
    "A boston terrier is running on lush green grass in front of a white fence.",
    "Several men in hard hats are operating a giant pulley system.",
    "A woman is playing the guitar on a stage.",
]
DE = [
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "Zwei junge Männer mit struppigen Haaren schauen auf ihre Hände, während sie im Hof herumhängen.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "Ein Boston Terrier läuft über saftig-grünes Gras vor einem weißen Zaun.",
    "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
    "Eine Frau spielt Gitarre auf einer Bühne.",
]


def sentences(repeat: int = 30) -> dict[str, list[str]]:
    """A few hundred lines: the pairs above with numbered variants, so unigram training has material."""
    en = [f"{s} {i}" for i in range(repeat) for s in EN]
    de = [f"{s} {i}" for i in range(repeat) for s in DE]
    return {"en": en, "de": de}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> SubwordTokenizer:
    return build_tokenizer(sentences(), tmp_path_factory.mktemp("cache"), vocab_size=150)


def test_special_ids_and_tags(tok: SubwordTokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    assert tok.langs == ("en", "de")
    assert tok.lang_tag_id("en") == 5 and tok.lang_tag_id("de") == 6
    assert tok.id_to_piece(tok.lang_tag_id("de")) == lang_tag("de") == "<2de>"
    assert tok.vocab_size == 150
    with pytest.raises(ValueError, match=r"lang='fr' has no tag.*\['en', 'de'\]"):
        tok.lang_tag_id("fr")


def test_round_trip_and_batch(tok: SubwordTokenizer) -> None:
    texts = [EN[0], DE[1], "Ein Mann spielt Gitarre."]
    ids = tok.encode_batch(texts)
    assert ids == [tok.encode(t) for t in texts]
    assert all(isinstance(i, int) for i in ids[0])
    assert tok.decode_batch(ids) == texts
    assert not set(ids[0]) & {tok.pad_id, tok.bos_id, tok.eos_id}  # encode adds no specials


def test_decode_drops_specials_and_stops_at_eos(tok: SubwordTokenizer) -> None:
    ids = tok.encode(EN[2])
    noisy = [tok.bos_id, tok.lang_tag_id("en"), *ids, tok.eos_id, *tok.encode("junk after"), tok.pad_id]
    assert tok.decode(noisy) == EN[2]
    assert "<2en>" in tok.decode([tok.lang_tag_id("en"), *ids], skip_special_tokens=False)


def test_mask_and_tags_are_single_pieces_in_text(tok: SubwordTokenizer) -> None:
    ids = tok.encode("a <mask> and <2de> tag")
    assert tok.mask_id in ids and tok.lang_tag_id("de") in ids


def test_word_starts(tok: SubwordTokenizer) -> None:
    ids = tok.encode("A woman is playing")
    pieces = [tok.id_to_piece(i) for i in ids]
    assert [bool(tok.word_start[i]) for i in ids] == [p.startswith("\u2581") for p in pieces]
    assert tok.word_start[[tok.mask_id, tok.lang_tag_id("en")]].all()


def test_pickle_keeps_model(tok: SubwordTokenizer) -> None:
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(EN[3]) == tok.encode(EN[3]) and copy.langs == tok.langs


def test_second_build_loads_from_cache_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_tokenizer(sentences(), tmp_path, vocab_size=140)
    assert not first.from_cache
    files = [p for p in (tmp_path / "tokenizers").iterdir() if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".model"  # no temporary file left behind

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    second = build_tokenizer(sentences(), tmp_path, vocab_size=140)
    assert second.from_cache
    assert second.model_proto == first.model_proto
    # a different corpus or option is a different key: it would train (and here fails loudly)
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer(sentences(repeat=29), tmp_path, vocab_size=140)
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer(sentences(), tmp_path, vocab_size=141)


def test_cache_key_depends_on_content_order_and_options() -> None:
    base = tokenizer_cache_key(sentences(), 200)
    assert base == tokenizer_cache_key(sentences(), 200)
    swapped = dict(reversed(list(sentences().items())))
    edited = sentences()
    edited["en"][7] += "!"
    assert (
        len(
            {
                base,
                tokenizer_cache_key(swapped, 200),
                tokenizer_cache_key(edited, 200),
                tokenizer_cache_key(sentences(), 201),
                tokenizer_cache_key(sentences(), 200, model_type="bpe"),
                tokenizer_cache_key(sentences(), 200, character_coverage=0.9995),
            }
        )
        == 6
    )


def test_corrupt_cache_entry_is_retrained(tmp_path: Path) -> None:
    first = build_tokenizer(sentences(), tmp_path, vocab_size=130)
    path = next(p for p in (tmp_path / "tokenizers").iterdir() if p.suffix == ".model")
    path.write_bytes(b"not a model")
    again = build_tokenizer(sentences(), tmp_path, vocab_size=130)
    assert not again.from_cache and again.encode(EN[0]) == first.encode(EN[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 7}, "vocab_size=7 is invalid"),
        ({"vocab_size": 100000}, "could not train vocab_size=100000"),
        ({"model_type": "word2vec"}, "model_type='word2vec'"),
        ({"character_coverage": 0.0}, "character_coverage=0.0"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_tokenizer(sentences(repeat=3), tmp_path, **kwargs)


def test_bad_model_is_rejected() -> None:
    with pytest.raises((ValueError, RuntimeError)):
        SubwordTokenizer(b"garbage")


@needs_multi30k
@pytest.mark.slow  # 6000 lines, 1000 pieces: 1-3 s on 2 shared cores
def test_multi30k_train_split_trains_in_seconds(tmp_path: Path) -> None:
    corpus = load_split(MULTI30K, "train", ["en", "de", "fr"], max_sentences=2000)
    start = time.perf_counter()
    tok = build_tokenizer(corpus.sentences, tmp_path, vocab_size=1000)
    assert time.perf_counter() - start < 20
    sample = corpus.sentences["fr"][:50]
    # sentencepiece's nmt_nfkc normalisation collapses runs of spaces (Multi30k has a few)
    assert tok.decode_batch(tok.encode_batch(sample)) == [" ".join(s.split()) for s in sample]
    unk = sum(i == tok.unk_id for ids in tok.encode_batch(corpus.sentences["de"][:500]) for i in ids)
    assert unk == 0  # character_coverage = 1.0: every training character has a piece


def test_concurrent_builds_train_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    train = SubwordTokenizer.train.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        time.sleep(0.2)  # the other threads arrive while this one trains
        return train(cls, *args, **kwargs)

    monkeypatch.setattr(SubwordTokenizer, "train", classmethod(counting))
    results: list[SubwordTokenizer] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_tokenizer(sentences(), tmp_path, vocab_size=120)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert len({r.model_proto for r in results}) == 1 and sum(r.from_cache for r in results) == 2
