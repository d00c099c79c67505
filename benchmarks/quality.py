"""The seed's quality claims on Multi30k (issue 16), and upcycling against training from scratch (issue 18).

Every configuration trains for the same budget of training CPU seconds (one torch thread per run, so CPU
time is the run's own compute time, robust to other jobs sharing the machine), from 2 seeds:

1. **Experts vs loss** (the seed's Figure 4): the dense twin, MoE-8, MoE-16, MoE-32 (top-2; the dense twin's
   FFNs at MoE positions are 2x wider, so every model has the same active parameters per token) on the
   multitask mixture (``tasks=multitask``: en<->de, en<->fr + denoising): validation NLL against steps.
2. **Multitask vs single task** (the seed's Figure 6): MoE-8 and the dense twin, multitask and en->de only,
   at equal training time: BLEU on en->de.
3. **Fine-tuning**: the multitask MoE-8 model fine-tuned on de->fr (a pair it never saw) against MoE-8
   trained on de->fr from scratch, for the same (shorter) time.
4. **Upcycling**: the dense model with the experts' width (``moe=dense moe.k=1``) for half the budget,
   upcycled (``moe.upcycle=true``) and trained for the other half, against the same MoE (``moe=dropless``:
   the upcycled router starts at zero, a capacity would drop most tokens at first) from scratch.
5. **bf16 against fp32** (issue 15): MoE-8 on the multitask mixture in ``bf16-mixed`` (residual stream in bf16, the
   default, and in fp32: ``model.residual_in_compute_dtype=false``) and in ``32-true`` for the same number of steps
   (``--precision-steps``, no time budget): validation NLL at every validation.
6. **The recipe's settings** (issue 16): ``experiment=multi30k`` shrunk to ``--recipe-steps`` steps with its
   warm-up shrunk in proportion (the same inverse-sqrt shape), and one setting changed at a time: peak learning
   rate x0.5 / x2, warm-up x0.5 / x2, cosine decay instead of inverse-sqrt, label smoothing 0 / 0.2, dropout
   0 / 0.3, token batch x0.5 / x2 (steps scaled the other way: equal tokens). Scored by greedy BLEU on the
   *validation* split (never the test sets) and validation NLL. The base runs from every seed, the variants
   from the first.

Each run is a subprocess (``--one NAME``) through ``lightning_moe.train.run`` with ``checkpoint.resume=auto``:
a killed run continues from its last checkpoint (its budget clock is in the checkpoint), and a finished run
writes ``{out}/runs/{name}.json`` and is skipped next time (a file written with other overrides, e.g. before the
recipe changed, is refused rather than skipped). The report (``report.md`` and plots, drawn by
``quality_report.py``) is built from whatever run files exist. Nothing is downloaded.

    python benchmarks/quality.py                        # everything: about 1 h 45 min on 2 CPU cores (--jobs 2)
    python benchmarks/quality.py --report-only          # redraw the report from the run files
    python benchmarks/quality.py --rescore              # score finished runs again with today's evaluation
    python benchmarks/quality.py --smoke --out /tmp/q   # a tiny version on the embedded sample (~4 min)
    # studies 1-3 with the recipe's model (small), 15 CPU minutes a run: about 3 h 10 min
    python benchmarks/quality.py --model small --budget-min 15 --finetune-budget-min 5 --val-every 200 \
        --arms multitask-dense multitask-moe8 multitask-moe16 multitask-moe32 single-dense single-moe8 \
        defr-scratch defr-finetuned --out benchmarks/results/quality_small --work runs/quality_small
    # study 6, the recipe's settings (1/8 of the recipe's steps a run): about 1 h 30 min
    python benchmarks/quality.py --model small --recipe-steps 500 --val-every 125 --max-test-sentences 500 \
        --arms $(python benchmarks/quality.py --list-arms recipe-) \
        --out benchmarks/results/recipe_settings --work runs/recipe_settings
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "multi30k"
TEST_SPLITS = ("test_2016_flickr", "test_2017_flickr")
RECIPE = REPO / "conf" / "experiment" / "multi30k.yaml"
RECIPE_DIRECTIONS = ("en-de", "de-en", "en-fr", "fr-en")
FINETUNE_OPTIM = ("optim.lr=3e-4", "optim.warmup_steps=50")
"""Runs that start from a trained checkpoint (fine-tuning, upcycling) use ``conf/experiment/finetune.yaml``'s
learning rate and warm-up; runs from scratch use the main settings (``--lr``, ``--warmup-steps``)."""


def single_pair(src: str, tgt: str) -> tuple[str, ...]:
    """Hydra overrides for a task mixture of one translation direction."""
    return (f"tasks.tasks=[{{name:translation,src_lang:{src},tgt_lang:{tgt}}}]", "tasks.temperature=1.0")


@dataclass(frozen=True)
class Run:
    """One training run of the report."""

    arm: str
    """The configuration without the seed, e.g. ``multitask-moe8``."""
    seed: int
    overrides: tuple[str, ...]
    """Hydra overrides on top of the common ones."""
    budget_s: float
    """Training CPU seconds (``math.inf``: the run stops at the ``trainer.max_steps`` of its overrides)."""
    directions: tuple[str, ...]
    """Directions scored on the test splits after training (greedy)."""
    starts_from: str | None = None
    """Arm whose run of the same seed this run starts from (its final checkpoint)."""
    splits: tuple[str, ...] = TEST_SPLITS
    """Splits scored after training (the recipe's settings are chosen on ``("val",)``)."""

    @property
    def name(self) -> str:
        """Run name: its folder under ``--work`` and its results file ``{out}/runs/{name}.json``."""
        return f"{self.arm}-seed{self.seed}"

    @property
    def init_from(self) -> str | None:
        """Name of the run this one starts from."""
        return None if self.starts_from is None else f"{self.starts_from}-seed{self.seed}"


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of the report, in an order that puts each run after the run it starts from."""
    budget, half, short = args.budget_min * 60, args.budget_min * 30, args.finetune_budget_min * 60
    moe = lambda e: ("moe=top2", f"moe.num_experts={e}")  # noqa: E731
    dense_twin = ("moe=dense", "moe.k=2")  # the same active parameters as top-2 MoE
    en_de, both, de_fr = ("en-de",), ("en-de", "de-en"), ("de-fr",)
    upcycle = ("moe=dropless", "moe.upcycle=true")
    runs: list[Run] = []
    for seed in args.seeds:
        for e in args.experts:
            arm, model = ("dense", dense_twin) if e == 0 else (f"moe{e}", moe(e))
            runs.append(Run(f"multitask-{arm}", seed, model, budget, both))
        to_de, to_fr = single_pair("en", "de"), single_pair("de", "fr")
        runs.append(Run("single-dense", seed, dense_twin + to_de, budget, en_de))
        runs.append(Run("single-moe8", seed, moe(8) + to_de, budget, en_de))
        runs.append(Run("defr-scratch", seed, moe(8) + to_fr, short, de_fr))
        runs.append(Run("defr-finetuned", seed, moe(8) + to_fr + FINETUNE_OPTIM, short, de_fr, "multitask-moe8"))
        runs.append(Run("upcycle-scratch", seed, ("moe=dropless",), budget, both))
        runs.append(Run("upcycle-dense", seed, ("moe=dense", "moe.k=1"), half, both))
        runs.append(Run("upcycle-upcycled", seed, upcycle + FINETUNE_OPTIM, half, both, "upcycle-dense"))
        # The same at the main peak learning rate (50 warm-up steps): the fine-tuning lr above is 2-3x lower than
        # the scratch run's over the same period, a difference that is not upcycling's.
        runs.append(
            Run("upcycle-upcycled-mainlr", seed, (*upcycle, "optim.warmup_steps=50"), half, both, "upcycle-dense")
        )
        steps = (f"trainer.max_steps={args.precision_steps}",)  # equal steps, not equal time
        for arm, precision in (("precision-fp32", "32-true"), ("precision-bf16", "bf16-mixed")):
            runs.append(Run(arm, seed, (*moe(8), f"trainer.precision={precision}", *steps), math.inf, both))
        fp32_residual = ("trainer.precision=bf16-mixed", "model.residual_in_compute_dtype=false")
        runs.append(Run("precision-bf16-fp32-residual", seed, (*moe(8), *fp32_residual, *steps), math.inf, both))
    runs += recipe_settings_runs(args)
    return runs if args.arms is None else only_arms(runs, args.arms)


def recipe_settings_runs(args: argparse.Namespace) -> list[Run]:
    """Study 6: the recipe shrunk to ``--recipe-steps`` steps, one setting changed a run (see the docstring)."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO))
    from lightning_moe.data.datamodule import DATA_PRESETS

    recipe = OmegaConf.load(RECIPE)
    scale = args.recipe_steps / recipe.trainer.max_steps
    lr, warmup, smoothing = recipe.optim.lr, round(recipe.optim.warmup_steps * scale), recipe.optim.label_smoothing
    tokens = recipe.get("data", {}).get("max_tokens", DATA_PRESETS["multi30k"].max_tokens)  # the recipe's batch
    steps = args.recipe_steps

    def shrunk(step_factor: float = 1.0, warmup_factor: float = 1.0) -> tuple[str, ...]:
        return (
            "experiment=multi30k",
            f"trainer.max_steps={round(steps * step_factor)}",
            f"optim.warmup_steps={round(warmup * warmup_factor * step_factor)}",
            f"optim.lr={lr}",
            f"optim.label_smoothing={smoothing}",
            "checkpoint.average_last=1",
        )

    variants: dict[str, tuple[str, ...]] = {
        "base": shrunk(),
        f"lr{lr / 2:g}": (*shrunk(), f"optim.lr={lr / 2:g}"),
        f"lr{lr * 2:g}": (*shrunk(), f"optim.lr={lr * 2:g}"),
        f"warmup{round(warmup / 2)}": shrunk(warmup_factor=0.5),
        f"warmup{round(warmup * 2)}": shrunk(warmup_factor=2.0),
        "cosine": (*shrunk(), "optim.schedule=cosine"),  # to optim.min_lr_ratio at the last step
        "smoothing0": (*shrunk(), "optim.label_smoothing=0.0"),
        "smoothing0.2": (*shrunk(), "optim.label_smoothing=0.2"),
        "dropout0": (*shrunk(), "model.dropout=0.0"),
        "dropout0.3": (*shrunk(), "model.dropout=0.3"),
        f"batch{tokens // 2}": (*shrunk(step_factor=2.0), f"data.max_tokens={tokens // 2}"),
        f"batch{tokens * 2}": (*shrunk(step_factor=0.5), f"data.max_tokens={tokens * 2}"),
    }
    return [
        Run(f"recipe-{name}", seed, overrides, math.inf, RECIPE_DIRECTIONS, splits=("val",))
        for name, overrides in variants.items()
        for seed in (args.seeds if name == "base" else args.seeds[:1])
    ]


def only_arms(runs: list[Run], arms: Sequence[str]) -> list[Run]:
    """The runs of ``arms`` and of every arm they start from, in plan order."""
    known = {r.arm for r in runs}
    unknown = sorted(set(arms) - known)
    if unknown:
        raise SystemExit(f"--arms {' '.join(unknown)}: no such arm (valid: {' '.join(sorted(known))})")
    wanted = set(arms)
    for r in reversed(runs):  # a run's source comes before it in the plan
        if r.arm in wanted and r.starts_from:
            wanted.add(r.starts_from)
    return [r for r in runs if r.arm in wanted]


def common_overrides(args: argparse.Namespace, run: Run) -> list[str]:
    """Overrides every run shares: data, model size, schedule, validation and checkpoint cadence."""
    return [
        f"model={args.model}",
        "data=multi30k" if not args.smoke else "data=sample",
        *([f"data.root={args.data_root}"] if args.data_root else []),
        f"data.seed={run.seed}",
        f"seed={run.seed}",
        f"optim.lr={args.lr}",
        f"optim.warmup_steps={args.warmup_steps}",
        "optim.schedule=inverse_sqrt",
        "optim.label_smoothing=0.1",
        "trainer.max_steps=10000000",  # the budget stops the run; inverse-sqrt does not depend on it
        f"trainer.val_check_interval={args.val_every}",
        "trainer.limit_val_batches=1.0",
        "generation.val_max_sentences=0",  # validation measures the loss only; BLEU comes from the test splits
        f"checkpoint.every_n_train_steps={args.val_every}",
        "checkpoint.keep_last=1",
        "checkpoint.resume=auto",
        "logger=csv",
        "test_after_fit=false",
        "trainer.enable_progress_bar=false",
    ]


# --------------------------------------------------------------------------------------- one run (child)


def train_one(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """Train ``run`` to its budget (resuming if it was interrupted), score it, return its results."""
    import lightning.pytorch as pl
    import torch
    from hydra import compose, initialize_config_module

    from lightning_moe import train as train_module
    from lightning_moe.checkpoint import checkpoint_step
    from lightning_moe.config import register_configs, to_train_config
    from lightning_moe.inference import load_translator
    from lightning_moe.models import count_parameters

    class TrainBudget(pl.Callback):
        """Stops training after ``budget_s`` CPU seconds in training batches (validation left out) and keeps
        ``(step, cpu seconds, val NLL)`` at every validation; both live in the checkpoints (resumable).

        The history is also written to ``record`` at every validation: a step's checkpoint is saved before that
        step's validation, so a run resumed from it takes the entry of its own step from there."""

        def __init__(self, budget_s: float, record: Path) -> None:
            self.budget_s, self.cpu_s, self.wall_s, self.history = budget_s, 0.0, 0.0, []
            self.record = record
            self._cpu0 = self._wall0 = 0.0

        def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if self.record.exists():  # validations of the steps up to the restored one that the checkpoint lacks
                last = self.history[-1]["step"] if self.history else -1
                recorded = json.loads(self.record.read_text())
                self.history += [h for h in recorded if last < h["step"] <= trainer.global_step]

        def on_train_batch_start(self, *_: Any) -> None:
            self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            self.cpu_s += time.process_time() - self._cpu0
            self.wall_s += time.perf_counter() - self._wall0
            if self.cpu_s >= self.budget_s:
                trainer.should_stop = True

        def on_validation_end(self, trainer: pl.Trainer, *_: Any) -> None:
            if not trainer.sanity_checking and "val/nll" in trainer.callback_metrics:
                entry = {
                    "step": trainer.global_step,
                    "cpu_s": self.cpu_s,
                    "val_nll": float(trainer.callback_metrics["val/nll"]),
                }
                if not self.history or self.history[-1]["step"] != entry["step"]:
                    self.history.append(entry)
                    partial = self.record.with_suffix(".partial")
                    partial.write_text(json.dumps(self.history))
                    os.replace(partial, self.record)

        def state_dict(self) -> dict[str, Any]:
            return {"cpu_s": self.cpu_s, "wall_s": self.wall_s, "history": self.history}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.cpu_s, self.wall_s, self.history = state["cpu_s"], state["wall_s"], list(state["history"])

    torch.set_num_threads(1)
    run_dir = work_dir(args) / run.name
    overrides = [f"name={run.name}", f"output_dir={run_dir}", *common_overrides(args, run), *run.overrides]
    if run.init_from:
        overrides.append(f"init_from={final_checkpoint(work_dir(args) / run.init_from)}")
    register_configs()
    with initialize_config_module(config_module="lightning_moe.conf", version_base=None):
        cfg = to_train_config(compose(config_name="config", overrides=overrides))
    budget = TrainBudget(run.budget_s, run_dir / "budget_history.json")
    began = time.perf_counter()
    train_module.run(cfg, [budget])
    checkpoint = final_checkpoint(run_dir)
    rows = test_scores(args, run, checkpoint)
    total, active = count_parameters(load_translator(checkpoint).model)
    return {
        **asdict(run),
        "name": run.name,
        "init_from": run.init_from,
        "steps": checkpoint_step(checkpoint),
        "train_cpu_s": budget.cpu_s,
        "train_wall_s": budget.wall_s,
        "process_wall_s": time.perf_counter() - began,
        "history": budget.history,
        "val_nll": budget.history[-1]["val_nll"] if budget.history else None,
        "test": rows,
        "moe_evaluation": MOE_EVALUATION,
        "params_total": total,
        "params_active": active,
        "all_overrides": overrides,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
    }


def test_scores(args: argparse.Namespace, run: Run, checkpoint: Path) -> list[dict[str, Any]]:
    """Greedy BLEU and chrF of ``checkpoint`` on ``run``'s splits and directions (the rows a results file keeps)."""
    from lightning_moe.evaluate import EvaluateConfig, EvaluateDataConfig, evaluate

    rows = evaluate(
        EvaluateConfig(
            checkpoint=str(checkpoint),
            data=EvaluateDataConfig(root=str(args.data_root) if args.data_root else None),
            splits=[s for s in run.splits if not args.smoke or s in ("test_2016_flickr", "val")],
            directions=list(run.directions),
            beam_size=1,
            max_sentences=args.max_test_sentences,
        ),
        progress=False,
    )
    keep = ("split", "direction", "bleu", "chrf", "sentences", "bleu_signature")
    return [{k: r[k] for k in keep if k in r} for r in rows]


MOE_EVALUATION = "dropless"
"""How the MoE layers routed when a results file's scores were taken: since 2026-12-05 validation and generation
route every token (``moe.eval_drop_tokens=false``); files without the key were scored with the eval capacity."""


def validation_nll(checkpoint: Path, overrides: Sequence[str]) -> float:
    """The validation NLL of ``checkpoint`` on its own validation sets, through the training module's validation
    (the value a run logs as ``val/nll``), in the run's precision."""
    import lightning.pytorch as pl

    from lightning_moe.config.precision import resolve_precision
    from lightning_moe.data.datamodule import MultitaskDataModule
    from lightning_moe.data.tokenizer import SubwordTokenizer
    from lightning_moe.inference import read_checkpoint, tokenizer_bytes, translator_from_checkpoint

    stored = read_checkpoint(checkpoint)
    module = translator_from_checkpoint(stored, checkpoint, "cpu", generation={"val_max_sentences": 0})
    data = stored["datamodule_hyper_parameters"]
    datamodule = MultitaskDataModule(data["data"], data["tasks"])
    datamodule.tokenizer = SubwordTokenizer(tokenizer_bytes(stored["tokenizer_model"]))
    datamodule.setup("fit")
    asked = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("trainer.precision=")), "auto")
    precision, _ = resolve_precision(asked, "cpu")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(trainer.callback_metrics["val/nll"])


def rescore(args: argparse.Namespace) -> None:
    """Score every finished run's last checkpoint again with the current evaluation (``--rescore``): the test rows
    and the final validation NLL; the old ones stay in the file under ``earlier_scores``.

    Every results file in ``--out`` of an arm in ``--arms`` (default all) is rescored as its own file describes it:
    the plan may have moved on since (e.g. the recipe's learning rate)."""
    import torch

    from lightning_moe.checkpoint import checkpoint_step

    torch.set_num_threads(1)
    run_fields = {f.name for f in fields(Run)}
    for path in sorted((Path(args.out) / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        run = Run(**{k: tuple(v) if isinstance(v, list) else v for k, v in result.items() if k in run_fields})
        if args.arms is not None and run.arm not in args.arms:
            continue
        if result.get("moe_evaluation") == MOE_EVALUATION:
            print(f"{run.name}: already scored {MOE_EVALUATION}", flush=True)
            continue
        if {"moe=dense", "moe=dropless"} & set(run.overrides):  # never dropped: rescoring dense runs changed nothing
            continue
        checkpoint = final_checkpoint(work_dir(args) / run.name)
        if checkpoint_step(checkpoint) != result["steps"]:
            raise SystemExit(f"{checkpoint} is not the step {result['steps']} that {path} scored: rescore refused")
        earlier = {"test": result["test"], "val_nll": result["val_nll"], "moe_evaluation": "eval capacity"}
        result["test"] = test_scores(args, run, checkpoint)
        if result["val_nll"] is not None:
            result["val_nll"] = validation_nll(checkpoint, result.get("all_overrides", run.overrides))
        result.update(earlier_scores=earlier, moe_evaluation=MOE_EVALUATION)
        result["rescored"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        before = {(r["split"], r["direction"]): r["bleu"] for r in earlier["test"]}
        changes = ", ".join(
            f"{r['split']} {r['direction']} {before.get((r['split'], r['direction']))} -> {r['bleu']}"
            for r in result["test"]
        )
        print(f"{run.name}: val NLL {earlier['val_nll']} -> {result['val_nll']:.4f}; BLEU {changes}", flush=True)


def work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work)


def final_checkpoint(run_dir: Path) -> Path:
    """The newest ``step-*.ckpt`` a finished run left."""
    found = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    if not found:
        raise FileNotFoundError(f"{run_dir} has no step-*.ckpt: run it first")
    return found[-1]


# --------------------------------------------------------------------------------------- orchestration


def result_path(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) / "runs" / f"{name}.json"


def stale_result(args: argparse.Namespace, run: Run) -> None:
    """Refuse a results file of ``run``'s name written with other overrides (e.g. the recipe changed since):
    skipping it as done would report the old settings under the new name."""
    path = result_path(args, run.name)
    if path.exists() and tuple(json.loads(path.read_text()).get("overrides", ())) != run.overrides:
        raise SystemExit(
            f"{path} was run with other settings than the plan's {run.name}: use another --out, or delete the file"
        )


def run_all(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Start every run without a results file, ``--jobs`` at a time, each after the run it starts from."""
    planned = plan(args)
    for r in planned:
        stale_result(args, r)
    pending = [r for r in planned if not result_path(args, r.name).exists()]
    running: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()
    log_dir = work_dir(args) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                status = (
                    "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log_dir / name}.log)"
                )
                failed |= {name} if proc.returncode else set()
                print(f"{time.strftime('%H:%M:%S')} {name}: {status}", flush=True)
        for r in list(pending):
            if len(running) >= args.jobs:
                break
            if r.init_from in failed:
                pending.remove(r)
                failed.add(r.name)
                continue
            if r.init_from and not result_path(args, r.init_from).exists():
                continue
            pending.remove(r)
            with open(log_dir / f"{r.name}.log", "a") as log:
                cmd = [sys.executable, __file__, *argv, "--one", r.name]
                running[r.name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            print(f"{time.strftime('%H:%M:%S')} {r.name}: started", flush=True)
        time.sleep(2)
    if failed:
        print(f"failed runs: {sorted(failed)}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-root", default=None, help=f"Multi30k folder (default {DEFAULT_DATA_ROOT}; --smoke: the sample)"
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"), help="report folder")
    p.add_argument("--work", default=str(REPO / "runs" / "quality"), help="run folders (checkpoints, logs)")
    p.add_argument("--model", default="tiny", help="model preset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--experts", type=int, nargs="+", default=[0, 8, 16, 32], help="study 1 (0 = the dense twin)")
    p.add_argument("--arms", nargs="+", default=None, help="only these arms and those they start from (default all)")
    p.add_argument("--budget-min", type=float, default=None, help="training CPU minutes of every run (6)")
    p.add_argument("--finetune-budget-min", type=float, default=None, help="training CPU minutes, de->fr runs (3)")
    p.add_argument("--precision-steps", type=int, default=None, help="steps of the bf16/fp32 runs (600)")
    p.add_argument("--recipe-steps", type=int, default=None, help="steps of study 6's base runs (500)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=None, help="optim.warmup_steps from scratch (400)")
    p.add_argument("--val-every", type=int, default=None, help="validation (and checkpoint) period in steps (150)")
    p.add_argument("--max-test-sentences", type=int, default=None, help="score the first N test lines (default all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--smoke", action="store_true", help="the embedded sample, seconds-long budgets")
    p.add_argument("--report-only", action="store_true", help="only redraw the report from the run files")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score finished runs' last checkpoints again with the current evaluation (MoE without capacity), "
        "then redraw the report",
    )
    p.add_argument("--list-arms", metavar="PREFIX", help="print the arms whose name starts with PREFIX and exit")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {
        "budget_min": 6.0,
        "finetune_budget_min": 3.0,
        "val_every": 150,
        "warmup_steps": 400,
        "precision_steps": 600,
        "recipe_steps": 500,
    }
    if args.smoke:
        args.data_root = None
        args.experts, args.seeds = [0, 8], args.seeds[:1]
        defaults = {
            "budget_min": 0.25,
            "finetune_budget_min": 0.15,
            "val_every": 10,
            "warmup_steps": 20,
            "precision_steps": 20,
            "recipe_steps": 16,
        }
        args.max_test_sentences = args.max_test_sentences or 20
    elif args.data_root is None:
        args.data_root = str(DEFAULT_DATA_ROOT)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.list_arms is not None:
        print(" ".join(dict.fromkeys(r.arm for r in plan(args) if r.arm.startswith(args.list_arms))))
        return
    if args.one:
        run = next((r for r in plan(args) if r.name == args.one), None)
        if run is None:
            raise SystemExit(f"--one {args.one}: no such run in the plan")
        result = train_one(args, run)
        path = result_path(args, run.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        return
    if args.rescore:
        rescore(args)
    elif not args.report_only:
        run_all(args, argv)
    drop = ("--report-only", "--rescore")
    args.command = " ".join(["python benchmarks/quality.py", *(a for a in argv if a not in drop)])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality_report

    quality_report.write_report(Path(args.out), vars(args))


if __name__ == "__main__":
    main()
