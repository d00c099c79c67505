"""The module's validation BLEU/chrF equal sacrebleu's for the same hypotheses; training uses the model's
loss; checkpoints keep the metric signatures and the nested ``model.moe`` hparams of older checkpoints."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_moe.config.run import GenerationConfig
from lightning_moe.models import MoEConfig, TransformerConfig
from lightning_moe.module import MultitaskTranslationModule
from tests.quiet_trainer import QUIET

VOCAB = 40
REFERENCES = [
    "A dog runs on the green grass.",
    "Two men are talking in the street.",
    "A woman rides a red bicycle.",
    "Children play football in the park.",
    "An old man reads a newspaper.",
    "A cat sleeps on the sofa.",
]
HYPOTHESES = [
    "A dog runs on grass.",
    "Two men talk on the street.",
    "A woman is riding a bicycle.",
    "Kids play soccer in a park.",
    "An old man reads the paper.",
    "The cat sleeps on a sofa.",
]


def _module() -> MultitaskTranslationModule:
    model = TransformerConfig(
        vocab_size=VOCAB,
        d_model=16,
        num_heads=2,
        ffn_hidden_size=16,
        encoder_layers=2,
        decoder_layers=2,
        dropout=0.0,
        max_positions=16,
        moe=MoEConfig(num_experts=2, k=1),
    )
    return MultitaskTranslationModule(
        model=model, generation=GenerationConfig(val_max_sentences=-1), val_directions=["en-de"], max_steps=10
    )


def _batch(rows: range) -> dict:
    generator = torch.Generator().manual_seed(rows.start)
    tokens = torch.randint(3, VOCAB, (len(rows), 6), generator=generator)
    return {
        "src": tokens,
        "tgt_in": tokens,
        "tgt_out": tokens.roll(-1, dims=1),
        "ref_text": [REFERENCES[i] for i in rows],
        "rows": list(rows),
        "task": ["translate:en-de"] * len(rows),
    }


def test_logged_validation_scores_equal_sacrebleu(tmp_path: Path):
    module = _module()
    module._tokenizer = object()  # decoding is replaced below; validation only checks that one exists
    hypotheses = dict(enumerate(HYPOTHESES))
    # Two batches of three: the scores are corpus-level, not averages of batch scores.
    batches = [_batch(range(0, 3)), _batch(range(3, 6))]
    module.translate_batch = lambda src, mask=None: [hypotheses[i] for i in module._current_rows]
    original_step = module.validation_step

    def validation_step(batch, batch_idx, dataloader_idx=0):
        module._current_rows = batch["rows"]
        return original_step(batch, batch_idx, dataloader_idx)

    module.validation_step = validation_step
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, dataloaders=[torch.utils.data.DataLoader(batches, batch_size=None)], verbose=False)

    bleu = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES])
    chrf = sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES])
    assert 5 < bleu.score < 95  # a score that smoothing or word n-grams would change
    metrics = trainer.callback_metrics
    assert float(metrics["val/en-de/bleu"]) == pytest.approx(bleu.score, abs=1e-4)
    assert float(metrics["val/en-de/chrf"]) == pytest.approx(chrf.score, abs=1e-4)
    assert float(metrics["val/bleu"]) == pytest.approx(bleu.score, abs=1e-4)

    signatures = module.metric_signatures
    assert "tok:13a" in signatures["bleu"] and "smooth:exp" in signatures["bleu"] and "nw:0" in signatures["chrf"]
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["metric_signatures"] == signatures
    logger.save()
    assert "tok:13a" in (Path(logger.log_dir) / "hparams.yaml").read_text()


def test_training_step_is_the_models_loss(monkeypatch):
    torch.manual_seed(0)
    module = _module()
    batch = _batch(range(0, 3))
    calls = []
    original = module.model.loss

    def spy(batch, label_smoothing=0.0):
        calls.append(label_smoothing)
        return original(batch, label_smoothing)

    monkeypatch.setattr(module.model, "loss", spy)
    torch.manual_seed(1)  # the same random token selection in both calls
    loss = module.training_step(batch, 0)
    assert calls == [module.optim_config.label_smoothing]
    torch.manual_seed(1)
    expected, _ = original(batch, module.optim_config.label_smoothing)
    assert torch.allclose(loss, expected)


def test_per_task_training_nll_equals_each_tasks_own_cross_entropy(monkeypatch):
    """``train/<task>/nll`` comes from the loss's per-token nll; reference: each task's rows scored apart."""
    torch.manual_seed(0)
    module = _module()
    module.eval()  # no dropout: the reference forward below sees the same network
    batch = _batch(range(0, 5))
    batch["task"] = ["translate:en-de", "denoise:en", "translate:en-de", "denoise:en", "denoise:en"]
    padding = torch.zeros(5, 6, dtype=torch.bool)
    padding[1, 4:] = padding[2, 2:] = True
    batch["tgt_padding_mask"] = batch["src_padding_mask"] = padding
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    torch.manual_seed(1)
    module.training_step(batch, 0)
    for task, name in (("translate:en-de", "translate_en-de"), ("denoise:en", "denoise_en")):
        rows = [i for i, t in enumerate(batch["task"]) if t == task]
        with torch.no_grad():
            torch.manual_seed(1)
            logits = module(batch).logits[rows]  # [rows, T, V]
        targets, real = batch["tgt_out"][rows], ~padding[rows]
        expected = F.cross_entropy(logits.double()[real], targets[real])
        assert logged[f"train/{name}/nll"] == pytest.approx(float(expected), rel=1e-5)


def test_checkpoint_hparams_with_nested_model_moe_still_load():
    module = _module()
    hparams = dict(module.hparams)
    assert hparams["model"]["moe"]["num_experts"] == 2  # the format older checkpoints have
    loaded = MultitaskTranslationModule(**hparams)
    assert asdict(loaded.model_config) == asdict(module.model_config)
    loaded.load_state_dict(module.state_dict())


def test_adamw_is_fused_where_torch_has_the_kernels_and_bf16_training_clips_with_it(tmp_path: Path):
    from lightning_moe.parallel.optim import fused_kernels_cover

    module = _module()
    optimizer = module.configure_optimizers()["optimizer"]
    fused = fused_kernels_cover(module.parameters())
    assert [group["fused"] for group in optimizer.param_groups] == [fused or None] * 2
    if not fused:
        pytest.skip("this torch has no fused AdamW kernels for this device")
    # set after construction: the optimizer does not claim to unscale gradients, so Lightning's AMP plugin clips
    assert not getattr(optimizer, "_step_supports_amp_scaling", False)
    batches = [_batch(range(0, 3)), _batch(range(3, 6))] * 2
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=4,
        gradient_clip_val=0.5,
        limit_val_batches=0,
        **QUIET,
        default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
