"""The multitask data module: config validation, well-formed batches, sharding, checkpoint state."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_moe.data import SAMPLE_DIR, write_split
from lightning_moe.data.datamodule import DataConfig, MultitaskDataModule, get_data_preset
from lightning_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from tests.quiet_trainer import QUIET

MULTI30K = Path(os.environ.get("MULTI30K_ROOT", Path(__file__).resolve().parents[2].parent / "shared/data/multi30k"))
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "val.en.gz").is_file(), reason=f"no Multi30k copy at {MULTI30K} (set MULTI30K_ROOT)"
)

TOY_TASKS = {
    "temperature": 2.0,
    "tasks": [{"name": "translation", "src_lang": "en", "tgt_lang": "de"}, {"name": "denoising", "langs": ["en"]}],
}


def toy_corpus(root: Path, n_train: int = 300) -> None:
    gen = np.random.default_rng(0)
    en_words = "the a man woman dog runs sits on in park red blue small ball".split()
    de_words = "der die ein Mann Frau Hund läuft sitzt auf im Park rot blau Ball".split()

    def lines(words, n):
        return [" ".join(gen.choice(words, size=gen.integers(2, 14))) for _ in range(n)]

    for split, n in (("train", n_train), ("val", 40), ("test", 30)):
        write_split(root, split, {"en": lines(en_words, n), "de": lines(de_words, n)})


def toy_config(tmp_path: Path, **overrides) -> DataConfig:
    toy_corpus(tmp_path / "corpus")
    base = dict(
        root=str(tmp_path / "corpus"),
        cache_dir=str(tmp_path / "cache"),
        langs=["en", "de"],
        test_splits=["test"],
        vocab_size=60,
        max_tokens=120,
        max_len=20,
        download=False,
    )
    return DataConfig(**{**base, **overrides})


def check_batch(batch: dict, max_tokens: int, tag_ids: set[int]) -> None:
    src, tgt_in, tgt_out = batch["src"], batch["tgt_in"], batch["tgt_out"]
    assert src.dtype == tgt_in.dtype == tgt_out.dtype == torch.long
    assert batch["src_padding_mask"].dtype == batch["tgt_padding_mask"].dtype == torch.bool
    assert src.shape == batch["src_padding_mask"].shape and tgt_in.shape == tgt_out.shape
    assert src.shape[0] == tgt_in.shape[0] == len(batch["task"])
    assert src.numel() <= max_tokens and tgt_in.numel() <= max_tokens
    assert torch.equal(batch["src_padding_mask"], src == PAD_ID)
    assert torch.equal(batch["tgt_padding_mask"], tgt_out == PAD_ID)
    assert set(src[:, 0].tolist()) <= tag_ids  # every source starts with a target-language tag
    assert (tgt_in[:, 0] == BOS_ID).all()
    # tgt_out is tgt_in shifted left by one, ending in EOS
    lengths = (~batch["tgt_padding_mask"]).sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(tgt_in[row, 1:n], tgt_out[row, : n - 1]) and tgt_out[row, n - 1] == EOS_ID
        assert src[row, (~batch["src_padding_mask"][row]).sum() - 1] == EOS_ID


def test_toy_corpus_end_to_end(tmp_path: Path) -> None:
    dm = MultitaskDataModule(toy_config(tmp_path), TOY_TASKS)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    assert tok is not None and tok.vocab_size == dm.vocab_size == 60 and tok.from_cache  # trained in prepare_data
    tags = {tok.lang_tag_id("en"), tok.lang_tag_id("de")}
    loader = dm.train_dataloader()
    labels = set()
    seen = 0
    for batch in loader:
        check_batch(batch, 120, tags)
        labels.update(batch["task"])
        seen += len(batch["task"])
    assert labels == {"translate:en-de", "translate:de-en", "denoise:en"}
    corpus = dm.train_dataset.streams[0].corpus
    assert seen == len(dm.train_dataset) == 3 * len(corpus)  # three equal streams, one epoch
    assert 200 < len(corpus) < 300  # rows over max_len tokens were dropped ...
    assert max(corpus.lengths("en").max(), corpus.lengths("de").max()) + 2 <= 20  # ... and none is left
    assert dm.val_names == ["translate:en-de", "translate:de-en"]
    val = dm.val_dataloader()
    assert len(val) == 2
    refs = []
    for batch in val[0]:
        check_batch(batch, 120, tags)
        assert batch["is_repeat"] is False and set(batch["task"]) == {"translate:en-de"}
        for decoded, ref in zip(tok.decode_batch(batch["tgt_out"]), batch["ref_text"]):
            assert " ".join(ref.split()).startswith(decoded)  # ids may be cut at max_len; the text never is
        refs.extend(batch["ref_text"])
    assert sorted(refs) == sorted(dm.val_datasets["translate:en-de"].stream.corpus.text["de"])
    dm.setup("test")
    assert dm.test_names == ["test/translate:en-de", "test/translate:de-en"]
    assert sum(len(b["task"]) for b in dm.test_dataloader()[1]) == 30
    report = dm.reports["train"]
    assert report.total_lines == 300 and report.kept == len(corpus)
    assert report.dropped["too_many_tokens"] == 300 - len(corpus) and "too_many_tokens=" in report.summary()


def test_sharding_follows_the_trainer(tmp_path: Path) -> None:
    config = toy_config(tmp_path)
    per_rank = []
    for rank in range(2):
        dm = MultitaskDataModule(config, TOY_TASKS)
        dm.trainer = SimpleNamespace(  # what the module reads from a Trainer
            distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
            world_size=2,
            global_rank=rank,
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=False),
        )
        dm.setup("fit")
        per_rank.append(([b["src"] for b in dm.train_dataloader()], [list(b) for b in dm.val_dataloader()]))
    (train0, val0), (train1, val1) = per_rank
    assert len(train0) == len(train1) and [len(v) for v in val0] == [len(v) for v in val1]
    total = sum(t.shape[0] for t in train0 + train1)
    largest = max(t.shape[0] for t in train0 + train1)
    assert len(dm.train_dataset) <= total <= len(dm.train_dataset) + largest  # all once, at most one repeat
    # a Trainer that would inject a DistributedSampler is refused with the fix
    dm.trainer._accelerator_connector.use_distributed_sampler = True
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


def test_state_dict_restores_tokenizer(tmp_path: Path) -> None:
    dm = MultitaskDataModule(toy_config(tmp_path), TOY_TASKS)
    dm.setup("validate")
    state = dm.state_dict()
    fresh = MultitaskDataModule(toy_config(tmp_path), TOY_TASKS)
    fresh.load_state_dict(state)
    assert fresh.tokenizer is not None and fresh.tokenizer.model_proto == dm.tokenizer.model_proto
    assert state["data"]["vocab_size"] == 60


def test_loaders_before_setup_explain(tmp_path: Path) -> None:
    dm = MultitaskDataModule(toy_config(tmp_path), TOY_TASKS)
    with pytest.raises(ValueError, match=r"call setup\('fit'\) first"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"call setup\('test'\) first"):
        dm.test_dataloader()


def test_task_languages_must_be_data_languages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"reads languages \['fr'\].*data.langs=\['en', 'de'\]"):
        MultitaskDataModule(toy_config(tmp_path), {"tasks": [{"name": "denoising", "langs": ["fr"]}]})


def test_missing_eval_split_is_named(tmp_path: Path) -> None:
    dm = MultitaskDataModule(toy_config(tmp_path, test_splits=["test_2016_flickr"]), TOY_TASKS)
    with pytest.raises(ValueError, match=r"'test_2016_flickr' has no files.*\['test', 'train', 'val'\]"):
        dm.setup("test")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"langs": []}, "data.langs"),
        ({"langs": ["en", "en"]}, "repeats"),
        ({"vocab_size": 3}, "data.vocab_size=3"),
        ({"max_len": 2}, "data.max_len=2"),
        ({"max_len": 64, "max_tokens": 32}, r"data.max_tokens=32 is invalid: use an integer >= 64"),
        ({"tokenizer_type": "char"}, "data.tokenizer_type='char'"),
        ({"on_error": "ignore"}, "data.on_error='ignore'"),
        ({"num_workers": -1}, "data.num_workers=-1"),
        ({"max_train_sentences": 0}, "data.max_train_sentences=0"),
        ({"test_splits": "test"}, "data.test_splits='test' is a string"),
        ({"character_coverage": 1.5}, "data.character_coverage=1.5"),
    ],
)
def test_data_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**overrides)


def test_presets() -> None:
    small = get_data_preset("small")
    assert small.max_train_sentences == 2000 and small.vocab_size < DataConfig().vocab_size
    assert Path(get_data_preset("sample").root) == SAMPLE_DIR
    assert get_data_preset("small", seed=3).seed == 3
    with pytest.raises(
        ValueError, match=r"data preset 'huge' does not exist: use one of \['multi30k', 'sample', 'small'\]"
    ):
        get_data_preset("huge")
    with pytest.raises(ValueError, match=r"unknown data config keys \['batch_size'\]"):
        get_data_preset("small", batch_size=32)
    with pytest.raises(ValueError, match=r"data has unknown keys \['batch'\]"):
        MultitaskDataModule({"batch": 1})


@pytest.mark.slow  # trains the preset's 2000-piece tokenizer on 9000 lines: ~2-3 s here
def test_sample_preset_batches(tmp_path: Path) -> None:
    """The embedded Multi30k sample with its preset (the offline default run) gives well-formed batches."""
    config = get_data_preset("sample", cache_dir=str(tmp_path), max_eval_sentences=50)
    dm = MultitaskDataModule(config)  # default mixture: en<->de, en<->fr, denoising en/de/fr
    dm.setup("fit")
    tok = dm.tokenizer
    tags = {tok.lang_tag_id(lang) for lang in ("en", "de", "fr")}
    train = dm.train_dataloader()
    rows = len(dm.train_dataset.streams[0].corpus)
    assert 2950 < rows <= 3000 and len(dm.train_dataset) == 7 * rows and len(train) > 0
    labels = set()
    for _step, batch in zip(range(40), train):  # batch order is shuffled: 40 batches see every stream
        check_batch(batch, config.max_tokens, tags)
        labels.update(batch["task"])
    assert len(labels) == 7  # 4 translation directions + 3 denoising languages
    assert dm.val_names == ["translate:en-de", "translate:de-en", "translate:en-fr", "translate:fr-en"]
    batch = next(iter(dm.val_dataloader()[3]))
    check_batch(batch, config.max_tokens, tags)
    assert set(batch["task"]) == {"translate:fr-en"} and all(isinstance(r, str) for r in batch["ref_text"])
    dm.setup("test")
    assert dm.test_names == [f"test_2016_flickr/{name}" for name in dm.val_names]


@needs_multi30k
def test_multi30k_test_splits_skip_missing_languages(tmp_path: Path) -> None:
    config = get_data_preset(
        "small",
        root=str(MULTI30K),
        cache_dir=str(tmp_path),
        langs=["en", "cs"],
        max_train_sentences=300,
        vocab_size=500,
        max_eval_sentences=20,
    )
    dm = MultitaskDataModule(config, {"tasks": [{"name": "translation", "src_lang": "en", "tgt_lang": "cs"}]})
    dm.setup("test")  # test_2017_flickr has no cs: its directions are skipped, not an error
    assert dm.test_names == ["test_2016_flickr/translate:en-cs", "test_2016_flickr/translate:cs-en"]


def test_trainer_fit_two_epochs(tmp_path: Path) -> None:
    """A real Trainer run: Lightning accepts the loaders, sets the epoch, and sees every val direction."""
    import lightning.pytorch as pl

    dm = MultitaskDataModule(toy_config(tmp_path), TOY_TASKS)

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(60, 8)
            self.out = torch.nn.Linear(8, 60)
            self.val_seen: set[int] = set()
            self.epochs: list[int] = []

        def loss(self, batch: dict) -> torch.Tensor:
            logits = self.out(self.emb(batch["tgt_in"]))  # [B, T, V]
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["tgt_out"], ignore_index=PAD_ID)

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

        def on_train_epoch_start(self) -> None:
            self.epochs.append(self.trainer.train_dataloader.batch_sampler.epoch)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.val_seen.add(dataloader_idx)
            assert isinstance(batch["ref_text"], list)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,
        **QUIET,
        limit_train_batches=3,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.epochs == [0, 1] and probe.val_seen == {0, 1}
