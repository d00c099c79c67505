"""Tiny end-to-end runs of the command lines: train, checkpoint, resume, translate, evaluate, fine-tune."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = [
    "model.d_model=32",
    "model.num_heads=2",
    "model.ffn_hidden_size=32",
    "model.encoder_layers=2",
    "model.decoder_layers=2",
    "moe.num_experts=4",
    "data.vocab_size=300",
    "data.max_train_sentences=300",
    "data.max_eval_sentences=24",
    "data.max_tokens=512",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_train_steps=4",
    "generation.val_max_sentences=8",
]


def _run(args: list[str], cwd: Path, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LIGHTNING_MOE_CACHE=str(cwd / "cache"))
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step-*.ckpt"))


def test_train_resume_translate_evaluate_finetune(tmp_path: Path):
    run_dir = tmp_path / "run"
    train = ["lightning_moe.train", *TINY, f"hydra.run.dir={run_dir}", "test_after_fit=false"]
    _run([*train, "trainer.max_steps=8"], tmp_path)
    ckpts = run_dir / "checkpoints"
    assert _steps(ckpts) == ["step-000004.ckpt", "step-000008.ckpt"]
    first = torch.load(ckpts / "step-000008.ckpt", weights_only=True)
    assert first["global_step"] == 8 and "tokenizer_model" in first
    assert "tok:13a" in first["metric_signatures"]["bleu"]  # how the logged validation BLEU was computed

    # the same command with a longer budget resumes from step 8
    resumed = _run([*train, "trainer.max_steps=12", "checkpoint.keep_last=2"], tmp_path)
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert _steps(ckpts) == ["step-000008.ckpt", "step-000012.ckpt"]  # retention: the newest 2
    last = torch.load(ckpts / "step-000012.ckpt", weights_only=True)
    assert last["global_step"] == 12
    # the resumed run logged into the same version as the first: one continuous set of curves
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]

    # translate: stdin -> stdout, one line per line
    out = _run(
        ["lightning_moe.translate", f"checkpoint={ckpts / 'step-000012.ckpt'}", "source_lang=en", "target_lang=de"],
        tmp_path,
        stdin="A dog runs on the grass.\nTwo men are talking.\n",
    )
    assert len(out.stdout.splitlines()) == 2

    # evaluate prints BLEU and chrF per direction with sacrebleu's signature
    ev = _run(
        ["lightning_moe.evaluate", f"checkpoint={ckpts / 'step-000012.ckpt'}", "max_sentences=8", "directions=[en-de]"],
        tmp_path,
    )
    assert "en-de" in ev.stdout and "BLEU signature: nrefs:1" in ev.stdout and "chrF signature" in ev.stdout

    # multitask fine-tuning on a new pair of the corpus (de-fr) from the checkpoint: fresh step counter,
    # the checkpoint's tokenizer (this data config alone would train another one: fewer sentences)
    ft_dir = tmp_path / "finetune"
    _run(
        [
            "lightning_moe.train",
            *TINY,
            f"hydra.run.dir={ft_dir}",
            "experiment=finetune",
            f"init_from={ckpts / 'step-000012.ckpt'}",
            "trainer.max_steps=4",
            "test_after_fit=false",
            "tasks.tasks=[{name:translation,src_lang:de,tgt_lang:fr}]",
            "data.max_train_sentences=200",
        ],
        tmp_path,
    )
    ft = torch.load(ft_dir / "checkpoints" / "step-000004.ckpt", weights_only=True)
    assert ft["global_step"] == 4
    assert ft["hyper_parameters"]["val_directions"] == ["translate:de-fr", "translate:fr-de"]
    assert torch.equal(ft["tokenizer_model"], last["tokenizer_model"])
    # the fine-tuned weights started from the checkpoint: after 4 small steps they are still close to it
    start, tuned = last["state_dict"]["model.src_embed.weight"], ft["state_dict"]["model.src_embed.weight"]
    assert (tuned - start).norm() < 0.5 * start.norm()


def test_translate_rejects_unknown_key_and_bad_language(tmp_path: Path):
    bad = _run(["lightning_moe.translate", "checkpoint=x", "target_lang=de", "beam=4"], tmp_path, check=False)
    assert bad.returncode != 0 and "beam" in bad.stderr


def test_train_rejects_misspelled_key_before_starting(tmp_path: Path):
    bad = _run(["lightning_moe.train", "moe.num_expert=4", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path, check=False)
    assert bad.returncode != 0 and "num_expert" in bad.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_train_rejects_unknown_group_option_in_one_line(tmp_path: Path):
    bad = _run(["lightning_moe.train", "experiment=finetun", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path, check=False)
    assert bad.returncode == 2 and "finetune" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_multirun_of_multi_process_jobs_stops_before_training(tmp_path: Path):
    sweep = ["strategy=moe_zero", "trainer.devices=2", "moe.num_experts=4,8", f"hydra.sweep.dir={tmp_path / 's'}"]
    bad = _run(["lightning_moe.train", "-m", *sweep], tmp_path, check=False)
    assert bad.returncode == 2 and "multirun (-m)" in bad.stderr
    assert not list((tmp_path / "s").glob("**/checkpoints"))
