"""An untrained tiny translator checkpoint for the command-line tests (translate, evaluate), in a second.

The file has the keys ``lightning_moe.train`` writes (``state_dict``, ``hyper_parameters``,
``tokenizer_model``, ``datamodule_hyper_parameters``), so the commands read it as they read a trained one;
its translations are noise, which is all a test of the command line needs.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from lightning_moe.data.corpus import load_split
from lightning_moe.data.datamodule import DataConfig
from lightning_moe.data.download import SAMPLE_DIR
from lightning_moe.data.tokenizer import SubwordTokenizer
from lightning_moe.models import MoEConfig, TransformerConfig
from lightning_moe.module import MultitaskTranslationModule
from lightning_moe.tasks import MultitaskConfig

LANGS = ["en", "de", "fr"]
VAL_DIRECTIONS = ["translate:en-de", "translate:de-en"]


def write_tiny_checkpoint(path: Path, data_root: str | None = str(SAMPLE_DIR), seed: int = 0) -> Path:
    """Write an untrained tiny checkpoint trained-on ``data_root`` (recorded as ``data.root``) to ``path``."""
    corpus = load_split(SAMPLE_DIR, "train", LANGS, max_sentences=300)
    text = [line for lang in LANGS for line in corpus.sentences[lang]]
    tokenizer = SubwordTokenizer.train(text, LANGS, vocab_size=300, num_threads=1)
    torch.manual_seed(seed)
    model = TransformerConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        num_heads=2,
        ffn_hidden_size=32,
        encoder_layers=1,
        decoder_layers=1,
        moe=MoEConfig(num_experts=2),
    )
    module = MultitaskTranslationModule(
        model=model,
        generation={"max_len_b": 4, "max_len_a": 0.0},  # short outputs: a test decodes in milliseconds
        special_ids={"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id},
        val_directions=VAL_DIRECTIONS,
        tokenizer_model=tokenizer.model_proto,
    )
    data = replace(DataConfig(), root=data_root, langs=LANGS, test_splits=["test_2016_flickr"], vocab_size=300)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": {"data": asdict(data), "tasks": asdict(MultitaskConfig())},
    }
    module.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def write_step_checkpoint(folder: Path, step: int, seed: int) -> Path:
    """A tiny checkpoint as training writes it: ``step-<N>.ckpt``, training state, ``global_step``, a manifest."""
    from lightning_moe.checkpoint import atomic_save

    raw = folder / f"raw-{seed}.pt"
    checkpoint = torch.load(write_tiny_checkpoint(raw, seed=seed), weights_only=True)
    raw.unlink()
    checkpoint.update(global_step=step, optimizer_states=[{"state": {}}], loops={"fit_loop": {}}, lr_schedulers=[])
    path = folder / f"step-{step:06d}.ckpt"
    atomic_save(checkpoint, path, manifest=True)
    return path
