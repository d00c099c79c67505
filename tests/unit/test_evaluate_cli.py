"""``python -m lightning_moe.evaluate`` (in-process) and the test-after-fit of ``train`` (``_test``)."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sacrebleu

from lightning_moe import evaluate as evaluate_cli
from lightning_moe.config.run import GenerationConfig
from lightning_moe.config.schema import TrainConfig
from lightning_moe.data.corpus import load_split
from lightning_moe.data.datamodule import DataConfig
from lightning_moe.data.download import SAMPLE_DIR
from lightning_moe.evaluate import EvaluateConfig, EvaluateDataConfig, evaluate
from lightning_moe.inference import load_translator, translate_sentences
from tests.tiny_translator import write_tiny_checkpoint

LINES = 6


def _write_corpus(root: Path, split: str, langs: list[str], lines: int = LINES) -> Path:
    """A small corpus folder: the first ``lines`` sentences of the sample's test split as ``split``."""
    sample = load_split(SAMPLE_DIR, "test_2016_flickr", langs, max_sentences=lines)
    root.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        with gzip.open(root / f"{split}.{lang}.gz", "wt", encoding="utf-8") as handle:
            handle.write("".join(s + "\n" for s in sample.sentences[lang]))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"), "test_custom", ["en", "de", "fr"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """Trained (as recorded) on ``corpus``, whose only test split is ``test_custom``."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt", data_root=str(corpus))
    import torch

    stored = torch.load(path, weights_only=True)
    stored["datamodule_hyper_parameters"]["data"]["test_splits"] = ["test_custom"]
    torch.save(stored, path)
    return path


def _signature(metric) -> str:
    """sacreBLEU's signature of a metric with default options (known once it has scored something)."""
    metric.corpus_score(["a b c"], [["a b c"]])
    return str(metric.get_signature())


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main(argv)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_defaults_come_from_the_checkpoint(checkpoint, corpus, capsys, tmp_path):
    scores = tmp_path / "scores.json"
    assert evaluate_cli.main([f"checkpoint={checkpoint}", f"json={scores}"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(scores.read_text())
    # the recorded corpus, its test split and the validated directions; all its lines
    assert [(r["split"], r["direction"], r["sentences"]) for r in rows] == [
        ("test_custom", "en-de", LINES),
        ("test_custom", "de-en", LINES),
    ]
    assert "test_custom" in out and "en-de" in out and "de-en" in out
    bleu, chrf = _signature(sacrebleu.metrics.BLEU()), _signature(sacrebleu.metrics.CHRF())
    assert all(r["bleu_signature"] == bleu and r["chrf_signature"] == chrf for r in rows)
    assert f"BLEU signature: {bleu}" in out and f"chrF signature: {chrf}" in out


def test_scores_are_sacrebleu_of_the_translations(checkpoint, corpus):
    rows = evaluate(EvaluateConfig(checkpoint=str(checkpoint), directions=["fr-en"], max_sentences=4), progress=False)
    pairs = load_split(corpus, "test_custom", ["fr", "en"]).pairs("fr", "en")[:4]
    hypotheses = translate_sentences(load_translator(checkpoint), [s for s, _ in pairs], "en")
    references = [[t for _, t in pairs]]
    assert [r["direction"] for r in rows] == ["fr-en"] and rows[0]["sentences"] == 4
    assert rows[0]["bleu"] == round(sacrebleu.corpus_bleu(hypotheses, references).score, 2)
    assert rows[0]["chrf"] == round(sacrebleu.corpus_chrf(hypotheses, references).score, 2)


def test_beam_and_length_penalty_reach_the_decoder(checkpoint, monkeypatch):
    import lightning_moe.inference as inference

    seen = []
    real = inference.translator_from_checkpoint

    def spy(*args, **overrides):
        seen.append(overrides["generation"])
        return real(*args, **overrides)

    monkeypatch.setattr(inference, "translator_from_checkpoint", spy)
    for penalty in (None, 0.6):
        cfg = EvaluateConfig(checkpoint=str(checkpoint), beam_size=3, length_penalty=penalty, max_sentences=1)
        evaluate(cfg, progress=False)
    assert seen[0]["beam_size"] == 3 and "length_penalty" not in seen[0]  # the checkpoint's own
    assert seen[1]["length_penalty"] == 0.6


def test_data_root_overrides_the_recorded_corpus(checkpoint, tmp_path):
    other = _write_corpus(tmp_path / "other", "test_other", ["en", "de"], lines=3)
    cfg = EvaluateConfig(checkpoint=str(checkpoint), data=EvaluateDataConfig(root=str(other)), splits=["test_other"])
    rows = evaluate(cfg, progress=False)
    assert [(r["split"], r["direction"], r["sentences"]) for r in rows] == [
        ("test_other", "en-de", 3),
        ("test_other", "de-en", 3),
    ]
    assert "root" in _error([f"checkpoint={checkpoint}", f"root={other}"])  # the train spelling only
    assert "is not a folder" in _error([f"checkpoint={checkpoint}", f"data.root={tmp_path / 'nowhere'}"])


def test_a_vanished_corpus_asks_for_data_root(tmp_path):
    gone = _write_corpus(tmp_path / "gone", "test_custom", ["en", "de"])
    path = write_tiny_checkpoint(tmp_path / "tiny.ckpt", data_root=str(gone))
    for item in gone.iterdir():
        item.unlink()
    gone.rmdir()
    message = _error([f"checkpoint={path}"])
    assert "no longer exists" in message and "data.root=" in message


def test_multi30k_from_the_cache_is_found_without_downloading(tmp_path, monkeypatch):
    """``data.root`` null when training: the corpus came from ``$LIGHTNING_MOE_DATA`` or the cache."""
    path = write_tiny_checkpoint(tmp_path / "tiny.ckpt", data_root=None)
    monkeypatch.delenv("LIGHTNING_MOE_DATA", raising=False)
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "empty-cache"))
    message = _error([f"checkpoint={path}"])
    assert "Multi30k" in message and "data.root=" in message
    cached = tmp_path / "empty-cache" / "multi30k"
    assert not cached.exists() or not any(cached.iterdir())  # nothing was downloaded

    env_corpus = _write_corpus(tmp_path / "env", "test_2016_flickr", ["en", "de"], lines=2)
    monkeypatch.setenv("LIGHTNING_MOE_DATA", str(env_corpus))
    rows = evaluate(EvaluateConfig(checkpoint=str(path)), progress=False)
    assert {(r["split"], r["sentences"]) for r in rows} == {("test_2016_flickr", 2)}


def test_errors_are_one_line(checkpoint, tmp_path):
    assert "does not exist" in _error([f"checkpoint={tmp_path / 'missing.ckpt'}"])
    message = _error([f"checkpoint={checkpoint}", "directions=[en-xx]"])
    assert "'en-xx'" in message and "['en', 'de', 'fr']" in message
    message = _error([f"checkpoint={checkpoint}", "splits=[test_2099]"])
    assert "test_2099" in message and "test_custom" in message
    assert "max_sentences=0" in _error([f"checkpoint={checkpoint}", "max_sentences=0"])


def test_help_shows_real_defaults_and_docstrings(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "_MISSING_TYPE" not in text and "data.root=null" in text and "splits=[]" in text
    assert "directions=[]" in text and "the checkpoint's ``data.test_splits``" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(checkpoint, monkeypatch):
    cfg = EvaluateConfig(checkpoint=str(checkpoint), directions=["en-de"], max_sentences=2)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate(cfg)
    assert "test_custom en-de" in terminal.getvalue() and "/2 " in terminal.getvalue()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    evaluate(cfg)
    assert piped.getvalue() == ""


def test_test_after_fit_prints_and_stores_scores_with_signatures(checkpoint, corpus, tmp_path, monkeypatch, capsys):
    from lightning_moe.train import _test

    cfg = TrainConfig(
        data=DataConfig(root=str(corpus), test_splits=["test_custom", "test_absent"]),
        generation=GenerationConfig(val_max_sentences=3),
        output_dir=str(tmp_path / "run"),
    )
    cfg.trainer.enable_progress_bar = True
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    metrics = _test(cfg, checkpoint, SimpleNamespace(data_root=corpus))
    rows = json.loads((tmp_path / "run" / "test_scores.json").read_text())
    assert [(r["split"], r["direction"], r["sentences"]) for r in rows] == [
        ("test_custom", "en-de", 3),
        ("test_custom", "de-en", 3),
    ]
    assert all(r["bleu_signature"].startswith("nrefs:1|") and r["chrf_signature"].startswith("nrefs:1|") for r in rows)
    assert metrics == {
        f"test/test_custom/{r['direction']}/{metric}": r[metric] for r in rows for metric in ("bleu", "chrf")
    }
    out = capsys.readouterr().out
    assert "BLEU signature: nrefs:1" in out and "chrF signature: nrefs:1" in out
    assert "test_custom en-de" in terminal.getvalue()  # progress while decoding
    # ... and ends with a few translations on screen: source, the model's output, reference
    examples = rows[0]["examples"]
    sources = load_split(corpus, "test_custom", ["en"]).sentences["en"]
    assert [e["source"] for e in examples] == sources[:3]
    assert all(e["hypothesis"] in out and e["source"] in out for e in examples)
    assert out.rstrip().endswith(f"reference: {examples[-1]['reference']}")
